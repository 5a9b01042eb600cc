"""The batch loop: discover -> load -> explain -> write, with progress and a summary.

Data moves forward only: DataLoader workers decode; the device explains a whole batch per
method; maps come back to the CPU once per batch; a thread pool encodes PNG/NPY files; CSV rows
are appended when every file of their batch is on disk.
"""

from __future__ import annotations

import csv
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import RunConfig, dump_config
from .data import Discovery, ImageDataset, discover, make_loader
from .errors import EXIT_OK, EXIT_SOME_FAILED, ConfigError
from .evaluate import start_metrics
from .methods import build_method
from .methods.base import Method, eval_mode
from .models import LoadedModel, load_model
from .outputs import (
    ERROR_FIELDS,
    EXPLANATION_FIELDS,
    CsvAppender,
    map_paths,
    overlay,
    save_npy,
    save_png,
    write_run_yaml,
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
    metrics: object | None = None  # EvalSummary when the run computed metrics (--metrics)

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.failed else EXIT_OK

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


def load_labels(path: str | Path, disc: Discovery, lm: LoadedModel) -> dict[int, int]:
    """Labels CSV (columns image, class) -> {item index: class index}.

    `image` matches an item's path relative to the input root (with or without extension) or
    its file name; `class` is a class index or a class name.
    """
    p = Path(path)
    with open(p, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"image", "class"} <= set(rows[0]):
        raise ConfigError(f"target: labels file {p} needs a header with the columns image,class")
    by_name = {n: i for i, n in enumerate(lm.class_names)}
    table: dict[str, int] = {}
    for r in rows:
        c = (r["class"] or "").strip()
        if c.isdigit():
            idx = int(c)
        elif c in by_name:
            idx = by_name[c]
        else:
            raise ConfigError(f"target: labels file {p}: '{c}' is neither a class index nor a class name")
        if not 0 <= idx < len(lm.class_names):
            raise ConfigError(f"target: labels file {p}: class {idx} is out of range (0..{len(lm.class_names) - 1})")
        table[r["image"].strip()] = idx
    out = {}
    for i, it in enumerate(disc.items):
        rel_full = it.path.relative_to(disc.root).as_posix() if it.path.is_relative_to(disc.root) else it.path.name
        for k in (rel_full, it.rel, it.path.name):
            if k in table:
                out[i] = table[k]
                break
    return out


def build_methods(cfg: RunConfig, lm: LoadedModel) -> list[tuple[str, Method]]:
    out = []
    for m in cfg.methods:
        params = dict(m.params)
        meth = build_method(m.name, **params)
        if meth.needs_layer and getattr(meth, "layer", None) is None and cfg.model.layer:
            meth.layer = cfg.model.layer
        meth.prepare(lm.model, lm.preprocess.input_size)
        out.append((m.key, meth))
    return out


class Writer:
    """Encodes files on a thread pool; appends a batch's CSV rows once all its files exist."""

    def __init__(self, out: Path, threads: int = 4, max_pending: int = 4):
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="xai-writer")
        self.pending: deque[tuple[list[Future], list[dict]]] = deque()
        self.max_pending = max_pending
        self.explanations = CsvAppender(out / "explanations.csv", EXPLANATION_FIELDS)

    def submit(self, futures: list[Future], rows: list[dict]) -> None:
        self.pending.append((futures, rows))
        self._drain(block=len(self.pending) > self.max_pending)

    def _drain(self, block: bool) -> None:
        while self.pending and (block or all(f.done() for f in self.pending[0][0])):
            futures, rows = self.pending.popleft()
            for f in futures:
                f.result()  # re-raise a write error (disk full...) in the main thread
            self.explanations.append(rows)
            block = block and len(self.pending) > self.max_pending

    def close(self) -> None:
        try:
            self._drain(block=True)
            while self.pending:
                self._drain(block=True)
        finally:
            self.pool.shutdown(wait=True)


def _write_one(out: Path, key: str, rel: str, cam: np.ndarray, orig: np.ndarray, box, cmap: str, alpha: float):
    png, npy = map_paths(out, key, rel)
    save_npy(npy, cam)
    save_png(png, overlay(orig, cam, box, cmap, alpha))


def run_explain(cfg: RunConfig, *, progress=None) -> RunSummary:
    """Run every method of `cfg` over its input; `progress` is a ProgressReporter or None."""
    t_start = time.perf_counter()
    disc = discover(cfg.input.path, cfg.input.recursive)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    lm = load_model(
        cfg.model.name,
        cfg.model.weights,
        num_classes=cfg.model.num_classes,
        class_names=cfg.model.class_names,
        device=device,
    )
    methods = build_methods(cfg, lm)
    labels = None
    if isinstance(cfg.target, str) and cfg.target != "predicted":
        labels = load_labels(cfg.target, disc, lm)
    elif isinstance(cfg.target, int) and cfg.target >= len(lm.class_names):
        raise ConfigError(f"target: class {cfg.target} is out of range (the model has {len(lm.class_names)} classes)")

    write_run_yaml(
        out,
        dump_config(cfg),
        {
            "resolved": {
                "device": str(device),
                "input_root": str(disc.root),
                "images": len(disc.items),
                "layers": {k: getattr(m, "layer", None) for k, m in methods if m.needs_layer},
                "input_size": list(lm.preprocess.input_size),
            }
        },
    )
    summary = RunSummary(out=out, total=len(disc.items), ignored=disc.ignored)
    errors = CsvAppender(out / "errors.csv", ERROR_FIELDS)
    dataset = ImageDataset(disc.items, lm.preprocess, cfg.max_pixels)
    loader = make_loader(dataset, cfg.batch_size, cfg.workers, pin_memory=device.type == "cuda")
    writer = Writer(out)
    metrics = start_metrics(cfg, lm, methods, out)  # None without --metrics
    if progress:
        progress.start(len(disc.items))
    model = lm.model
    try:
        with eval_mode(model):
            for batch in loader:
                err_rows = []
                for i, reason in batch.failures:
                    it = disc.items[i]
                    err_rows.append({"image": it.rel, "path": str(it.path), "reason": reason})
                    summary.errors.append((str(it.path), reason))
                errors.append(err_rows)
                summary.failed += len(err_rows)
                indices = list(batch.indices)
                if batch.x is not None and labels is not None:
                    keep = [j for j, i in enumerate(indices) if i in labels]
                    for i in indices:
                        if i not in labels:
                            it = disc.items[i]
                            reason = f"no entry in the labels file {cfg.target}"
                            errors.append([{"image": it.rel, "path": str(it.path), "reason": reason}])
                            summary.errors.append((str(it.path), reason))
                            summary.failed += 1
                    indices = [indices[j] for j in keep]
                    batch.x = batch.x[keep] if keep else None
                    batch.origs = [batch.origs[j] for j in keep]
                if batch.x is not None and len(indices):
                    _explain_batch(
                        cfg,
                        lm,
                        methods,
                        batch.x,
                        indices,
                        batch.origs,
                        disc,
                        labels,
                        device,
                        writer,
                        out,
                        summary,
                        metrics,
                    )
                if progress:
                    progress.advance(len(batch.indices) + len(batch.failures))
    finally:
        writer.close()
        if progress:
            progress.stop()
    if metrics is not None:
        summary.metrics = metrics.finish()
    summary.seconds = time.perf_counter() - t_start
    return summary


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _explain_batch(cfg, lm, methods, x_cpu, indices, origs, disc, labels, device, writer, out, summary, metrics=None):
    model = lm.model
    x = x_cpu.to(device, non_blocking=True)
    if labels is not None:
        target = torch.tensor([labels[i] for i in indices], dtype=torch.long, device=device)
    elif isinstance(cfg.target, int):
        target = torch.full((len(indices),), cfg.target, dtype=torch.long, device=device)
    else:
        target = None
    results = []
    on_device = {}  # maps still on the device, for the metrics
    logits = None
    for key, meth in methods:
        _sync(device)
        t0 = time.perf_counter()
        expl = meth.run(model, x, target)
        if metrics is not None:
            on_device[key] = expl.maps.detach()
        maps = expl.maps.detach().float().cpu()  # one transfer per batch and method
        dt = time.perf_counter() - t0
        summary.method_seconds[key] = summary.method_seconds.get(key, 0.0) + dt
        if logits is None and expl.logits is not None:
            logits = expl.logits
        results.append((key, maps, dt, expl.extras))
    if logits is None:
        with torch.no_grad():
            logits = model(x)
    probs = torch.softmax(logits.float(), dim=1).cpu()
    tgt = target.cpu() if target is not None else probs.argmax(dim=1)
    top_p, top_c = probs.max(dim=1)
    t_p = probs.gather(1, tgt[:, None])[:, 0]
    origs_np = [o.numpy() for o in origs]
    if metrics is not None:
        sizes = [(o.shape[1], o.shape[0]) for o in origs_np]
        metrics.add_batch(model, x, on_device, tgt.to(device), [disc.items[i] for i in indices], sizes)
    futures, rows = [], []
    for key, maps, dt, extras in results:
        finite = torch.isfinite(maps).flatten(1).all(dim=1)
        mins, maxs = maps.flatten(1).amin(1), maps.flatten(1).amax(1)
        for j, i in enumerate(indices):
            it = disc.items[i]
            row = {
                "image": it.rel,
                "method": key,
                "target_class": int(tgt[j]),
                "target_label": lm.label(int(tgt[j])),
                "target_prob": f"{float(t_p[j]):.6f}",
                "top1_class": int(top_c[j]),
                "top1_label": lm.label(int(top_c[j])),
                "top1_prob": f"{float(top_p[j]):.6f}",
                "seconds": f"{dt / len(indices):.6f}",
                "map_min": f"{float(mins[j]):.6g}",
                "map_max": f"{float(maxs[j]):.6g}",
                "status": "ok" if bool(finite[j]) else "nonfinite",
                "path": str(it.path.absolute()),
            }
            for name, vals in extras.items():
                row[name] = f"{float(vals[j]):.6g}"
            rows.append(row)
            if bool(finite[j]):
                h, w = origs_np[j].shape[:2]
                box = lm.preprocess.crop_box(w, h)
                futures.append(
                    writer.pool.submit(
                        _write_one, out, key, it.rel, maps[j].numpy(), origs_np[j], box, cfg.colormap, cfg.alpha
                    )
                )
    summary.done += len(indices)
    writer.submit(futures, rows)
