"""`xai explain` (and `--metrics`): the engine wired to the map, error and metric sinks.

discover -> plan (resume) -> lock -> load the model -> bind each method once -> [redraw PNGs when
only display settings changed; score metrics new to the folder on its stored maps] -> run.yaml ->
Engine.run (each image with the methods it still needs; several rows per image with several targets).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import RunConfig, dump_config, is_target_word, split_labels, topk_of
from .data import Discovery, ImageDataset, ImageItem, discover, display_path, make_loader, side_keys
from .engine import (
    BatchResult,
    Engine,
    check_amp,
    error_row,
    explain_step,
    plain_logits,
    precision,
    to_memory_format,
)
from .errors import EXIT_OK, EXIT_SOME_FAILED, ConfigError
from .methods.base import bind_methods, eval_mode, make_context
from .metrics import build_metrics, load_annotations
from .models import LoadedModel
from .models.registry import load_model_cfg, resolve_device
from .ops import Chunker
from .outputs import explanation_fields, map_key, map_paths, write_manifest, write_run_yaml
from .progress import InnerProgress
from .reader import manifest_of
from .sinks import ErrorSink, MapSink, MapStyle, MetricSink
from .state import (
    JsonLog,
    OutputLock,
    apply_plan,
    check_state,
    config_hash,
    config_parts,
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
    metric_seconds: dict[str, float] = field(default_factory=dict)  # device time per metric (--metrics)
    maps: list[Path] = field(default_factory=list)  # a single-image run: the PNGs it wrote
    redrawn: int = 0  # PNGs redrawn from stored maps (only display settings changed)
    backfilled: dict = field(default_factory=dict)  # metrics new to the folder, scored on its stored maps
    added: list = field(default_factory=list)  # methods new to the folder (computed for every image)

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


def load_labels(path: str | Path, disc: Discovery, lm: LoadedModel) -> dict[str, list[int]]:
    """Labels CSV (columns image, class) -> {image key: [class index, ...]}; `image` matches an
    item by the side-file rule (data.side_keys); `class` is a class index or a class name, or
    several separated by `;` (or `|`); an image may also have several rows (its classes add up)."""
    from .outputs import read_csv

    p = Path(path)
    rows = read_csv(p)
    if not rows or not {"image", "class"} <= set(rows[0]):
        raise ConfigError(f"target: labels file {p} needs a header with the columns image,class")
    by_name = {n: i for i, n in enumerate(lm.class_names)}
    table: dict[str, list[int]] = {}
    for r in rows:
        for c in split_labels(r.get("class") or "") or [""]:
            idx = int(c) if c.isdigit() else by_name.get(c)
            if idx is None:
                raise ConfigError(f"target: labels file {p}: '{c}' is neither a class index nor a class name")
            if not 0 <= idx < len(lm.class_names):
                raise ConfigError(
                    f"target: labels file {p}: class {idx} is out of range (0..{len(lm.class_names) - 1})"
                )
            classes = table.setdefault((r["image"] or "").strip(), [])
            if idx not in classes:
                classes.append(idx)
    out = {}
    for it in disc.items:
        k = next((k for k in side_keys(it.rel, it.path, disc.root) if k in table), None)
        if k is not None:
            out[it.rel] = table[k]
    return out


def class_index(name: str, lm: LoadedModel) -> int:
    """The index of a class given by name (exact, else case-insensitive); a ConfigError with the
    closest names otherwise."""
    names = lm.class_names
    if name in names:
        return names.index(name)
    folded = [n.casefold() for n in names]
    if name.strip().casefold() in folded:
        return folded.index(name.strip().casefold())
    import difflib

    close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
    hint = f"; did you mean: {', '.join(repr(c) for c in close)}" if close else ""
    raise ConfigError(
        f"target: '{name}' is neither 'predicted', a class index, an existing labels file nor a class name "
        f"of the model{hint}"
    )


PREDICTED = -1  # a target meaning "the predicted class" (labels file + target_fallback: predicted)


class TargetOf:
    """Picklable `extra` for the dataset: the class to explain for item i (labels file or fixed),
    or its classes ([K], padded with -1 to the run's most classes per image) in a multi-label file."""

    def __init__(self, targets: list):
        self.targets = targets
        lists = [t for t in targets if isinstance(t, list)]
        self.width = max((len(t) for t in lists), default=0)

    def __call__(self, i: int) -> dict:
        t = self.targets[i]
        if isinstance(t, list):
            t = t + [-1] * (self.width - len(t))
        return {"target": torch.tensor(t, dtype=torch.long)}


def resolve_targets(cfg: RunConfig, disc: Discovery, lm: LoadedModel, work: list[ImageItem]):
    """(items to run, their targets or None for 'predicted' / topk / positives, error rows for
    items without a label). Targets are class indices, or lists of them in a multi-label run."""
    if isinstance(cfg.target, int):
        if cfg.target >= len(lm.class_names):
            raise ConfigError(
                f"target: class {cfg.target} is out of range (the model has {len(lm.class_names)} classes)"
            )
        return work, [cfg.target] * len(work), []
    if is_target_word(cfg.target):
        return work, None, []
    if not Path(cfg.target).is_file():  # a class name: --target 'tiger cat'
        return work, [class_index(cfg.target, lm)] * len(work), []
    labels = load_labels(cfg.target, disc, lm)
    if cfg.target_fallback == "predicted":  # -1: the predicted class (filled in by the step)
        multi = cfg.multi_target()
        return (
            work,
            [
                (labels[it.rel] if multi else labels[it.rel][0])
                if it.rel in labels
                else ([PREDICTED] if multi else PREDICTED)
                for it in work
            ],
            [],
        )
    keep = [it for it in work if it.rel in labels]
    missing = [
        error_row(
            it, f"no entry in the labels file {cfg.target} (target_fallback: predicted explains the predicted class)"
        )
        for it in work
        if it.rel not in labels
    ]
    multi = cfg.multi_target()
    return keep, [labels[it.rel] if multi else labels[it.rel][0] for it in keep], missing


def choose_targets(logits: torch.Tensor, given: torch.Tensor | None, cfg: RunConfig) -> list[list[int]]:
    """The classes to explain per image of a multi-target run: the top K logits (`topk:K`), every
    class whose sigmoid is above `threshold` (`positives`; an image with none gets its top class,
    its target_prob then shows it is below the threshold), or the labels file's ([B, K], -1 padded)."""
    if given is not None:  # an image the labels file does not list (all -1) gets its top class
        rows = [[int(c) for c in row if c >= 0] for row in given.reshape(len(given), -1).tolist()]
        return [r or ([int(logits[j].argmax())] if logits is not None else []) for j, r in enumerate(rows)]
    k = topk_of(cfg.target)
    if k is not None:
        return logits.topk(min(k, logits.shape[1]), dim=1).indices.tolist()
    probs = torch.sigmoid(logits.float())
    top = logits.argmax(dim=1).tolist()
    return [[c for c in range(p.shape[0]) if p[c] > cfg.threshold] or [t] for p, t in zip(probs, top, strict=True)]


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
    device, lm = _load(cfg)
    chunker = Chunker(on_event=log.event, cap=cfg.cpu_chunk if device.type == "cpu" else None)
    ctx = make_context(lm, chunker=chunker, layer=cfg.model.layer)
    ctx.probability = "sigmoid" if cfg.score == "sigmoid" else "softmax"
    bound = _bind(cfg, ctx, lm, log)
    methods, ctx = bound.methods, bound.ctx
    work, targets, missing = resolve_targets(cfg, disc, lm, [items[i] for i in todo])
    trash = apply_plan(out, items, plan, todo, list(methods))
    redrawn = _redraw(cfg, plan, out, lm, methods, log)
    backfilled = {} if opts.force else _backfill_metrics(cfg, plan, out, lm, chunker, log, progress)
    resolved = _resolved(cfg, opts, disc, items, device, lm, methods)
    resolved["fold_bn"] = bound.fold_bn  # whether the methods ran on the folded copy, and what was folded
    write_run_yaml(out, dump_config(cfg), {"config_hash": chash, "hashes": config_parts(cfg), "resolved": resolved})
    if trash is not None:  # the new run.yaml is on disk: the old config's outputs can go
        shutil.rmtree(trash, ignore_errors=True)
    summary = RunSummary(out=out, total=len(items), ignored=disc.ignored, skipped=plan.up_to_date)
    summary.redrawn, summary.added, summary.backfilled = redrawn, plan.added, backfilled
    log.event("run_start", config_hash=chash, images=len(items), todo=len(todo), up_to_date=plan.up_to_date)
    if plan.added:
        log.event("methods_added", methods=plan.added)
    sinks = _sinks(cfg, out, lm, ctx, methods, plan.keys, summary, log)
    status, reason = "error", None
    try:
        if cfg.engine == "ray":
            from .ray_engine import run_ray

            status = run_ray(cfg, work, targets, missing, sinks, summary, log, progress)
        else:
            status = _run_local(
                cfg, lm, methods, chunker, work, targets, missing, sinks, device, progress, log, plan.need
            )
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except BaseException as e:  # the JSON log says why the run ended (the CLI prints one line too)
        reason = f"{type(e).__name__}: {e}"[:1000]
        raise
    finally:
        summary.seconds = time.perf_counter() - t_start
        _finish(out, cfg, summary, sinks, status, chunker, log, reason)
    if len(work) == 1 and summary.done:  # say where the picture is
        summary.maps = _pictures(cfg, out, methods, work[0].rel)
    return summary


def _load(cfg: RunConfig):
    """(device, LoadedModel) with the config's precision and memory format checked and applied."""
    device = resolve_device(cfg.device)
    check_amp(device, cfg.amp)
    lm = load_model_cfg(cfg.model, device)
    if cfg.channels_last:
        lm.model.to(memory_format=torch.channels_last)
    return device, lm


def _bind(cfg: RunConfig, ctx, lm, log):
    """Every method bound once per model, on the prepared (BatchNorm-folded) copy (bind_methods)."""
    bound = bind_methods(cfg.specs(), ctx, cfg.fold_bn)
    if cfg.channels_last and bound.ctx.model is not lm.model:
        bound.ctx.model.to(memory_format=torch.channels_last)
    log.event("fold_bn", **bound.fold_bn)
    return bound


def _pictures(cfg: RunConfig, out: Path, methods: dict, rel: str) -> list[Path]:
    """The overlay files a single-image run wrote (the CLI prints their paths)."""
    found = []
    for key, b in methods.items():
        for name in b.spec.map_names or (None,):
            png = map_paths(out, key, rel, name, cfg.overlay_format, cfg.save_maps)[0]
            if png.is_file():
                found.append(png)
    return found


def _resolved(cfg, opts, disc, items, device, lm, methods) -> dict:
    """What the run resolved, for run.yaml's `resolved:`."""
    resolved = {
        "device": str(device),
        "input_root": display_path(disc.root),
        "images": len(items),
        "shard": opts.shard,
        "layers": {k: b.resolved()["layer"] for k, b in methods.items() if "layer" in b.resolved()},
        "input_size": list(lm.preprocess.input_size),
    }
    if cfg.multi_target():  # maps are OUT/<method>/<rel>__<class>.png|.npy (reader.RunFolder reads it)
        resolved["multi_target"] = True
    resolved["preprocess"] = lm.preprocess.to_dict()  # `xai render` redraws without the model
    return resolved


def _redraw(cfg, plan, out: Path, lm, methods: dict, log) -> int:
    """Only display settings changed: the kept maps' PNGs are redrawn, not recomputed."""
    if not plan.redraw:
        return 0
    from .render import redraw

    kinds = {k: b.spec.map_kind for k, b in methods.items()}
    n = redraw(out, MapStyle.of(cfg, kinds), lm.preprocess, max_pixels=cfg.max_pixels).maps
    log.event("redrawn", maps=n)
    return n


def _backfill_metrics(cfg, plan, out: Path, lm, chunker, log, progress) -> dict[str, int]:
    """Metrics new to the folder (not in its run.yaml, or with other parameters) for the maps that
    are already there: computed from the stored maps like `xai evaluate`, before the new run.yaml
    is written (a kill here leaves them new for the next run). The loop computes every metric for
    the maps it makes. Returns {metric: rows written}."""
    prev = plan.previous.get("config") or {}
    if not cfg.metrics or plan.replace_config or not prev:
        return {}
    old = {
        (m.get("name"), str(sorted((k, str(v)) for k, v in m.items() if k != "name")))
        for m in prev.get("metrics") or []
        if isinstance(m, dict)
    }
    new_metrics = [
        m
        for m, d in zip(cfg.metrics, dump_config(cfg)["metrics"], strict=True)
        if (d["name"], str(sorted((k, str(v)) for k, v in d.items() if k != "name"))) not in old
    ]
    prev_keys = {(m.get("id") or m.get("name")) for m in prev.get("methods") or [] if isinstance(m, dict)}
    keys = [m.key for m in cfg.methods if m.key in prev_keys]
    specs = [
        {"name": m.name, "params": dict(m.params)}
        for m in new_metrics
        if m.params.get("against") is None or m.params.get("against") in keys
    ]
    if not specs or not keys:
        return {}
    from .evaluate import evaluate_maps

    res = evaluate_maps(out, specs, keys, lm, chunker, log, progress, annotations=cfg.annotations)
    log.event("metrics_backfilled", metrics=[s["name"] for s in specs], images=res.images)
    return {r["metric"]: int(r["n"]) for r in res.rows}


def _need(methods: dict, items: list[ImageItem], need: dict[str, list[str]]) -> dict[str, list[int]] | None:
    """{method: rows of the batch to compute} when some images need only some methods (plan.need)."""
    if not need or not any(it.rel in need for it in items):
        return None
    return {k: [j for j, it in enumerate(items) if it.rel not in need or k in need[it.rel]] for k in methods}


def _run_local(cfg, lm, methods, chunker, work, targets, missing, sinks, device, progress, log, need=None) -> str:
    dataset = ImageDataset(
        work, lm.preprocess, cfg.max_pixels, TargetOf(targets) if targets else None, cfg.overlay_max_side, cfg.draft
    )
    # pinned host memory on CUDA: the engine's non_blocking copy overlaps the next batch's decode
    loader = make_loader(dataset, cfg.batch_size, cfg.workers, pin_memory=device.type == "cuda")
    engine = Engine(_step(methods, chunker, work, cfg, need, progress), sinks, device, progress, log)
    with eval_mode(lm.model):
        return engine.run(loader, work, missing, total=len(work) + len(missing))


def _step(
    methods: dict, chunker: Chunker, work: list[ImageItem], cfg: RunConfig, need: dict | None = None, progress=None
):
    multi = cfg.multi_target()
    need = need or {}
    amp, channels_last = cfg.amp, cfg.channels_last

    def step(x, batch) -> BatchResult:
        inner = InnerProgress(progress, len(batch.indices), len(methods)) if hasattr(progress, "partial") else None
        chunker.on_chunk = inner.chunk if inner else None
        try:
            return _one_step(x, batch, inner)
        finally:
            chunker.on_chunk = None

    def explain(x, target, items, on_method):
        with precision(x.device, amp):
            xm = to_memory_format(x, channels_last)
            return explain_step(methods, xm, target, chunker, _need(methods, items, need), on_method)

    def _one_step(x, batch, inner) -> BatchResult:
        target = batch.extra["target"].to(x.device) if "target" in batch.extra else None
        items = [work[i] for i in batch.indices]
        on_method = inner.method if inner else None
        if not multi:
            if target is not None and bool((target == PREDICTED).any()):  # target_fallback: predicted
                target = torch.where(
                    target == PREDICTED, plain_logits(_model(methods), x, chunker).argmax(dim=1), target
                )
            tgt, logits, outputs = explain(x, target, items, on_method)
            return BatchResult(items, x, batch.origs, tgt, logits, outputs, batch.sizes)
        # several targets per image: one row per (image, target), the image repeated
        unlisted = target is not None and bool((target < 0).all(dim=-1).any())  # target_fallback: predicted
        logits0 = plain_logits(_model(methods), x, chunker) if target is None or unlisted else None
        per = choose_targets(logits0, target, cfg)
        rows = [(j, c) for j, cs in enumerate(per) for c in cs]
        idx = torch.tensor([j for j, _ in rows], device=x.device, dtype=torch.long)
        te = torch.tensor([c for _, c in rows], device=x.device, dtype=torch.long)
        rows_items = [items[j] for j, _ in rows]
        tgt, logits, outputs = explain(x[idx], te, rows_items, on_method)
        keys = [map_key(items[j].rel, c, True) for j, c in rows]
        origs = [batch.origs[j] for j, _ in rows]
        sizes = [batch.sizes[j] for j, _ in rows] if batch.sizes else None
        return BatchResult(rows_items, x[idx], origs, tgt, logits, outputs, sizes, keys=keys)

    return step


def _model(methods: dict):
    return next(iter(methods.values())).model


def _sinks(cfg, out, lm, ctx, methods, keys, summary, log) -> list:
    errors = ErrorSink(out, summary, log)
    extras = [e for b in methods.values() for e in b.spec.extras]
    style = MapStyle.of(cfg, {k: b.spec.map_kind for k, b in methods.items()})
    sinks = [errors]
    if cfg.metrics:
        # before the map sink: a batch's metric rows (OUT/.metrics-partial.csv) are on disk before
        # its explanations.csv rows, so an image a kill leaves up to date always has its metrics
        metrics = build_metrics(cfg.metrics, list(methods))
        sinks.append(MetricSink(out, metrics, ctx, methods, load_annotations(cfg.annotations, metrics)))
    fmt = (cfg.overlay_format, cfg.save_maps)
    sinks.append(
        MapSink(
            out,
            lm,
            explanation_fields(extras),
            keys,
            style,
            summary,
            log,
            errors,
            fmt,
            cfg.writers,
            cfg.write_queue,
            score=cfg.score,
        )
    )
    return sinks


def _finish(out, cfg, summary, sinks, status, chunker, log, reason: str | None = None) -> None:
    metric_sink = next((s for s in sinks if isinstance(s, MetricSink)), None)
    if metric_sink is not None and metric_sink.result is not None:
        summary.metrics = metric_sink.result
    if metric_sink is not None:
        summary.metric_seconds = dict(metric_sink.seconds)
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
        **({"reason": reason} if reason else {}),
    )
