"""What a run may skip, and who may write: resume planning, the config hash, the output lock.

Resume: an image is up to date when explanations.csv holds a row for every method of this
config with the image's current size and mtime, and its files exist. Everything else is done
(again). Rows of images about to be redone are dropped first (atomic rewrite), so a resumed run
never duplicates a row. A different config in the same output folder is refused (or, with
--force, its outputs are replaced), so results of two configs never mix.

The output lock lives in xaicli/locks.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import RunConfig, dump_config
from .data import ImageItem
from .errors import ConfigError
from .locks import LOCK_NAME, OutputLock, close_inherited_locks  # noqa: F401  (re-exported)
from .methods import METHODS
from .outputs import (
    CORE_FIELDS,
    ERROR_FIELDS,
    TMP_PREFIX,
    csv_header,
    map_paths,
    read_csv,
    read_run_yaml,
    write_csv,
)

HASH_KEYS = ("model", "methods", "target", "input", "colormap", "alpha", "max_pixels", "overlay")


def config_hash(cfg: RunConfig) -> str:
    """Hash of everything that changes the outputs (not device, batch size, workers or output).

    Display settings (colormap, alpha, the `overlay:` section) are in it because the overlay PNGs
    are outputs: a folder drawn with other settings is refused (--force redraws it). The overlay
    section counts only when it differs from its defaults, so the hash of a config without it is
    the one earlier versions computed. `sheet` is not in it: sheets are rebuilt from the overlays.

    Local files the config names (a checkpoint, a labels file, class names, a method's path
    parameter such as IG's image baseline) count by size and mtime, so a retrained checkpoint at
    the same path makes every image stale.
    """
    d = dump_config(cfg)
    doc = {k: d.get(k) for k in HASH_KEYS}
    if cfg.overlay == type(cfg.overlay)():  # the default overlay section: the hash of older configs stays
        del doc["overlay"]
    files = [cfg.model.weights, cfg.model.class_names, cfg.target if isinstance(cfg.target, str) else None]
    files += [v for m in cfg.methods for v in METHODS[m.name].file_params(m.params).values()]
    doc["files"] = {f: file_key(Path(f)) for f in files if f and Path(f).is_file()}
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
    replace_config: bool = False  # the folder holds another config's outputs and they go
    keys: dict[str, tuple[int, int] | None] = field(default_factory=dict)  # rel -> (size, mtime_ns)
    previous: dict = field(default_factory=dict)  # the previous run.yaml

    def limited(self, limit: int | None) -> list[int]:
        return self.todo[:limit] if limit is not None else self.todo


def _has_outputs(out: Path, prev: dict) -> bool:
    names = [m.get("id") or m.get("name") for m in (prev.get("config") or {}).get("methods", [])]
    return bool(read_csv(out / "explanations.csv")) or any((out / str(n)).is_dir() for n in names if n)


def make_plan(out: Path, items: list[ImageItem], cfg: RunConfig, chash: str, force: bool) -> Plan:
    """Decide which images to (re)do. Pure: reads the output folder, writes nothing.

    Redone: images without a row for every method, with a changed size/mtime, with a missing
    PNG/NPY, or whose last attempt failed (errors.csv, status oom). Rows flagged `nonfinite`
    stay (the same model gives the same NaN); --force redoes everything.
    """
    prev = read_run_yaml(out)
    prev_hash = prev.get("config_hash")
    keys = {it.rel: file_key(it.path) for it in items}
    other = bool(prev_hash and prev_hash != chash)
    if other and _has_outputs(out, prev):
        if not force:
            raise ConfigError(
                f"{out} holds results of a different config (hash {prev_hash}, this one {chash}); "
                "use another --out, or --force to replace them"
            )
    elif other:
        other = False  # an earlier --force replacement died before its run.yaml: nothing to keep
    if force or other:
        return Plan(list(range(len(items))), replace_config=other, keys=keys, previous=prev)
    methods = [m.key for m in cfg.methods]
    names = {m.key: METHODS[m.name].map_names or (None,) for m in cfg.methods}
    done: dict[tuple[str, str], dict] = {}
    for r in read_csv(out / "explanations.csv"):
        if _valid(r, CORE_FIELDS):
            done[(r["image"], r["method"])] = r
    todo, up = [], 0
    for i, it in enumerate(items):
        k = keys[it.rel]
        ok = k is not None
        for m in methods if ok else ():
            r = done.get((it.rel, m))
            if r is None or r["size"] != str(k[0]) or r["mtime_ns"] != str(k[1]) or r["status"] == "oom":
                ok = False
                break
            if r["status"] == "ok" and not all(p.exists() for n in names[m] for p in map_paths(out, m, it.rel, n)):
                ok = False
                break
        if ok:
            up += 1
        else:
            todo.append(i)
    return Plan(todo, up, keys=keys, previous=prev)


def _rewrite_csv(path: Path, fields: list[str], keep) -> None:
    """Keep the whole rows that `keep` accepts (the file's own columns; `fields` must be present)."""
    if not path.exists():
        return
    header = csv_header(path) or fields
    write_csv(path, header, [r for r in read_csv(path) if _valid(r, fields) and keep(r)])


TRASH_PREFIX = ".xai-trash-"


def apply_plan(out: Path, items: list[ImageItem], plan: Plan, todo: list[int], methods: list[str]) -> Path | None:
    """Prepare the folder for the images about to be (re)done; returns a trash folder to delete later.

    Same config: drop the rows of the images in `todo` (and rows of methods no longer in the
    config), remove torn temp files. Another config (--force): move its method folders into a
    trash folder (a rename: instant) and drop its CSVs; the caller writes the new run.yaml and
    then deletes the trash, so a kill at any point leaves a folder the next run can continue.
    """
    for old in out.glob(TRASH_PREFIX + "*"):
        shutil.rmtree(old, ignore_errors=True)
    trash = None
    if plan.replace_config:
        names = [m.get("id") or m.get("name") for m in (plan.previous.get("config") or {}).get("methods", [])]
        trash = out / f"{TRASH_PREFIX}{os.getpid()}"
        for name in names:
            d = out / str(name)
            if name and d.is_dir() and not d.is_symlink() and d.resolve().parent == out.resolve():
                trash.mkdir(exist_ok=True)
                os.replace(d, trash / d.name)
        for f in ("explanations.csv", "errors.csv", "metrics.csv", "metrics_summary.csv"):
            (out / f).unlink(missing_ok=True)
    else:
        redo = {items[i].rel for i in todo}
        keep_methods = set(methods)
        _rewrite_csv(
            out / "explanations.csv",
            CORE_FIELDS,
            lambda r: r["image"] not in redo and r["method"] in keep_methods,
        )
        _rewrite_csv(out / "errors.csv", ERROR_FIELDS, lambda r: r["image"] not in redo)
    for tmp in out.rglob(TMP_PREFIX + "*"):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
    return trash


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
