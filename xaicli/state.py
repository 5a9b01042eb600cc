"""What a run may skip, and who may write: resume planning, the config hash, the output lock.

Resume: an image is up to date when explanations.csv holds a row for every method of this
config with the image's current size and mtime, and its files exist. Everything else is done
(again). Rows of images about to be redone are dropped first (atomic rewrite), so a resumed run
never duplicates a row. A different config in the same output folder is refused (or, with
--force, its outputs are replaced), so results of two configs never mix.

Lock: `OUT/.xai.lock`, held with flock(2) for the whole run. The kernel releases it when the
process dies, even on SIGKILL, so a stale lock cannot block the next run; the file records the
holder's pid for the message.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import RunConfig, dump_config
from .data import ImageItem
from .errors import ConfigError, LockedError
from .outputs import (
    ERROR_FIELDS,
    EXPLANATION_FIELDS,
    atomic_write_bytes,
    map_paths,
    read_csv,
    read_run_yaml,
)

HASH_KEYS = ("model", "methods", "target", "input", "colormap", "alpha", "max_pixels")
LOCK_NAME = ".xai.lock"


def config_hash(cfg: RunConfig) -> str:
    """Hash of everything that changes the outputs (not device, batch size, workers or output)."""
    d = dump_config(cfg)
    doc = {k: d.get(k) for k in HASH_KEYS}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_of(key: str, n: int) -> int:
    """Deterministic shard of an image key: the same on every machine, whatever the listing order."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8", "surrogateescape")).digest()[:8], "big") % n


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    if spec is None:
        return None
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--shard: '{spec}' is not I/N (e.g. 0/3)") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard: '{spec}': need N >= 1 and 0 <= I < N")
    return i, n


# ----------------------------------------------------------------------------------------------
# lock
# ----------------------------------------------------------------------------------------------
class OutputLock:
    def __init__(self, out: Path, wait: bool = False, on_wait=None):
        self.path = out / LOCK_NAME
        self.wait = wait
        self.on_wait = on_wait
        self._f = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            if not self.wait:
                f.close()
                raise LockedError(
                    f"{self.path.parent} is in use by another xai run ({holder}); "
                    "use --wait to wait for it, or another --out"
                ) from None
            if self.on_wait:
                self.on_wait(holder)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._f = f
        return self

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            self._f.seek(0)
            self._f.truncate()
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None


# ----------------------------------------------------------------------------------------------
# resume plan
# ----------------------------------------------------------------------------------------------
def file_key(path: Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a source image, or None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _valid(row: dict, fields: list[str]) -> bool:
    """A whole row (a torn last line after a crash has missing fields)."""
    return all(row.get(f) is not None for f in fields) and None not in row


@dataclass
class Plan:
    todo: list[int]  # indices into the discovered items
    up_to_date: int = 0
    retry_failed: int = 0  # images that failed last time and are tried again
    replace_config: bool = False  # --force over a different config
    keys: dict[str, tuple[int, int] | None] = field(default_factory=dict)  # rel -> (size, mtime_ns)


def make_plan(out: Path, items: list[ImageItem], cfg: RunConfig, chash: str, force: bool) -> Plan:
    """Decide which images to (re)do. Pure: reads the output folder, writes nothing."""
    prev = read_run_yaml(out)
    prev_hash = prev.get("config_hash")
    keys = {it.rel: file_key(it.path) for it in items}
    if prev_hash and prev_hash != chash and not force:
        raise ConfigError(
            f"{out} holds results of a different config (hash {prev_hash}, this one {chash}); "
            "use another --out, or --force to replace them"
        )
    if force or (prev_hash and prev_hash != chash):
        return Plan(list(range(len(items))), replace_config=bool(prev_hash and prev_hash != chash), keys=keys)
    methods = [m.key for m in cfg.methods]
    done: dict[tuple[str, str], dict] = {}
    for r in read_csv(out / "explanations.csv"):
        if _valid(r, EXPLANATION_FIELDS):
            done[(r["image"], r["method"])] = r
    failed = {r["image"] for r in read_csv(out / "errors.csv") if _valid(r, ERROR_FIELDS)}
    todo, up = [], 0
    for i, it in enumerate(items):
        k = keys[it.rel]
        ok = k is not None
        for m in methods if ok else ():
            r = done.get((it.rel, m))
            if r is None or r["size"] != str(k[0]) or r["mtime_ns"] != str(k[1]):
                ok = False
                break
            if r["status"] == "ok" and not all(p.exists() for p in map_paths(out, m, it.rel)):
                ok = False
                break
        if ok:
            up += 1
        else:
            todo.append(i)
    return Plan(todo, up, sum(1 for i in todo if items[i].rel in failed), keys=keys)


def _rewrite_csv(path: Path, fields: list[str], keep) -> None:
    if not path.exists():
        return
    rows = [r for r in read_csv(path) if _valid(r, fields) and keep(r)]
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    wr.writeheader()
    wr.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def apply_plan(out: Path, items: list[ImageItem], plan: Plan, force: bool) -> None:
    """Prepare the folder for the plan: drop rows about to be redone, remove torn temp files."""
    prev = read_run_yaml(out)
    if plan.replace_config or force:
        # outputs of the previous config go; only folders that run created, never anything else
        old = [m.get("id") or m.get("name") for m in (prev.get("config") or {}).get("methods", [])]
        for name in old:
            d = (out / str(name)).resolve()
            if name and d.parent == out.resolve() and d.is_dir():
                shutil.rmtree(d)
        for f in ("explanations.csv", "errors.csv", "metrics.csv", "metrics_summary.csv"):
            (out / f).unlink(missing_ok=True)
    else:
        redo = {items[i].rel for i in plan.todo}
        _rewrite_csv(out / "explanations.csv", EXPLANATION_FIELDS, lambda r: r["image"] not in redo)
        _rewrite_csv(out / "errors.csv", ERROR_FIELDS, lambda r: r["image"] not in redo)
    for tmp in out.rglob(".tmp-*"):
        tmp.unlink(missing_ok=True)


class JsonLog:
    """OUT/xai-log.jsonl: one JSON object per line (run start/end, batches, errors) for cron."""

    def __init__(self, path: Path | None):
        self.path = path

    def event(self, kind: str, **fields) -> None:
        if self.path is None:
            return
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": kind, **fields}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=str, ensure_ascii=False) + "\n")
