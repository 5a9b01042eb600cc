"""The batch loop: discover -> load -> explain -> write, with progress and a summary.

Data moves forward only: DataLoader workers decode; the device explains a whole batch per
method; maps come back to the CPU once per batch; a thread pool encodes PNG/NPY files; CSV rows
are appended when every file of their batch is on disk.
"""

from __future__ import annotations

import csv
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import RunConfig, dump_config
from .data import Discovery, ImageDataset, ImageItem, discover, make_loader, printable
from .errors import EXIT_OK, EXIT_SOME_FAILED, ConfigError
from .evaluate import start_metrics
from .methods import build_method
from .methods.base import Explanation, Method, eval_mode
from .models import LoadedModel
from .models.registry import load_model_cfg
from .outputs import (
    ERROR_FIELDS,
    EXPLANATION_FIELDS,
    CsvAppender,
    ensure_inside,
    map_paths,
    overlay,
    save_npy,
    save_png,
    write_run_yaml,
)
from .state import JsonLog, OutputLock, apply_plan, config_hash, make_plan, parse_shard, shard_of


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
    metrics: object | None = None  # EvalSummary when the run computed metrics (--metrics)

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.failed or self.flagged else EXIT_OK

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: '{spec}' was asked for but CUDA is not available here (use auto or cpu)")
    if spec == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device: 'mps' was asked for but is not available here (use auto or cpu)")
    return torch.device(spec)


def load_labels(path: str | Path, disc: Discovery, lm: LoadedModel) -> dict[str, int]:
    """Labels CSV (columns image, class) -> {image key: class index}.

    `image` matches an item's path relative to the input root (with or without extension) or
    its file name; `class` is a class index or a class name.
    """
    p = Path(path)
    with open(p, encoding="utf-8", errors="replace", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"image", "class"} <= set(rows[0]):
        raise ConfigError(f"target: labels file {p} needs a header with the columns image,class")
    by_name = {n: i for i, n in enumerate(lm.class_names)}
    table: dict[str, int] = {}
    for r in rows:
        c = (r.get("class") or "").strip()
        if c.isdigit():
            idx = int(c)
        elif c in by_name:
            idx = by_name[c]
        else:
            raise ConfigError(f"target: labels file {p}: '{c}' is neither a class index nor a class name")
        if not 0 <= idx < len(lm.class_names):
            raise ConfigError(f"target: labels file {p}: class {idx} is out of range (0..{len(lm.class_names) - 1})")
        table[(r["image"] or "").strip()] = idx
    out = {}
    for it in disc.items:
        rel_full = it.path.relative_to(disc.root).as_posix() if it.path.is_relative_to(disc.root) else it.path.name
        for k in (rel_full, it.rel, it.path.name):
            if k in table:
                out[it.rel] = table[k]
                break
    return out


def build_methods(cfg: RunConfig, lm: LoadedModel) -> list[tuple[str, Method]]:
    out = []
    for m in cfg.methods:
        params = dict(m.params)
        meth = build_method(m.name, **params)
        if meth.needs_layer and getattr(meth, "layer", None) is None and cfg.model.layer:
            meth.layer = cfg.model.layer
        meth.bind_preprocess(lm.preprocess)
        meth.prepare(lm.model, lm.preprocess.input_size)
        out.append((m.key, meth))
    return out


class Writer:
    """Encodes files on a thread pool; appends a batch's CSV rows once all its files exist.

    A file that cannot be written (a path through a symlink out of OUT, a name too long...) fails
    that image and method only: its row is replaced by an errors.csv row.
    """

    def __init__(self, out: Path, on_error, threads: int = 4, max_pending: int = 4):
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="xai-writer")
        self.pending: deque[tuple[list[tuple[Future, str, str]], list[dict]]] = deque()
        self.max_pending = max_pending
        self.explanations = CsvAppender(out / "explanations.csv", EXPLANATION_FIELDS)
        self.on_error = on_error  # (row, reason) -> None

    def submit(self, futures: list[tuple[Future, str, str]], rows: list[dict]) -> None:
        self.pending.append((futures, rows))
        self._drain(block=len(self.pending) > self.max_pending)

    def _drain(self, block: bool) -> None:
        while self.pending and (block or all(f.done() for f, _, _ in self.pending[0][0])):
            futures, rows = self.pending.popleft()
            failed = {}
            for f, image, method in futures:
                exc = f.exception()
                if exc is not None:
                    if not isinstance(exc, OSError):
                        raise exc
                    failed[(image, method)] = f"could not write output: {type(exc).__name__}: {exc}"
            for r in rows:
                if (r["image"], r["method"]) in failed:
                    self.on_error(r, failed[(r["image"], r["method"])])
            self.explanations.append([r for r in rows if (r["image"], r["method"]) not in failed])
            block = block and len(self.pending) > self.max_pending

    def close(self) -> None:
        try:
            while self.pending:
                self._drain(block=True)
        finally:
            self.pool.shutdown(wait=True)


def _write_one(out: Path, key: str, rel: str, cam: np.ndarray, orig: np.ndarray, box, cmap: str, alpha: float):
    png, npy = map_paths(out, key, rel)
    ensure_inside(out, png)
    save_npy(npy, cam)
    save_png(png, overlay(orig, cam, box, cmap, alpha))


@dataclass
class RunOptions:
    """How to run (not what): these never change the outputs, so they are not in the config hash."""

    force: bool = False  # redo every image (and replace the outputs of a different config)
    wait: bool = False  # wait for the output lock instead of exiting with code 3
    dry_run: bool = False  # print the plan, write nothing
    limit: int | None = None  # process at most N images of the plan
    shard: str | None = None  # "I/N": only images whose key hashes to shard I of N


class Backoff:
    """Largest sub-batch that fit on the device so far; halved on out-of-memory, never grown back."""

    def __init__(self) -> None:
        self.chunk: int | None = None
        self.events = 0


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def _chunked(fn, x, target, backoff: Backoff, log, what: str) -> list[tuple[object | None, int]]:
    """fn(x_part, target_part) over sub-batches of backoff.chunk; on out-of-memory halve and retry.

    Returns [(result, n)] in order; result is None for an image that does not fit even alone.
    """
    n = x.shape[0]
    size = min(backoff.chunk or n, n)
    parts, start = [], 0
    while start < n:
        end = min(start + size, n)
        try:
            parts.append((fn(x[start:end], target[start:end] if target is not None else None), end - start))
            start = end
        except Exception as e:
            if not _is_oom(e):
                raise
            if x.device.type == "cuda":
                torch.cuda.empty_cache()
            if size == 1:  # even one image does not fit: that image fails, the run goes on
                log.event("oom_image", method=what)
                parts.append((None, 1))
                start = end
                continue
            size = (size + 1) // 2
            backoff.chunk = size
            backoff.events += 1
            log.event("oom_backoff", method=what, batch=size)
    return parts


def _run_method(meth: Method, model, x, target, backoff: Backoff, log) -> tuple[Explanation, torch.Tensor]:
    """Run a method with OOM back-off. Returns (explanation, failed mask [B]); failed rows hold NaN."""
    parts = _chunked(lambda xs, ts: meth.run(model, xs, ts), x, target, backoff, log, meth.name)
    h, w = x.shape[-2:]
    n_cls = next((e.logits.shape[1] for e, _ in parts if e is not None and e.logits is not None), None)
    keys = {k for e, _ in parts if e is not None for k in e.extras}
    maps, logits, extras, failed = [], [], {k: [] for k in keys}, []
    for expl, n in parts:
        ok = expl is not None
        nan = torch.full((n,), float("nan"), device=x.device)
        maps.append(expl.maps.float() if ok else torch.full((n, h, w), float("nan"), device=x.device))
        if n_cls is not None:
            lg = expl.logits if ok and expl.logits is not None else None
            logits.append(lg.float() if lg is not None else torch.full((n, n_cls), float("nan"), device=x.device))
        for k in keys:
            extras[k].append(expl.extras[k].float() if ok and k in expl.extras else nan)
        failed.append(torch.full((n,), not ok, dtype=torch.bool))
    all_logits = torch.cat(logits) if n_cls is not None else None
    return Explanation(torch.cat(maps), all_logits, {k: torch.cat(v) for k, v in extras.items()}), torch.cat(failed)


def _logits(model, x, backoff: Backoff, log) -> torch.Tensor:
    """Plain forward with the same back-off, for methods that return no logits."""

    def fwd(xs, _ts):
        with torch.no_grad():
            return model(xs).float()

    parts = _chunked(fwd, x, None, backoff, log, "forward")
    n_cls = next((p.shape[1] for p, _ in parts if p is not None), 1)
    return torch.cat([p if p is not None else torch.full((n, n_cls), float("nan"), device=x.device) for p, n in parts])


def run_explain(cfg: RunConfig, *, progress=None, options: RunOptions | None = None, on_wait=None) -> RunSummary:
    """Run every method of `cfg` over its input; `progress` is a ProgressReporter or None."""
    opts = options or RunOptions()
    t_start = time.perf_counter()
    disc = discover(cfg.input.path, cfg.input.recursive)
    items = disc.items
    shard = parse_shard(opts.shard)
    if shard is not None:
        items = [it for it in items if shard_of(it.rel, shard[1]) == shard[0]]
    out = Path(cfg.output)
    chash = config_hash(cfg)
    if opts.dry_run:
        plan = make_plan(out, items, cfg, chash, opts.force)
        return RunSummary(
            out=out,
            total=len(items),
            ignored=disc.ignored,
            skipped=plan.up_to_date,
            planned=[items[i] for i in plan.limited(opts.limit)],
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output: cannot create the folder {out}: {e.strerror or e}") from None
    with OutputLock(out, wait=opts.wait, on_wait=on_wait):
        return _run_locked(cfg, opts, disc, items, out, chash, progress, t_start)


def _run_locked(cfg, opts, disc, items, out, chash, progress, t_start) -> RunSummary:
    log = JsonLog(out / "xai-log.jsonl")
    plan = make_plan(out, items, cfg, chash, opts.force)
    todo = plan.limited(opts.limit)
    device = resolve_device(cfg.device)
    lm = load_model_cfg(cfg.model, device)
    methods = build_methods(cfg, lm)
    labels = None
    if isinstance(cfg.target, str) and cfg.target != "predicted":
        labels = load_labels(cfg.target, disc, lm)
    elif isinstance(cfg.target, int) and cfg.target >= len(lm.class_names):
        raise ConfigError(f"target: class {cfg.target} is out of range (the model has {len(lm.class_names)} classes)")

    trash = apply_plan(out, items, plan, todo, [m.key for m in cfg.methods])
    write_run_yaml(
        out,
        dump_config(cfg),
        {
            "config_hash": chash,
            "resolved": {
                "device": str(device),
                "input_root": str(disc.root),
                "images": len(items),
                "shard": opts.shard,
                "layers": {k: getattr(m, "layer", None) for k, m in methods if m.needs_layer},
                "input_size": list(lm.preprocess.input_size),
            },
        },
    )
    if trash is not None:  # the new run.yaml is on disk: the old config's outputs can go
        shutil.rmtree(trash, ignore_errors=True)
    work = [items[i] for i in todo]
    summary = RunSummary(out=out, total=len(items), ignored=disc.ignored, skipped=plan.up_to_date)
    log.event("run_start", config_hash=chash, images=len(items), todo=len(work), up_to_date=plan.up_to_date)
    errors = CsvAppender(out / "errors.csv", ERROR_FIELDS)
    dataset = ImageDataset(work, lm.preprocess, cfg.max_pixels)
    loader = make_loader(dataset, cfg.batch_size, cfg.workers, pin_memory=device.type == "cuda")

    def write_failed(row: dict, reason: str) -> None:
        errors.append([{"image": row["image"], "path": row["path"], "reason": f"{row['method']}: {reason}"}])
        summary.failed += 1
        summary.errors.append((row["path"], reason))
        log.event("image_error", image=row["image"], method=row["method"], reason=reason)

    writer = Writer(out, write_failed)
    backoff = Backoff()
    ctx = _BatchContext(cfg, lm, methods, labels, device, writer, out, summary, plan.keys, backoff, log, disc)
    ctx.metrics = start_metrics(cfg, lm, methods, out)  # None without --metrics
    if progress:
        progress.start(len(work))
    status = "error"
    try:
        with eval_mode(lm.model):
            for batch in loader:
                err_rows = [_error_row(work[i], reason) for i, reason in batch.failures]
                indices, x, origs = list(batch.indices), batch.x, batch.origs
                if x is not None and labels is not None:
                    keep = [j for j, i in enumerate(indices) if work[i].rel in labels]
                    for i in indices:
                        if work[i].rel not in labels:
                            err_rows.append(_error_row(work[i], f"no entry in the labels file {cfg.target}"))
                    indices, origs = [indices[j] for j in keep], [origs[j] for j in keep]
                    x = x[keep] if keep else None
                if err_rows:
                    errors.append(err_rows)
                    summary.failed += len(err_rows)
                    summary.errors.extend((r["path"], r["reason"]) for r in err_rows)
                    for r in err_rows:
                        log.event("image_error", image=r["image"], reason=r["reason"])
                if x is not None and indices:
                    _explain_batch(ctx, x, [work[i] for i in indices], origs)
                if progress:
                    progress.advance(len(batch.indices) + len(batch.failures))
        status = "done"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        writer.close()
        if progress:
            progress.stop()
        summary.seconds = time.perf_counter() - t_start
        log.event(
            "run_end",
            status=status,
            done=summary.done,
            failed=summary.failed,
            up_to_date=summary.skipped,
            seconds=round(summary.seconds, 3),
            oom_backoffs=backoff.events,
        )
    if ctx.metrics is not None:
        summary.metrics = ctx.metrics.finish()
    return summary


def _error_row(it: ImageItem, reason: str) -> dict:
    return {"image": it.rel, "path": printable(str(it.path)), "reason": reason}


@dataclass
class _BatchContext:
    cfg: RunConfig
    lm: LoadedModel
    methods: list
    labels: dict | None
    device: torch.device
    writer: Writer
    out: Path
    summary: RunSummary
    keys: dict
    backoff: Backoff
    log: JsonLog
    disc: Discovery
    metrics: object = None  # MetricSession with --metrics (xaicli/evaluate.py)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _explain_batch(ctx: _BatchContext, x_cpu, batch_items: list[ImageItem], origs) -> None:
    cfg, lm, device = ctx.cfg, ctx.lm, ctx.device
    model = lm.model
    x = x_cpu.to(device, non_blocking=True)
    if ctx.labels is not None:
        target = torch.tensor([ctx.labels[it.rel] for it in batch_items], dtype=torch.long, device=device)
    elif isinstance(cfg.target, int):
        target = torch.full((len(batch_items),), cfg.target, dtype=torch.long, device=device)
    else:
        target = None
    results = []
    on_device = {}  # maps still on the device, for the metrics
    logits = None
    for key, meth in ctx.methods:
        _sync(device)
        t0 = time.perf_counter()
        expl, oom = _run_method(meth, model, x, target, ctx.backoff, ctx.log)
        if ctx.metrics is not None:
            on_device[key] = expl.maps.detach()
        maps = expl.maps.detach().float().cpu()  # one transfer per batch and method
        dt = time.perf_counter() - t0
        ctx.summary.method_seconds[key] = ctx.summary.method_seconds.get(key, 0.0) + dt
        if logits is None and expl.logits is not None:
            logits = expl.logits
        results.append((key, maps, dt, expl.extras, oom))
    if logits is None:
        logits = _logits(model, x, ctx.backoff, ctx.log)
    probs = torch.softmax(logits.float(), dim=1).cpu()
    tgt = target.cpu() if target is not None else probs.argmax(dim=1)
    top_p, top_c = probs.max(dim=1)
    t_p = probs.gather(1, tgt[:, None])[:, 0]
    origs_np = [o.numpy() for o in origs]
    if ctx.metrics is not None:
        sizes = [(o.shape[1], o.shape[0]) for o in origs_np]
        ctx.metrics.add_batch(model, x, on_device, tgt.to(device), batch_items, sizes)
    futures, rows = [], []
    n = len(batch_items)
    for key, maps, dt, extras, oom in results:
        finite = torch.isfinite(maps).flatten(1).all(dim=1)
        mins, maxs = maps.flatten(1).amin(1), maps.flatten(1).amax(1)
        for j, it in enumerate(batch_items):
            size_mtime = ctx.keys.get(it.rel) or ("", "")
            ok = bool(finite[j]) and not bool(oom[j])
            row = {
                "image": it.rel,
                "method": key,
                "target_class": int(tgt[j]),
                "target_label": lm.label(int(tgt[j])),
                "target_prob": f"{float(t_p[j]):.6f}",
                "top1_class": int(top_c[j]),
                "top1_label": lm.label(int(top_c[j])),
                "top1_prob": f"{float(top_p[j]):.6f}",
                "seconds": f"{dt / n:.6f}",
                "map_min": f"{float(mins[j]):.6g}",
                "map_max": f"{float(maxs[j]):.6g}",
                "status": "ok" if ok else ("oom" if bool(oom[j]) else "nonfinite"),
                "path": printable(str(it.path)),
                "size": size_mtime[0],
                "mtime_ns": size_mtime[1],
            }
            for name, vals in extras.items():
                row[name] = f"{float(vals[j]):.6g}"
            rows.append(row)
            if ok:
                h, w = origs_np[j].shape[:2]
                box = lm.preprocess.crop_box(w, h)
                fut = ctx.writer.pool.submit(
                    _write_one, ctx.out, key, it.rel, maps[j].numpy(), origs_np[j], box, cfg.colormap, cfg.alpha
                )
                futures.append((fut, it.rel, key))
            else:
                ctx.summary.flagged += 1
                ctx.log.event("map_flagged", image=it.rel, method=key, status=row["status"])
    ctx.summary.done += n
    ctx.writer.submit(futures, rows)
