"""`xai explain` (and `--metrics`): the engine wired to the map, error and metric sinks.

discover -> plan (resume) -> lock -> load the model -> bind each method once -> Engine.run.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import RunConfig, dump_config
from .data import Discovery, ImageDataset, ImageItem, discover, make_loader, side_keys
from .engine import BatchResult, Engine, check_amp, error_row, explain_step, precision, to_memory_format
from .errors import EXIT_OK, EXIT_SOME_FAILED, ConfigError
from .methods.base import eval_mode, make_context
from .metrics import build_metrics, load_annotations
from .models import LoadedModel
from .models.registry import load_model_cfg, resolve_device
from .ops import Chunker
from .outputs import explanation_fields, write_manifest, write_run_yaml
from .reader import manifest_of
from .sinks import ErrorSink, MapSink, MapStyle, MetricSink
from .state import (
    JsonLog,
    OutputLock,
    apply_plan,
    check_state,
    config_hash,
    make_plan,
    parse_shard,
    repair_lock,
    shard_of,
)


@dataclass
class RunSummary:
    out: Path
    total: int = 0
    done: int = 0
    failed: int = 0
    ignored: int = 0
    seconds: float = 0.0
    method_seconds: dict[str, float] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)
    skipped: int = 0  # up to date from an earlier run (resume)
    flagged: int = 0  # (image, method) maps flagged nonfinite/oom in explanations.csv
    planned: list = field(default_factory=list)  # --dry-run: what would be done
    metrics: object | None = None  # sinks.EvalSummary when the run computed metrics (--metrics)

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.failed or self.flagged else EXIT_OK

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


@dataclass
class RunOptions:
    """How to run (not what): these never change the outputs, so they are not in the config hash."""

    force: bool = False  # redo every image (and replace the outputs of a different config)
    wait: bool = False  # wait for the output lock instead of exiting with code 3
    dry_run: bool = False  # print the plan, write nothing
    limit: int | None = None  # process at most N images of the plan
    shard: str | None = None  # "I/N": only images whose key hashes to shard I of N
    repair: bool = False  # set damaged state files aside and rebuild them from what is on disk


def load_labels(path: str | Path, disc: Discovery, lm: LoadedModel) -> dict[str, int]:
    """Labels CSV (columns image, class) -> {image key: class index}; `image` matches an item by
    the side-file rule (data.side_keys); `class` is a class index or a class name."""
    from .outputs import read_csv

    p = Path(path)
    rows = read_csv(p)
    if not rows or not {"image", "class"} <= set(rows[0]):
        raise ConfigError(f"target: labels file {p} needs a header with the columns image,class")
    by_name = {n: i for i, n in enumerate(lm.class_names)}
    table: dict[str, int] = {}
    for r in rows:
        c = (r.get("class") or "").strip()
        idx = int(c) if c.isdigit() else by_name.get(c)
        if idx is None:
            raise ConfigError(f"target: labels file {p}: '{c}' is neither a class index nor a class name")
        if not 0 <= idx < len(lm.class_names):
            raise ConfigError(f"target: labels file {p}: class {idx} is out of range (0..{len(lm.class_names) - 1})")
        table[(r["image"] or "").strip()] = idx
    out = {}
    for it in disc.items:
        k = next((k for k in side_keys(it.rel, it.path, disc.root) if k in table), None)
        if k is not None:
            out[it.rel] = table[k]
    return out


class TargetOf:
    """Picklable `extra` for the dataset: the class to explain for item i (labels file or fixed)."""

    def __init__(self, targets: list[int]):
        self.targets = targets

    def __call__(self, i: int) -> dict:
        return {"target": torch.tensor(self.targets[i], dtype=torch.long)}


def resolve_targets(cfg: RunConfig, disc: Discovery, lm: LoadedModel, work: list[ImageItem]):
    """(items to run, their targets or None for 'predicted', error rows for items without a label)."""
    if isinstance(cfg.target, int):
        if cfg.target >= len(lm.class_names):
            raise ConfigError(
                f"target: class {cfg.target} is out of range (the model has {len(lm.class_names)} classes)"
            )
        return work, [cfg.target] * len(work), []
    if cfg.target == "predicted":
        return work, None, []
    labels = load_labels(cfg.target, disc, lm)
    keep = [it for it in work if it.rel in labels]
    missing = [error_row(it, f"no entry in the labels file {cfg.target}") for it in work if it.rel not in labels]
    return keep, [labels[it.rel] for it in keep], missing


def run_explain(cfg: RunConfig, *, progress=None, options: RunOptions | None = None, on_wait=None) -> RunSummary:
    """Run every method of `cfg` over its input; `progress` is a ProgressReporter or None."""
    opts = options or RunOptions()
    t_start = time.perf_counter()
    if cfg.engine == "ray" and not opts.dry_run:
        from .ray_engine import check_ray

        check_ray(cfg)  # ray installed (else how to install it), no --metrics: exit 2 before any work
    disc = discover(cfg.input.path, cfg.input.recursive)
    items = disc.items
    shard = parse_shard(opts.shard)
    if shard is not None:
        items = [it for it in items if shard_of(it.rel, shard[1]) == shard[0]]
    out = Path(cfg.output)
    chash = config_hash(cfg)
    if opts.dry_run:
        plan = make_plan(out, items, cfg, chash, opts.force)
        todo = [items[i] for i in plan.limited(opts.limit)]
        return RunSummary(out=out, total=len(items), ignored=disc.ignored, skipped=plan.up_to_date, planned=todo)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output: cannot create the folder {out}: {e.strerror or e}") from None
    if opts.repair:
        repair_lock(out)
    with OutputLock(out, wait=opts.wait, on_wait=on_wait):
        return _run_locked(cfg, opts, disc, items, out, chash, progress, t_start)


def _run_locked(cfg, opts, disc, items, out, chash, progress, t_start) -> RunSummary:
    log = JsonLog(out / "xai-log.jsonl")
    extras = [e for _, spec in cfg.specs() for e in spec.extras]
    check_state(out, log, opts.repair, {"explanations.csv": explanation_fields(extras)})
    plan = make_plan(out, items, cfg, chash, opts.force)
    todo = plan.limited(opts.limit)
    device = resolve_device(cfg.device)
    check_amp(device, cfg.amp)
    lm = load_model_cfg(cfg.model, device)
    if cfg.channels_last:
        lm.model.to(memory_format=torch.channels_last)
    chunker = Chunker(on_event=log.event)
    ctx = make_context(lm, chunker=chunker, layer=cfg.model.layer)
    methods = {key: spec.bind(ctx) for key, spec in cfg.specs()}  # bound once per model
    work, targets, missing = resolve_targets(cfg, disc, lm, [items[i] for i in todo])
    trash = apply_plan(out, items, plan, todo, list(methods))
    resolved = {
        "device": str(device),
        "input_root": str(disc.root),
        "images": len(items),
        "shard": opts.shard,
        "layers": {k: b.resolved()["layer"] for k, b in methods.items() if "layer" in b.resolved()},
        "input_size": list(lm.preprocess.input_size),
    }
    write_run_yaml(out, dump_config(cfg), {"config_hash": chash, "resolved": resolved})
    if trash is not None:  # the new run.yaml is on disk: the old config's outputs can go
        shutil.rmtree(trash, ignore_errors=True)
    summary = RunSummary(out=out, total=len(items), ignored=disc.ignored, skipped=plan.up_to_date)
    log.event("run_start", config_hash=chash, images=len(items), todo=len(todo), up_to_date=plan.up_to_date)
    sinks = _sinks(cfg, out, lm, ctx, methods, plan.keys, summary, log)
    status = "error"
    try:
        if cfg.engine == "ray":
            from .ray_engine import run_ray

            status = run_ray(cfg, work, targets, missing, sinks, summary, log, progress)
        else:
            status = _run_local(cfg, lm, methods, chunker, work, targets, missing, sinks, device, progress, log)
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        summary.seconds = time.perf_counter() - t_start
        _finish(out, cfg, summary, sinks, status, chunker, log)
    return summary


def _run_local(cfg, lm, methods, chunker, work, targets, missing, sinks, device, progress, log) -> str:
    dataset = ImageDataset(
        work, lm.preprocess, cfg.max_pixels, TargetOf(targets) if targets else None, cfg.overlay_max_side, cfg.draft
    )
    # pinned host memory on CUDA: the engine's non_blocking copy overlaps the next batch's decode
    loader = make_loader(dataset, cfg.batch_size, cfg.workers, pin_memory=device.type == "cuda")
    engine = Engine(_step(methods, chunker, work, cfg), sinks, device, progress, log)
    with eval_mode(lm.model):
        return engine.run(loader, work, missing, total=len(work) + len(missing))


def _step(methods: dict, chunker: Chunker, work: list[ImageItem], cfg: RunConfig | None = None):
    amp, channels_last = (cfg.amp, cfg.channels_last) if cfg is not None else ("none", False)

    def step(x, batch) -> BatchResult:
        target = batch.extra["target"].to(x.device) if "target" in batch.extra else None
        with precision(x.device, amp):
            tgt, logits, outputs = explain_step(methods, to_memory_format(x, channels_last), target, chunker)
        items = [work[i] for i in batch.indices]
        return BatchResult(items, x, batch.origs, tgt, logits, outputs, batch.sizes)

    return step


def _sinks(cfg, out, lm, ctx, methods, keys, summary, log) -> list:
    errors = ErrorSink(out, summary, log)
    extras = [e for b in methods.values() for e in b.spec.extras]
    o = cfg.overlay_style()
    kinds = {k: b.spec.map_kind for k, b in methods.items()}
    style = MapStyle(o.colormap, o.alpha, o.diverging, o.clip_percentile, o.caption, o.colorbar, kinds)
    sinks = [errors]
    if cfg.metrics:
        # before the map sink: a batch's metric rows (OUT/.metrics-partial.csv) are on disk before
        # its explanations.csv rows, so an image a kill leaves up to date always has its metrics
        metrics = build_metrics(cfg.metrics, list(methods))
        sinks.append(MetricSink(out, metrics, ctx, methods, load_annotations(cfg.annotations, metrics)))
    fmt = (cfg.overlay_format, cfg.save_maps)
    sinks.append(
        MapSink(
            out, lm, explanation_fields(extras), keys, style, summary, log, errors, fmt, cfg.writers, cfg.write_queue
        )
    )
    return sinks


def _finish(out, cfg, summary, sinks, status, chunker, log) -> None:
    metric_sink = next((s for s in sinks if isinstance(s, MetricSink)), None)
    if metric_sink is not None and metric_sink.result is not None:
        summary.metrics = metric_sink.result
    if cfg.sheet and status == "done":
        from .report import write_sheets

        write_sheets(out)
    write_manifest(out, manifest_of(out, status))
    log.event(
        "run_end",
        status=status,
        done=summary.done,
        failed=summary.failed,
        up_to_date=summary.skipped,
        seconds=round(summary.seconds, 3),
        oom_backoffs=chunker.events,
    )
