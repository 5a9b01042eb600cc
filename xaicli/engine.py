"""The engine: one pure batch step and one loop that feeds its results to sinks.

    DataLoader (decode in workers) ──► step(batch) ──► BatchResult ──► sinks (files, CSV, metrics)

`explain_step` is a pure function (tensors in, results out: maps, status, target, logits, extras,
seconds); it runs every bound method over the batch with the chunker's out-of-memory back-off
(halve the outer batch; an image that does not fit alone is flagged `oom`). A Ray Data worker or a
notebook can call it without the rest. `Engine.run` is the loop: progress, the JSON log, decode
failures to the error sink, Ctrl-C/SIGTERM (KeyboardInterrupt) after closing the sinks, so that
every finished batch stays on disk. `xai explain`, `xai explain --metrics` and `xai evaluate` are
wirings of these two (xaicli/explain_run.py, xaicli/evaluate.py); the sinks live in xaicli/sinks.py.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from .data import Batch, ImageItem, display_path
from .methods.base import BoundMethod
from .ops import Chunker

OK, NONFINITE, OOM = "ok", "nonfinite", "oom"
SKIP = "skip"  # the method did not run for this row (its map is up to date on disk): no row, no file


@dataclass
class MethodOutput:
    """One method's results for a batch, on the device."""

    maps: Tensor  # [B, H, W] or [B, K, H, W] float32; NaN for images that failed
    status: list[str]  # per image: ok | nonfinite | oom
    extras: dict[str, Tensor] = field(default_factory=dict)  # declared per-image values [B]
    seconds: float = 0.0  # device time for the whole batch
    names: tuple[str, ...] = ()  # K map names, () for a single map


@dataclass
class BatchResult:
    """What sinks consume: the batch and, per method key, its output."""

    items: list[ImageItem]
    x: Tensor  # [B, 3, H, W] on the device
    origs: list  # original pixels (HxWx3 uint8 tensors), for overlays and annotation boxes
    target: Tensor  # [B] the explained classes (on the device)
    logits: Tensor | None  # [B, C] of the clean batch (None when evaluating stored maps)
    outputs: dict[str, MethodOutput]
    sizes: list | None = None  # original (width, height) per image, from the header (None: the origs' sizes)
    # the map key of each row (outputs.map_key: `<rel>__<class>` when a run explains several
    # targets per image, each image then has one row per target); None: each item's rel
    keys: list[str] | None = None

    def key(self, j: int) -> str:
        return self.keys[j] if self.keys is not None else self.items[j].rel

    def size(self, j: int) -> tuple[int, int]:
        """Original (width, height) of image j: annotation boxes are in these coordinates."""
        if self.sizes:
            return tuple(self.sizes[j])
        return int(self.origs[j].shape[1]), int(self.origs[j].shape[0])


class Sink(Protocol):
    def consume(self, result: BatchResult) -> None: ...

    def fail(self, rows: list[dict]) -> None: ...  # images that could not be decoded / targeted

    def close(self, status: str) -> None: ...


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_method(key: str, bound: BoundMethod, x: Tensor, target: Tensor | None, chunker: Chunker):
    """(MethodOutput without timing, logits or None) of one method over the batch, with back-off."""

    def part(start: int, end: int):
        return bound(x[start:end], target[start:end] if target is not None else None)

    parts = chunker.split(key, x.shape[0], part, x.device)
    ok = [r for r, _ in parts if r is not None]
    names = tuple(bound.spec.map_names)
    shape = tuple(ok[0].maps.shape[1:]) if ok else ((len(names),) if names else ()) + tuple(x.shape[-2:])
    maps = torch.cat([r.maps.float() if r is not None else _nan((n, *shape), x) for r, n in parts])
    logits = None
    if ok and all(r is None or r.logits is not None for r, _ in parts):
        c = ok[0].logits.shape[1]
        logits = torch.cat([r.logits.float() if r is not None else _nan((n, c), x) for r, n in parts])
    extras = {
        e: torch.cat([r.extras[e].float() if r is not None and e in r.extras else _nan((n,), x) for r, n in parts])
        for e in bound.spec.extras
        if any(e in r.extras for r in ok)
    }
    failed = [r is None for r, n in parts for _ in range(n)]
    finite = torch.isfinite(maps).flatten(1).all(dim=1).tolist()
    status = [OOM if f else (OK if fin else NONFINITE) for f, fin in zip(failed, finite, strict=True)]
    return MethodOutput(maps, status, extras, names=names), logits


def _nan(shape, like: Tensor) -> Tensor:
    return torch.full(shape, float("nan"), device=like.device)


def plain_logits(model, x: Tensor, chunker: Chunker) -> Tensor:
    """A forward pass with the same back-off, for batches where no method returned logits."""

    def fwd(start: int, end: int) -> Tensor:
        with torch.no_grad():
            return model(x[start:end]).float()

    parts = chunker.split("forward", x.shape[0], fwd, x.device)
    c = next((p.shape[1] for p, _ in parts if p is not None), 1)
    return torch.cat([p if p is not None else _nan((n, c), x) for p, n in parts])


def explain_step(
    methods: dict[str, BoundMethod],
    x: Tensor,
    target: Tensor | None,
    chunker: Chunker,
    need: dict[str, list[int]] | None = None,
    on_method: Callable[[int], None] | None = None,
) -> tuple[Tensor, Tensor, dict[str, MethodOutput]]:
    """The pure batch step: (target [B], logits [B, C], {key: MethodOutput}) for a batch on the device.

    `need` (incremental runs): {key: indices of the batch} for the methods that run on only part
    of it (the other images' maps of that method are up to date); their rows get status SKIP.
    `on_method(i)` hears when the i-th method starts (inner progress)."""
    need = need or {}
    outputs, logits = {}, None
    if target is None and any(len(v) < x.shape[0] for v in need.values()):
        logits = plain_logits(next(iter(methods.values())).model, x, chunker)  # the predicted class of every image
        target = logits.argmax(dim=1)
    for i, (key, bound) in enumerate(methods.items()):
        if on_method is not None:
            on_method(i)
        idx = need.get(key)
        if idx is not None and len(idx) == x.shape[0]:
            idx = None
        if idx is not None and not len(idx):
            outputs[key] = _skipped(bound, x)
            continue
        sync(x.device)
        t0 = time.perf_counter()
        if idx is None:
            out, lg = run_method(key, bound, x, target, chunker)
        else:
            sel = torch.tensor(idx, device=x.device, dtype=torch.long)
            part, lg = run_method(key, bound, x[sel], target[sel] if target is not None else None, chunker)
            out, lg = _scatter(part, sel, x), None
        sync(x.device)
        out.seconds = time.perf_counter() - t0
        outputs[key] = out
        if logits is None and lg is not None and torch.isfinite(lg).all():
            logits = lg
    if logits is None:
        logits = plain_logits(next(iter(methods.values())).model, x, chunker)
    tgt = target if target is not None else logits.argmax(dim=1)
    return tgt, logits, outputs


def _skipped(bound: BoundMethod, x: Tensor) -> MethodOutput:
    names = tuple(bound.spec.map_names)
    maps = _nan((x.shape[0], *((len(names),) if names else ()), *x.shape[-2:]), x)
    return MethodOutput(maps, [SKIP] * x.shape[0], {}, names=names)


def _scatter(part: MethodOutput, sel: Tensor, x: Tensor) -> MethodOutput:
    """A method's output on the rows `sel` of the batch, as a whole-batch output (SKIP elsewhere)."""
    maps = _nan((x.shape[0], *part.maps.shape[1:]), x)
    maps[sel] = part.maps
    status = [SKIP] * x.shape[0]
    for j, st in zip(sel.tolist(), part.status, strict=True):
        status[j] = st
    extras = {}
    for e, v in part.extras.items():
        extras[e] = _nan((x.shape[0],), x)
        extras[e][sel] = v.float()
    return MethodOutput(maps, status, extras, names=part.names)


def check_amp(device: torch.device, amp: str) -> None:
    """Refuse `amp: bf16` where this torch and device cannot autocast to bfloat16 (ConfigError, exit 2)."""
    if amp != "bf16":
        return
    from .errors import ConfigError

    ok = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if not ok:
        raise ConfigError(f"amp: bf16 is not supported on {device} by this torch; use amp: none")


@contextmanager
def precision(device: torch.device, amp: str = "none") -> Iterator[None]:
    """Autocast the step to bfloat16 with `amp: bf16`; a no-op otherwise. Maps, logits and extras
    come back as float32 (run_method converts), so sinks and metrics see the same dtypes."""
    if amp == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def to_memory_format(x: Tensor, channels_last: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@contextmanager
def deferred_interrupts() -> Iterator[Callable[[], bool]]:
    """Ctrl-C / SIGTERM while the loop runs stop it at the next batch boundary, so no batch is half
    written; a second signal stops at once. Yields `stop()`: whether a signal came. The decode
    workers ignore both signals (data._worker_init), so they never die under the loop."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hits: list[int] = []

    def handler(signum, _frame):
        if hits:
            raise KeyboardInterrupt
        hits.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(hits)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def drive(sinks: list[Sink], progress, total: int, start: Callable[[], Iterable], handle: Callable) -> str:
    """The frame of every explain loop (Engine.run, the Ray driver): progress started, `start()`
    (set-up; returns what to iterate), `handle(each)` per element with Ctrl-C/SIGTERM deferred to
    the next element (deferred_interrupts), then every sink closed in reverse with the final status
    (done | interrupted | error) and progress stopped. Returns "done"; an interrupt or error is
    re-raised after the sinks are closed, so every finished batch stays on disk."""
    status = "error"
    if progress:
        progress.start(total)
    try:
        source = start()
        with deferred_interrupts() as stop:
            for each in source:
                handle(each)
                if stop():
                    raise KeyboardInterrupt
        status = "done"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        # in reverse: the map sink (last) flushes explanations.csv before the metric sink's
        # summaries read it; consume() runs in order, so metric rows reach disk first
        for s in reversed(sinks):
            s.close(status)
        if progress:
            progress.stop()
    return status


class Engine:
    """The loop: batches from a loader -> `step` -> every sink; progress and the JSON log around it."""

    def __init__(self, step, sinks: list[Sink], device: torch.device, progress=None, log=None):
        self.step = step  # (x on device, target on device or None, batch) -> BatchResult
        self.sinks = sinks
        self.device = device
        self.progress = progress
        self.log = log

    def run(self, loader, items: list[ImageItem], failed: list[dict] | None = None, total: int | None = None) -> str:
        """Consume the loader; returns the final status (done | interrupted | error)."""

        def start():
            if failed:
                self._fail(failed)
            return loader

        n = total if total is not None else len(items)
        return drive(self.sinks, self.progress, n, start, lambda batch: self._batch(batch, items))

    def _fail(self, rows: list[dict]) -> None:
        for s in self.sinks:
            s.fail(rows)
        if self.progress:
            self.progress.advance(len(rows))

    def _batch(self, batch: Batch, items: list[ImageItem]) -> None:
        if batch.failures:
            self._fail([error_row(items[i], reason) for i, reason in batch.failures])
        if batch.x is None or not batch.indices:
            return
        x = batch.x.to(self.device, non_blocking=True)
        result = self.step(x, batch)
        for s in self.sinks:
            s.consume(result)
        if self.progress:
            self.progress.advance(len(batch.indices))


def error_row(it: ImageItem, reason: str) -> dict:
    return {"image": it.rel, "path": display_path(it.path), "reason": reason}
