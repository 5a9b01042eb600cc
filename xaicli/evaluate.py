"""`xai evaluate`: the engine wired to stored maps and the metric sink, and the metric plumbing
shared with `xai explain --metrics`.

Stored maps are read in the DataLoader's workers with the images; the run's model is rebuilt from
run.yaml; the output folder is locked like explain's (exit 3, or --wait), out-of-memory backs off
through the same chunker, and Ctrl-C/SIGTERM exits 130 with finished batches merged.

    OUT/metrics.csv            image, method, metric, value      (one row per image, method, metric)
    OUT/metrics_summary.csv    method, metric, mean, std, n      (over the images with a finite value)
    OUT/metrics_summary_by_class.csv   by, class, label, + the same (per predicted / labelled class)
    OUT/metrics_curves.csv     metric, method, x, mean           (mean curve of each curve metric)
    OUT/metrics_<metric>.png   the mean curves of all methods in one plot, AUC/AOPC per method
    OUT/sanity.csv, OUT/sanity_<method>.png   cascading randomization (metric `sanity`)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import DEFAULT_OUT, RunConfig, _named_list, _rebase, read_yaml, with_against
from .data import ImageDataset, ImageItem, discover, make_loader
from .engine import BatchResult, Engine, MethodOutput
from .errors import ConfigError, InputError
from .locks import OutputLock
from .methods.base import eval_mode, make_context, prepare_context
from .metrics import METRICS, build_metrics, load_annotations
from .models.registry import load_model_cfg, resolve_device
from .ops import Chunker
from .outputs import write_manifest
from .reader import NO_MAPS_HINT, RunFolder, manifest_of
from .sinks import EvalSummary, MetricSink
from .state import JsonLog, check_state

DEFAULT_METRICS = "deletion,insertion"


def resolve_out(out: str | Path | None, config: str | Path | None) -> tuple[Path, dict]:
    """The output folder to evaluate and the config file's data (rebased), if any."""
    data: dict = {}
    if config is not None:
        data = _rebase(read_yaml(config), Path(config).resolve().parent)
    if out is None:
        out = data.get("output") or DEFAULT_OUT
    return Path(out), data


def metric_specs(names: str | None, against: str | None, cfg_data: dict, run_cfg: RunConfig) -> list[dict]:
    """--metric names (params from the config file's `metrics:` where it names them), else the
    config file's metrics, else run.yaml's, else deletion,insertion."""
    from_cfg = _named_list(cfg_data.get("metrics") or []) or []
    if names:
        by_name = {d["name"]: d for d in from_cfg if isinstance(d, dict)}
        specs = [dict(by_name.get(d["name"], d)) for d in _named_list(names)]
    elif from_cfg:
        specs = from_cfg
    elif run_cfg.metrics:
        specs = [{"name": m.name, "params": dict(m.params)} for m in run_cfg.metrics]
    else:
        specs = _named_list(DEFAULT_METRICS)
    if against is not None:
        specs = with_against(specs, against)
    for s in specs:
        s.setdefault("params", {})
        if s["name"] not in METRICS:
            raise ConfigError(f"--metric: unknown metric '{s['name']}' (allowed: {', '.join(sorted(METRICS))})")
    if len({s["name"] for s in specs}) != len(specs):
        raise ConfigError("--metric: a metric appears twice")
    return specs


class StoredMaps:
    """Picklable `extra` for the dataset: the stored maps of item i (read in the worker) and its target."""

    def __init__(self, folder: RunFolder, keys: list[str], rels: list[str], targets: list[int]):
        self.folder, self.keys, self.rels, self.targets = folder, keys, rels, targets

    def __call__(self, i: int) -> dict:
        out = {f"map:{k}": torch.from_numpy(self.folder.load_map(k, self.rels[i])) for k in self.keys}
        return {**out, "target": torch.tensor(self.targets[i], dtype=torch.long)}


def evaluable(folder: RunFolder, run_cfg: RunConfig, keys: list[str]) -> tuple[list[ImageItem], list[int], int]:
    """(items with an ok map of every method and a readable source, their targets, how many skipped)."""
    locate = _locator(folder.out, run_cfg.output)
    fallback: dict[str, Path] | None = None
    items, targets, skipped = [], [], 0
    for rel, per in folder.latest().items():
        if not all(k in per and per[k].get("status") == "ok" and folder.has_maps(k, rel) for k in keys):
            skipped += 1
            continue
        first = per[keys[0]]
        if not (first.get("target_class") or "").strip().isdigit():  # a hand-edited row
            skipped += 1
            continue
        path = locate(first["path"]) if first.get("path") else None
        if path is None or not path.is_file():
            if fallback is None:
                fallback = _rediscover(folder, run_cfg, locate)
            path = fallback.get(rel)
        if path is None or not Path(path).is_file():
            skipped += 1
            continue
        items.append(ImageItem(Path(path), rel))
        targets.append(int(first["target_class"]))
    if not items:
        raise InputError(
            f"{folder.out}: no image has maps of every method ({', '.join(keys)}) and a readable source file"
        )
    return items, targets, skipped


def _rediscover(folder: RunFolder, run_cfg: RunConfig, locate) -> dict[str, Path]:
    root = folder.resolved.get("input_root")
    spec = run_cfg.input.path if run_cfg.input else root
    try:
        return {
            it.rel: it.path
            for it in discover(
                [locate(x) for x in spec] if isinstance(spec, list) else locate(spec),
                run_cfg.input.recursive if run_cfg.input else True,
            ).items
        }
    except Exception:  # the input moved: every image without a path column is skipped
        return {}


class _Counter:
    """A sink that counts the images scored and the ones that could not be decoded."""

    def __init__(self):
        self.done = self.failed = 0

    def consume(self, result: BatchResult) -> None:
        self.done += len(result.items)

    def fail(self, rows: list[dict]) -> None:
        self.failed += len(rows)

    def close(self, status: str) -> None:
        pass


def run_evaluate(
    out: str | Path | None = None,
    metrics: str | None = None,
    *,
    against: str | None = None,
    config: str | Path | None = None,
    annotations: str | Path | None = None,
    device: str | None = None,
    progress=None,
    wait: bool = False,
    on_wait=None,
) -> EvalSummary:
    """Compute metrics for the maps of an output folder written by `xai explain`."""
    t0 = time.perf_counter()
    out, cfg_data = resolve_out(out, config)
    folder = RunFolder(out)
    run_cfg = folder.config
    keys = [m.key for m in run_cfg.methods]
    metric_objs = build_metrics(metric_specs(metrics, against, cfg_data, run_cfg), keys)  # checks before work
    ann = load_annotations(annotations or cfg_data.get("annotations") or run_cfg.annotations, metric_objs)
    if not folder.maps_saved:
        raise InputError(f"{folder.out}: the run saved no raw maps (save_maps: false); {NO_MAPS_HINT}")
    evaluable(folder, run_cfg, keys)  # a folder with nothing to score fails before waiting for the lock
    with OutputLock(out, wait=wait, on_wait=on_wait):
        check_state(folder.out, explain=False)  # one line naming a damaged file and the fix (exit 2)
        log = JsonLog(folder.out / "xai-log.jsonl")
        items, targets, skipped = evaluable(folder, run_cfg, keys)  # again: another run may have finished
        log.event("evaluate_start", metrics=[m.name for m in metric_objs], images=len(items), skipped=skipped)
        status = "error"
        try:
            res, failed = _evaluate_locked(
                folder, run_cfg, keys, metric_objs, ann, items, targets, device, progress, log
            )
            status = "done"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            write_manifest(folder.out, manifest_of(folder.out, folder.manifest().get("status", status)))
            log.event("evaluate_end", status=status, seconds=round(time.perf_counter() - t0, 3))
    res.skipped = skipped + failed
    res.seconds = time.perf_counter() - t0
    return res


def evaluate_maps(
    out: Path, specs: list[dict], keys: list[str], lm, chunker, log, progress=None, annotations=None
) -> EvalSummary:
    """Metrics `specs` for the stored maps of `keys` (`xai explain` with metrics new to a folder),
    with an already loaded model, under the caller's lock; rows of other metrics are kept."""
    folder = RunFolder(out)
    run_cfg = folder.config
    metric_objs = build_metrics(specs, keys)
    ann = load_annotations(annotations or run_cfg.annotations, metric_objs)
    try:
        items, targets, _ = evaluable(folder, run_cfg, keys)
    except InputError:
        return EvalSummary(folder.out)
    res, _ = _evaluate_locked(
        folder,
        run_cfg,
        keys,
        metric_objs,
        ann,
        items,
        targets,
        None,
        progress,
        log,
        lm=lm,
        chunker=chunker,
        replace_all=False,
    )
    return res


def _evaluate_locked(
    folder,
    run_cfg,
    keys,
    metric_objs,
    ann,
    items,
    targets,
    device,
    progress,
    log,
    lm=None,
    chunker=None,
    replace_all=True,
):
    dev = resolve_device(device or run_cfg.device) if lm is None else next(lm.model.parameters()).device
    lm = lm or load_model_cfg(run_cfg.model, dev)
    chunker = chunker or Chunker(on_event=log.event, cap=run_cfg.cpu_chunk if dev.type == "cpu" else None)
    ctx = make_context(lm, chunker=chunker, layer=run_cfg.model.layer)
    ctx.probability = "sigmoid" if run_cfg.score == "sigmoid" else "softmax"
    if run_cfg.fold_bn:  # the metrics' forwards on the prepared copy (sanity randomises the loaded model)
        ctx = prepare_context(ctx)[0]
    methods = {}
    if any("method" in m.needs for m in metric_objs):  # sanity recomputes maps: bind at the run's layers
        layers = folder.resolved.get("layers") or {}
        for key, spec in run_cfg.specs():
            methods[key] = spec.bind(make_context(lm, chunker=chunker, layer=layers.get(key) or run_cfg.model.layer))
    sink, count = MetricSink(folder.out, metric_objs, ctx, methods, ann, replace_all=replace_all), _Counter()
    extra = StoredMaps(folder, keys, [it.rel for it in items], targets)
    loader = make_loader(
        ImageDataset(items, lm.preprocess, run_cfg.max_pixels, extra), run_cfg.batch_size, run_cfg.workers
    )
    names = folder.methods

    def step(x, batch) -> BatchResult:
        outputs = {
            k: MethodOutput(batch.extra[f"map:{k}"].to(x.device).float(), [], names=names.get(k, ())) for k in keys
        }
        tgt = batch.extra["target"].to(x.device)
        return BatchResult([items[i] for i in batch.indices], x, batch.origs, tgt, None, outputs)

    with eval_mode(lm.model):
        Engine(step, [sink, count], dev, progress).run(loader, items)
    sink.result.images = count.done
    return sink.result, count.failed


def _locator(out: Path, recorded_output: str):
    """Resolve a path recorded by the run: absolute as is; a relative one against the current
    folder, else against the folder the run was started from (OUT minus its recorded relative
    `output`, e.g. /home/u/proj for OUT=/home/u/proj/runs/a recorded as runs/a)."""
    base = None
    rec = Path(recorded_output)
    if not rec.is_absolute():
        parts, full = rec.parts, out.resolve().parts
        if parts and len(full) >= len(parts) and tuple(full[-len(parts) :]) == tuple(parts):
            base = Path(*full[: len(full) - len(parts)]) if len(full) > len(parts) else Path("/")

    def locate(p: str | Path) -> Path:
        q = Path(p)
        if q.is_absolute() or q.exists() or base is None:
            return q
        return base / q if (base / q).exists() else q

    return locate
