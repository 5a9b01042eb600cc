"""`engine: ray`: the same batch step on Ray Data actors, the same output folder.

    driver (xai explain)                       Ray actors (an actor pool, one bound model each)
    discover -> plan (resume, --shard) -> lock
    work items ──► ray.data.from_items ──► map_batches(ExplainActor): decode -> explain_step ->
                                           MapSink writes OUT/<method>/<rel>.* (atomic renames)
    ◄── one result row per batch: its explanations.csv rows, errors.csv rows, log events, counts
    append the rows (the only CSV writer), progress, manifest

The driver holds OUT/.xai.lock (flock) for the whole run, as with the local engine, and is the
only process that appends to explanations.csv / errors.csv / xai-log.jsonl; actors only write map
files, each through a temporary name + rename. A batch's rows reach the driver after all its
files exist, so a killed driver (or actor) leaves files without rows, never rows without files;
the next run's plan redoes those images and overwrites their files. On a cluster, OUT and the
input images must be on a filesystem every node sees at the same path (NFS, a mounted bucket);
flock(2) on NFSv4 is a cluster-wide lock, on file systems without working flock give each run
its own --out (e.g. one per --shard).

The method specs, the RunConfig and the work items are plain picklable data; each actor loads
the model and binds the methods once (`spec.bind`), exactly as the local engine does.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from .data import ImageDataset, ImageItem, collate
from .engine import BatchResult, check_amp, drive, error_row, explain_step, precision, to_memory_format
from .errors import ConfigError

INSTALL_HINT = "engine: ray needs Ray Data: pip install 'xaicli[ray]' (or pip install 'ray[data]')"


def require_ray():
    """The ray module, or a ConfigError (exit 2) saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


class _Rows:
    """Stands in for a CsvAppender / ErrorSink / JsonLog inside an actor: collects what it gets."""

    def __init__(self):
        self.rows: list[dict] = []
        self.events: list[dict] = []

    def append(self, rows: list[dict]) -> None:
        self.rows += rows

    def fail(self, rows: list[dict]) -> None:
        self.rows += rows

    def event(self, name: str, **fields) -> None:
        self.events.append({"event": name, **fields})


class _Counts:
    """The RunSummary fields the MapSink updates, per batch."""

    def __init__(self):
        self.done = self.flagged = 0
        self.method_seconds: dict[str, float] = {}


class ExplainActor:
    """One Ray actor: the model loaded and every method bound once; each call explains a batch
    of work items and writes its map files through a MapSink."""

    def __init__(self, cfg, out: str, fields: list[str], style, threads: int):
        from PIL import Image

        from .methods.base import bind_methods, make_context
        from .models.registry import load_model_cfg, resolve_device
        from .ops import Chunker

        Image.MAX_IMAGE_PIXELS = (
            None  # the actor is our process: `max_pixels` (from the header) guards, as in the workers
        )
        if threads > 0:
            torch.set_num_threads(threads)
        self.cfg, self.out, self.fields, self.style = cfg, Path(out), fields, style
        self.device = resolve_device(cfg.device)
        check_amp(self.device, cfg.amp)
        self.lm = load_model_cfg(cfg.model, self.device)
        self.lm.model.eval()
        if cfg.channels_last:
            self.lm.model.to(memory_format=torch.channels_last)
        self.log = _Rows()
        self.chunker = Chunker(on_event=self.log.event, cap=cfg.cpu_chunk if self.device.type == "cpu" else None)
        ctx = make_context(self.lm, chunker=self.chunker, layer=cfg.model.layer)
        self.methods = bind_methods(cfg.specs(), ctx, cfg.fold_bn).methods  # as explain_run binds them
        if cfg.channels_last:
            for b in self.methods.values():
                b.model.to(memory_format=torch.channels_last)

    def __call__(self, batch: dict) -> dict:
        from .sinks import MapSink

        items = [ImageItem(Path(p), r) for p, r in zip(batch["path"], batch["rel"], strict=True)]
        keys = {r: (str(s), str(t)) for r, s, t in zip(batch["rel"], batch["size"], batch["mtime_ns"], strict=True)}
        targets = [int(t) for t in batch["target"]]
        ds = ImageDataset(
            items, self.lm.preprocess, self.cfg.max_pixels, None, self.cfg.overlay_max_side, self.cfg.draft
        )
        b = collate([ds[j] for j in range(len(items))])
        errors, counts, self.log.events = _Rows(), _Counts(), []
        errors.rows += [error_row(items[j], reason) for j, reason in b.failures]
        rows = _Rows()
        if b.x is not None and b.indices:
            x = b.x.to(self.device, non_blocking=True)
            target = torch.tensor([targets[j] for j in b.indices], device=self.device) if targets[0] >= 0 else None
            with precision(self.device, self.cfg.amp):
                tgt, logits, outputs = explain_step(
                    self.methods, to_memory_format(x, self.cfg.channels_last), target, self.chunker
                )
            result = BatchResult([items[j] for j in b.indices], x, b.origs, tgt, logits, outputs, b.sizes)
            fmt = (self.cfg.overlay_format, self.cfg.save_maps)
            sink = MapSink(
                self.out,
                self.lm,
                self.fields,
                keys,
                self.style,
                counts,
                self.log,
                errors,
                fmt,
                self.cfg.writers,
                score=self.cfg.score,
            )
            sink.table = rows  # the rows go back to the driver, which appends them
            try:
                sink.consume(result)
                sink.flush()  # every file of the batch exists before its rows leave the actor
            finally:
                sink.pool.shutdown(wait=True)
        doc = {
            "rows": rows.rows,
            "errors": errors.rows,
            "events": self.log.events,
            "n": len(items),
            "done": counts.done,
            "flagged": counts.flagged,
            "seconds": counts.method_seconds,
        }
        return {"result": np.array([json.dumps(doc)], dtype=object)}


def _actors(ray, device: torch.device) -> tuple[int, dict]:
    """(pool size, per-actor resources): one actor per GPU on CUDA, else one per CPU (1 thread each)."""
    res = ray.cluster_resources()
    if device.type == "cuda" and res.get("GPU", 0) >= 1:
        return int(res["GPU"]), {"num_gpus": 1, "num_cpus": 1}
    return max(1, int(res.get("CPU", 1))), {"num_cpus": 1}


def check_ray(cfg) -> None:
    """Before any work: ray importable, and nothing the Ray engine does not do yet."""
    if cfg.engine != "ray":
        return
    require_ray()
    if cfg.multi_target():
        raise ConfigError(
            f"engine: ray explains one target per image for now; target: {cfg.target} needs engine: local"
        )
    if cfg.target_fallback == "predicted":
        raise ConfigError("engine: ray does not do target_fallback: predicted yet; use engine: local")
    if cfg.metrics:
        raise ConfigError(
            "engine: ray does not compute metrics in the loop yet; drop --metrics and run `xai evaluate OUT` "
            "after the run (it reads the maps the actors wrote)"
        )


def run_ray(cfg, work: list[ImageItem], targets, missing: list[dict], sinks: list, summary, log, progress) -> str:
    """Explain `work` on a Ray actor pool; rows are appended by this process. Returns the status."""
    from .models.registry import resolve_device
    from .sinks import ErrorSink, MapSink

    ray = require_ray()
    errors = next(s for s in sinks if isinstance(s, ErrorSink))
    maps = next(s for s in sinks if isinstance(s, MapSink))
    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        started = True

    def start():
        from ray.data import ActorPoolStrategy, DataContext

        for name in ("ray", "ray.data"):  # Ray Data's INFO lines would interleave with the progress bar
            logging.getLogger(name).setLevel(logging.ERROR)
        dctx = DataContext.get_current()
        dctx.enable_progress_bars = False
        dctx.print_on_execution_start = False
        device = resolve_device(cfg.device)
        size, res = _actors(ray, device)
        if missing:
            errors.fail(missing)
            if progress:
                progress.advance(len(missing))
        log.event("ray_start", actors=size, resources=res, address=cfg.ray_address)
        if not work:
            return []
        tg = targets if targets is not None else [-1] * len(work)
        # the resume key (size, mtime_ns) travels with each item: actors never hold the whole plan
        key = lambda it: maps.keys.get(it.rel) or ("", "")  # noqa: E731
        data = ray.data.from_items(
            [
                {"path": str(it.path), "rel": it.rel, "target": int(t), "size": str(key(it)[0])}
                | {"mtime_ns": str(key(it)[1])}
                for it, t in zip(work, tg, strict=True)
            ]
        )
        args = (cfg, str(maps.out), maps.table.fields, maps.style, int(res.get("num_cpus", 1)))
        results = data.map_batches(
            ExplainActor,
            fn_constructor_args=args,
            batch_size=cfg.batch_size,
            compute=ActorPoolStrategy(size=size),
            batch_format="numpy",
            **res,
        )
        return results.iter_rows()

    def handle(out) -> None:
        _merge(json.loads(out["result"]), maps, errors, summary, log, progress)

    try:
        return drive(sinks, progress, len(work) + len(missing), start, handle)
    finally:
        if started:
            ray.shutdown()


def _merge(doc: dict, maps, errors, summary, log, progress) -> None:
    """One batch's results into the run: explanations.csv rows, errors, log events, counts."""
    maps.table.append(doc["rows"])
    if doc["errors"]:
        errors.fail(doc["errors"])
    for ev in doc["events"]:
        log.event(ev.pop("event"), **ev)
    summary.done += doc["done"]
    summary.flagged += doc["flagged"]
    for k, v in doc["seconds"].items():
        summary.method_seconds[k] = summary.method_seconds.get(k, 0.0) + v
    if progress:
        progress.advance(doc["n"])
