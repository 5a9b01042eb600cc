"""What a run may skip, and who may write: resume planning, the config hash, the output lock.

Resume: an (image, method) is up to date when explanations.csv holds its row(s) with the image's
current size and mtime, and its files exist; an image runs only the methods that are not
(`Plan.need`). Rows about to be redone are dropped first (atomic rewrite), so a resumed run
never duplicates a row. A config that only adds methods or changes display settings continues
the folder (config_parts); any other change is refused naming the keys (or, with --force, the
old outputs are replaced), so results of two configs never mix.

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

from .config import PREPROCESS_KEYS, RunConfig, dump_config, model_file
from .data import ImageItem
from .errors import ConfigError, StateError
from .locks import LOCK_NAME, OutputLock, close_inherited_locks  # noqa: F401  (re-exported)
from .methods import METHODS
from .outputs import (
    CORE_FIELDS,
    ERROR_FIELDS,
    MANIFEST,
    METRIC_FIELDS,
    READ_FIELDS,
    TMP_PREFIX,
    csv_header,
    csv_records,
    damaged,
    map_files,
    map_key,
    method_keys,
    read_csv,
    read_csv_report,
    read_run_yaml,
    write_csv,
)

HASH_KEYS = ("model", "methods", "target", "input", "colormap", "alpha", "max_pixels", "overlay")


def config_hash(cfg: RunConfig) -> str:
    """Hash of everything that changes the outputs (not device, batch size, workers or output).

    Display settings (colormap, alpha, the `overlay:` section) are in it because the overlay PNGs
    are outputs (config_parts splits them off: a change only redraws the PNGs). The overlay
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
    if cfg.overlay_max_side is not None:  # overlays drawn smaller than the original are other outputs
        doc["overlay_max_side"] = cfg.overlay_max_side
    # model keys added later count only when set, so the hash of a config without them stays
    doc["model"] = {k: v for k, v in doc["model"].items() if k not in PREPROCESS_KEYS or v is not None}
    doc.update(_new_keys(cfg))
    doc["files"] = _files(cfg)
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _new_keys(cfg: RunConfig) -> dict:
    """Keys added after the hash's first version, only when they differ from their defaults."""
    fields = type(cfg).model_fields
    return {k: getattr(cfg, k) for k in ("score", "threshold") if getattr(cfg, k) != fields[k].default}


def _files(cfg: RunConfig, methods=None) -> dict:
    """{path: (size, mtime_ns)} of the local files the config names (all, or only those of `methods`)."""
    if methods is None:
        files = [cfg.model.weights, cfg.model.class_names, cfg.target if isinstance(cfg.target, str) else None]
        files.append(model_file(cfg.model.name))
        methods = cfg.methods
    else:
        files = []
    files += [v for m in methods for v in METHODS[m.name].file_params(m.params).values()]
    return {f: file_key(Path(f)) for f in files if f and Path(f).is_file()}


def _digest(doc) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


BASE_KEYS = ("model", "target", "input", "max_pixels")  # + score, threshold: what every map depends on
DISPLAY_KEYS = ("colormap", "alpha", "overlay")  # only the PNGs depend on them: `xai render` redraws


def config_parts(cfg: RunConfig) -> dict:
    """The config hash in parts, for incremental runs (run.yaml `hashes:`):

    base       what every map depends on: model (and preprocessing), target, score, input, pixel
               limit, and the files they name; a change is refused (--force redoes all)
    methods    {key: hash} of each method's name, parameters and files: a new key is computed
               for every image, nothing else is; a changed or removed one is refused
    display    colormap, alpha, the overlay section: a change redraws the PNGs from the stored
               maps (`xai render`), nothing is recomputed
    """
    d = dump_config(cfg)
    base = {k: d.get(k) for k in BASE_KEYS}
    base["model"] = {k: v for k, v in base["model"].items() if k != "layer"}  # the layer is each method's
    base.update(_new_keys(cfg))
    base_files = _files(cfg, methods=[])
    base["files"] = base_files
    methods = {}
    for m, dm in zip(cfg.methods, d["methods"], strict=True):
        # the model's layer applies to CAM methods: it belongs to each method, not to the base
        doc = {"method": dm, "layer": cfg.model.layer, "files": _files(cfg, [m]) | {}}
        doc["files"] = {f: k for f, k in doc["files"].items() if f not in base_files}
        methods[m.key] = _digest(doc)
    return {
        "base": _digest(base),
        "methods": methods,
        "display": _digest(_display(cfg, d)),
        "files": {f: list(k) for f, k in _files(cfg).items()},
    }


def _display(cfg: RunConfig, d: dict) -> dict:
    """The display settings; overlay_max_side only when set (the hash of older configs stays)."""
    doc = {k: d.get(k) for k in DISPLAY_KEYS}
    if cfg.overlay_max_side is not None:
        doc["overlay_max_side"] = cfg.overlay_max_side
    return doc


def differing_keys(prev: dict, cfg: RunConfig) -> list[str]:
    """The config keys in which a previous run.yaml differs from `cfg` (for the refusal message)."""
    old = prev.get("config") or {}
    new = dump_config(cfg)
    out = []
    for k in (*BASE_KEYS, "score", "threshold"):
        a, b = old.get(k), new.get(k)
        if k in ("score", "threshold") and a is None:
            a = type(cfg).model_fields[k].default
        if isinstance(a, dict) and isinstance(b, dict):
            out += [
                f"{k}.{s}"
                for s in sorted(set(a) | set(b))
                if a.get(s) != b.get(s) and (a.get(s), b.get(s)) != (None, None)
            ]
        elif a != b:
            out.append(k)
    old_m = {(m.get("id") or m.get("name")): m for m in old.get("methods") or [] if isinstance(m, dict)}
    new_m = {(m.get("id") or m.get("name")): m for m in new["methods"]}
    out += [f"methods[{k}] (removed)" for k in old_m if k not in new_m]
    out += [f"methods[{k}]" for k in new_m if k in old_m and old_m[k] != new_m[k]]
    files = (prev.get("hashes") or {}).get("files") or {}
    now = _files(cfg)
    out += [f"{f} (file changed)" for f in files if f in now and list(now[f]) != list(files[f])]
    return out


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
    # rel -> the method keys to compute for that image (the others are up to date); an image of
    # `todo` that is not here gets every method
    need: dict[str, list[str]] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)  # methods new to this folder (computed for every image)
    redraw: bool = False  # display settings changed: redraw the PNGs of the maps not recomputed

    def limited(self, limit: int | None) -> list[int]:
        return self.todo[:limit] if limit is not None else self.todo


def _has_outputs(out: Path, prev: dict) -> bool:
    return bool(read_csv(out / "explanations.csv", CORE_FIELDS)) or any((out / n).is_dir() for n in method_keys(prev))


def make_plan(out: Path, items: list[ImageItem], cfg: RunConfig, chash: str, force: bool) -> Plan:
    """Decide which images to (re)do. Pure: reads the output folder, writes nothing.

    Redone: images without a row for every method, with a changed size/mtime, with a missing
    PNG/NPY, or whose last attempt failed (errors.csv, status oom). Rows flagged `nonfinite`
    stay (the same model gives the same NaN); --force redoes everything.
    """
    prev = read_run_yaml(out)
    prev_hash = prev.get("config_hash")
    prev_hash = str(prev_hash) if prev_hash is not None else None
    keys = {it.rel: file_key(it.path) for it in items}
    other = bool(prev_hash and prev_hash != chash)
    added, redraw = [], False
    if other and _has_outputs(out, prev):
        incremental = _incremental(prev, cfg)
        if incremental is not None and not force:
            added, redraw = incremental
            other = False
        elif not force:
            diff = differing_keys(prev, cfg)
            what = f"; changed: {', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}" if diff else ""
            raise ConfigError(
                f"{out} holds results of a different config (hash {prev_hash}, this one {chash}){what}; "
                "use another --out, or --force to replace them"
            )
    elif other:
        other = False  # an earlier --force replacement died before its run.yaml: nothing to keep
    if force or other:
        return Plan(list(range(len(items))), replace_config=other, keys=keys, previous=prev)
    methods = [m.key for m in cfg.methods]
    names = {
        key: spec.map_names or (None,) for key, spec in cfg.specs()
    }  # a spec's names may depend on its params (extremal areas, concept_maps' K)
    multi = cfg.multi_target()
    done: dict[tuple[str, str], dict[str, dict]] = {}  # (image, method) -> {map key: row}
    fmt = (cfg.overlay_format, cfg.save_maps)
    for r in read_csv(out / "explanations.csv", CORE_FIELDS):
        if _valid(r, CORE_FIELDS):
            done.setdefault((r["image"], r["method"]), {})[map_key(r["image"], r["target_class"], multi)] = r
    todo, up, need = [], 0, {}
    for i, it in enumerate(items):
        k = keys[it.rel]
        stale = [
            m
            for m in methods
            if k is None
            or not done.get((it.rel, m))
            or not all(_row_up_to_date(out, r, m, key, k, names[m], fmt) for key, r in done[(it.rel, m)].items())
        ]
        if not stale:
            up += 1
        else:
            todo.append(i)
            if len(stale) < len(methods):
                need[it.rel] = stale
    return Plan(todo, up, keys=keys, previous=prev, need=need, added=added, redraw=redraw)


def _incremental(prev: dict, cfg: RunConfig) -> tuple[list[str], bool] | None:
    """(methods added, display changed) when `cfg` differs from the folder's run.yaml only by new
    methods and display settings (the rest of the folder stays valid); None otherwise."""
    old = prev.get("hashes")
    if not isinstance(old, dict) or not isinstance(old.get("methods"), dict):
        return None  # a run.yaml of an earlier version: only its whole hash is known
    new = config_parts(cfg)
    if old.get("base") != new["base"]:
        return None
    if any(new["methods"].get(k) != h for k, h in old["methods"].items()):
        return None  # a method changed or was removed: its maps would be stale or orphaned
    return [k for k in new["methods"] if k not in old["methods"]], old.get("display") != new["display"]


def _row_up_to_date(out: Path, r: dict, method: str, key: str, k: tuple[int, int], names, fmt) -> bool:
    """A row of the current source file (size, mtime), not `oom`, with its files when `ok`
    (`fmt` = (overlay_format, save_maps): the files this config writes)."""
    if r["size"] != str(k[0]) or r["mtime_ns"] != str(k[1]) or r["status"] == "oom":
        return False
    return r["status"] != "ok" or all(p.exists() for n in names for p in map_files(out, method, key, n, fmt))


def _rewrite_csv(path: Path, fields: list[str], keep) -> None:
    """Keep the whole rows that `keep` accepts (the file's own columns; `fields` must be present)."""
    if not path.exists():
        return
    header = csv_header(path) or fields
    write_csv(path, header, [r for r in read_csv(path, fields) if _valid(r, fields) and keep(r)])


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
        names = method_keys(plan.previous)
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

        def keep(r) -> bool:
            if r["method"] not in keep_methods:
                return False
            if r["image"] in plan.need:  # only some methods of this image are redone
                return r["method"] not in plan.need[r["image"]]
            return r["image"] not in redo

        _rewrite_csv(out / "explanations.csv", CORE_FIELDS, keep)
        _rewrite_csv(out / "errors.csv", ERROR_FIELDS, lambda r: r["image"] not in redo)
    for tmp in out.rglob(TMP_PREFIX + "*"):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
    return trash


# ----------------------------------------------------------------------------------------------
# damaged state: detect (one line, exit 2) or --repair
# ----------------------------------------------------------------------------------------------
DAMAGED_DIR = ".xai-damaged"  # --repair moves damaged state files here (hidden: not in the manifest)
STATE_CSVS: dict[str, tuple[str, ...]] = {
    "explanations.csv": tuple(CORE_FIELDS),
    "errors.csv": tuple(ERROR_FIELDS),
    "metrics.csv": tuple(METRIC_FIELDS),
    ".metrics-partial.csv": tuple(METRIC_FIELDS),
    "metrics_summary.csv": ("method", "metric", "mean"),
}
# written whole at the end of a run (never read for state): only their kind is checked
WRITTEN_FILES = (MANIFEST, "xai-log.jsonl", "metrics_curves.csv", "sanity.csv")


def set_aside(out: Path, name: str) -> Path:
    """Move OUT/name into OUT/.xai-damaged/ (kept for a person to look at); returns the new path."""
    d = out / DAMAGED_DIR
    d.mkdir(exist_ok=True)
    dst = d / f"{name}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}"
    os.replace(out / name, dst)
    return dst


def _salvage_csv(path: Path, fields: list[str]) -> int:
    """Rewrite a CSV whose header is damaged with `fields`, keeping the lines that have exactly
    those fields (the original goes to OUT/.xai-damaged/). Returns the number of rows kept."""
    kept = [
        dict(zip(fields, rec, strict=True))
        for rec in csv_records(path)
        if rec is not None and len(rec) == len(fields) and rec != fields and "\0" not in "".join(rec)
    ]
    set_aside(path.parent, path.name)
    write_csv(path, fields, kept)
    return len(kept)


def repair_lock(out: Path) -> None:
    """--repair, before taking the lock: a .xai.lock that is not a regular file is set aside."""
    p = out / LOCK_NAME
    if (p.exists() or p.is_symlink()) and not p.is_file():
        set_aside(out, LOCK_NAME)


def check_state(
    out: Path, log=None, repair: bool = False, fields: dict[str, list[str]] | None = None, explain: bool = True
) -> dict:
    """Check every state file of OUT before a run uses it (call it under the lock).

    Damage (not a regular file, a CSV header without its columns, run.yaml that is not valid
    YAML / UTF-8 / a mapping) raises StateError naming the file and the fix; with `repair` the
    file is set aside in OUT/.xai-damaged/ instead and a CSV's whole rows are kept (`fields`:
    the columns to read a CSV with a damaged header by). Torn or garbage CSV lines are dropped
    by every reader; here they are counted and logged (`state_dropped_lines`). `explain`: check
    explanations.csv for the resume columns (else only for those the reader needs). Returns
    {file: what was done} for the log."""
    done: dict[str, str] = {}
    for name in WRITTEN_FILES:
        p = out / name
        if (p.exists() or p.is_symlink()) and not p.is_file():
            if not repair:
                raise damaged(p, "not a regular file")
            set_aside(out, name)
            done[name] = "set aside (not a regular file)"
    try:
        read_run_yaml(out)
    except StateError:
        if not repair:
            raise
        set_aside(out, "run.yaml")
        done["run.yaml"] = "set aside (damaged; rewritten by this run)"
    for name, required in STATE_CSVS.items():
        if name == "explanations.csv" and not explain:
            required = READ_FIELDS  # what the reader (xai evaluate) needs
        p = out / name
        try:
            _, dropped = read_csv_report(p, required)
        except StateError:
            if not repair:
                raise
            if p.is_file():
                n = _salvage_csv(p, (fields or {}).get(name) or list(required))
                done[name] = f"header rebuilt, {n} whole row(s) kept"
            else:
                set_aside(out, name)
                done[name] = "set aside (not a regular file)"
            continue
        if dropped:
            done[name] = f"{dropped} torn or garbage line(s) dropped"
            if repair:
                write_csv(p, csv_header(p) or list(required), read_csv(p, required))
    if log is not None:
        for name, what in done.items():
            log.event("state_dropped_lines" if "dropped" in what else "state_repaired", file=name, what=what)
    return done


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
