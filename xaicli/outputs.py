"""The output layout (a contract that `xai evaluate`, the report and users' scripts rely on) and
its writers. xaicli/reader.py reads the same layout back.

    OUT/run.yaml                      resolved config, resolved layers/device, package versions
    OUT/manifest.json                 what the run wrote (files, map folders, metric outputs)
    OUT/explanations.csv              one row per (image, method); columns: CORE_FIELDS plus the
                                      extras the run's methods declare (e.g. IG's `delta`)
    OUT/errors.csv                    images that could not be processed (path, reason)
    OUT/<method>/<rel>.png            heatmap overlay at the original resolution (overlay_format:
                                      .jpg/.webp; overlay_max_side: longer side at most N pixels)
    OUT/<method>/<rel>.npy            raw map, float32, HxW of the model input, unnormalized
                                      (save_maps: npz-f16 -> .npz with float16 `map` x `scale`;
                                      save_maps: false -> no raw map file)
    OUT/<method>/<rel>/<name>.png|npy the same for a method that returns K named maps per image
    OUT/<method>/<rel>__<class>.png|.npy  (and <rel>__<class>/<name>.*) when the run explains
                                      several targets per image (map_key): one row per target
    OUT/concepts/                     `xai concepts tcav|extract` (xaicli/concepts/, docs/concepts.md)

Files are written to a temporary name in the same folder and renamed (atomic on POSIX); CSV
rows are appended whole and flushed (fsync) at batch boundaries; a whole CSV is only ever
rewritten through `write_csv` (temporary file + rename). Readers never trust the folder: a
torn or garbage CSV line is dropped, a damaged file is a StateError naming the file and the fix.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from .errors import StateError
from .ops import display01

_HEAD = [
    "image",
    "method",
    "target_class",
    "target_label",
    "target_prob",
    "top1_class",
    "top1_label",
    "top1_prob",
    "seconds",
    "map_min",
    "map_max",
    "status",
]
_TAIL = [
    "path",  # the source file
    "size",  # source size in bytes and mtime (ns) when processed: the resume key
    "mtime_ns",
]
CORE_FIELDS = _HEAD + _TAIL
READ_FIELDS = ("image", "method", "status")  # what reader.RunFolder needs of explanations.csv
# every name the layout uses at the top of OUT (a method id, i.e. its folder, may not be one)
RESERVED_NAMES = (
    "run.yaml",
    "manifest.json",
    "explanations.csv",
    "errors.csv",
    "metrics.csv",
    "metrics_summary.csv",
    "metrics_curves.csv",
    "sanity.csv",
    "xai-log.jsonl",
    "visualizations.csv",
    "visualize",
    "sheets",
    "report",
    "report.html",
    "concepts",  # xai concepts (docs/concepts.md)
)


def is_reserved(name: str) -> bool:
    """A top-level name of the layout (case-insensitive: some file systems are)."""
    n = name.lower()
    return n in RESERVED_NAMES or n.startswith(("metrics_", "sanity_", "metrics.", "xai-log", ".xai"))


ERROR_FIELDS = ["image", "path", "reason"]
METRIC_FIELDS = ["image", "method", "metric", "value"]
MANIFEST = "manifest.json"


def explanation_fields(extras: list[str] | tuple[str, ...] = ()) -> list[str]:
    """explanations.csv's columns: the core ones with the methods' declared extras before `path`."""
    return _HEAD + [e for e in dict.fromkeys(extras) if e not in CORE_FIELDS] + _TAIL


def map_key(rel: str, target: int | str | None = None, multi: bool = False) -> str:
    """The key of one map under OUT/<method>/: the image's `rel`, or `<rel>__<class>` (class index)
    in a run that explains several targets per image (topk:K, positives, multi-label files)."""
    return f"{rel}__{target}" if multi else rel


OVERLAY_FORMATS = ("png", "jpg", "webp")  # the config's overlay_format
MAP_FORMATS = {"npy": ".npy", "npz-f16": ".npz"}  # the config's save_maps (False: no raw map file)


def map_paths(
    out: Path, method: str, rel: str, name: str | None = None, overlay_format: str = "png", save_maps="npy"
) -> tuple[Path, Path | None]:
    """(overlay, raw map) of one map: OUT/<method>/<rel>.png|.jpg|.webp and .npy|.npz (None when
    save_maps is False); OUT/<method>/<rel>/<name>.<ext> for named maps."""
    base = out / method / rel
    if name is not None:
        base = base / name
    raw = base.with_name(base.name + MAP_FORMATS[save_maps]) if save_maps else None
    return base.with_name(f"{base.name}.{overlay_format}"), raw


def map_files(out: Path, method: str, rel: str, name: str | None = None, fmt: tuple = ("png", "npy")) -> list[Path]:
    """The files one map has on disk under the formats `fmt` = (overlay_format, save_maps)."""
    return [p for p in map_paths(out, method, rel, name, *fmt) if p is not None]


def ensure_inside(out: Path, path: Path) -> None:
    """Refuse to write through a symlink (or anything else) that leads out of the output folder.

    Checked on the nearest existing ancestor before any folder is created.
    """
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.resolve().is_relative_to(out.resolve()):
        raise PermissionError(f"refusing to write {path}: it resolves outside the output folder {out}")
    path.parent.mkdir(parents=True, exist_ok=True)


TMP_PREFIX = ".xai-tmp-"  # output keys never start with it (data.safe_rel), so cleanup is safe


def save_figure(fig, path: Path) -> Path:
    """A matplotlib figure laid out, written as PNG atomically, and closed (curves, sanity, TCAV)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX, suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32))
    atomic_write_bytes(path, buf.getvalue())


def save_npz_f16(path: Path, arr: np.ndarray) -> None:
    """The map as float16 scaled by its largest magnitude (stored as `scale`, float32), so that no
    value overflows float16; `load_map_file` multiplies it back (relative error ~5e-4)."""
    a = np.ascontiguousarray(arr, dtype=np.float32)
    finite = a[np.isfinite(a)]
    scale = float(np.abs(finite).max()) if finite.size else 1.0
    scale = scale if scale > 0 else 1.0
    buf = io.BytesIO()
    np.savez_compressed(buf, map=(a / scale).astype(np.float16), scale=np.float32(scale))
    atomic_write_bytes(path, buf.getvalue())


def save_map(path: Path, arr: np.ndarray) -> None:
    """A raw map in the format its suffix names: .npy (float32) or .npz (float16, see save_npz_f16)."""
    (save_npz_f16 if path.suffix == ".npz" else save_npy)(path, arr)


def load_map_file(path: Path) -> np.ndarray:
    """float32 array of a .npy or .npz map file."""
    if path.suffix == ".npz":
        with np.load(path) as z:
            return z["map"].astype(np.float32) * np.float32(z["scale"])
    return np.load(path).astype(np.float32, copy=False)


def save_png(path: Path, rgb: np.ndarray) -> None:
    # compress_level 1: about 3x faster than PIL's default 6 on photos, files ~10-15 % larger
    save_image(path, rgb, "png")


def save_image(path: Path, rgb: np.ndarray, fmt: str = "png") -> None:
    """An overlay (HxWx3 uint8) as png (fast zlib level), jpg (quality 90) or webp (quality 85)."""
    buf = io.BytesIO()
    im = Image.fromarray(rgb)
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=1)
    elif fmt == "jpg":
        im.save(buf, format="JPEG", quality=90)
    elif fmt == "webp":
        im.save(buf, format="WEBP", quality=85, method=0)
    else:
        raise ValueError(f"unknown overlay format {fmt!r} (allowed: {', '.join(OVERLAY_FORMATS)})")
    atomic_write_bytes(path, buf.getvalue())


@lru_cache(maxsize=16)
def colormap_lut(name: str) -> np.ndarray:
    """256x3 uint8 lookup table of a matplotlib colormap."""
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return (cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


def overlay(
    orig: np.ndarray,
    cam: np.ndarray,
    box,
    cmap: str = "jet",
    alpha: float = 0.5,
    kind: str = "positive",
    clip_percentile: float = 99.5,
) -> np.ndarray:
    """Heatmap over the original image at its own resolution.

    `cam` is the map over the model input; `box` (left, top, right, bottom) is where that input
    lies in the original image (the centre crop). Outside the box the model saw nothing, so the
    original is shown dimmed there. The map is scaled for display by its kind (ops.display01:
    min-max, percentile-clipped magnitude, or signed around the colormap's centre). A signed map's
    opacity grows with |attribution| (alpha from a quarter of the clip scale up): zero shows the photo,
    not the colormap's centre washed over it.
    """
    h, w = orig.shape[:2]
    left, top, right, bottom = (int(round(v)) for v in box)
    left, top = max(left, 0), max(top, 0)
    right, bottom = min(max(right, left + 1), w), min(max(bottom, top + 1), h)
    t = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None]
    m = np.ascontiguousarray(display01(t, kind, clip_percentile)[0].numpy())
    size = (right - left, bottom - top)
    resized = m if m.shape[::-1] == size else np.asarray(Image.fromarray(m, mode="F").resize(size, Image.BILINEAR))
    idx = np.clip(resized * 255.0 + 0.5, 0, 255).astype(np.uint8)
    # the same pixels as float32 arithmetic (floor(x * 0.5) outside, floor(r (1-a) + c a + 0.5) inside),
    # computed 5x faster: a take on the LUT, a shift, and for alpha 0.5 (the default) integer halving
    color = np.take(colormap_lut(cmap), idx, axis=0)
    out = orig >> 1  # dimmed outside the crop
    region = orig[top:bottom, left:right]
    if kind != "signed" and alpha == 0.5:
        out[top:bottom, left:right] = (region.astype(np.uint16) + color + 1) >> 1
    else:
        a = alpha
        if kind == "signed":  # opacity follows the strength, so zero attribution leaves the photo as it is
            a = alpha * np.minimum(1.0, 4.0 * np.abs(resized * 2.0 - 1.0))[..., None]  # full from 1/4 of the clip scale
        mix = region.astype(np.float32) * (1.0 - a) + color.astype(np.float32) * a + 0.5
        out[top:bottom, left:right] = mix.astype(np.uint8)
    return out


@lru_cache(maxsize=8)
def font_of(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def caption_strip(
    img: np.ndarray, text: str | None, cmap: str | None = None, kind: str = "positive", min_height: int = 18
) -> np.ndarray:
    """`img` with a dark strip below it: the caption `text` (method, class, probability) on the
    left and, with `cmap`, a colorbar on the right (labelled low..high, or -0+ for signed maps)."""
    from PIL import ImageDraw

    h, w = img.shape[:2]
    sh = max(min_height, min(48, h // 14))
    fs = max(10, sh - 6)
    strip = Image.new("RGB", (w, sh), (32, 32, 32))
    draw = ImageDraw.Draw(strip)
    bar_w = max(40, min(160, w // 4)) if cmap else 0
    if text:
        font, room = font_of(fs), w - 8 - (bar_w + 8 if cmap else 0)
        while len(text) > 1 and draw.textlength(text, font=font) > room:
            text = text[:-2] + "…"
        draw.text((4, max(0, (sh - fs) // 2 - 1)), text, fill=(245, 245, 245), font=font)
    if cmap:
        lut = colormap_lut(cmap)[np.linspace(0, 255, bar_w).round().astype(int)]
        bar = np.repeat(lut[None], max(4, sh // 3), axis=0)
        x0 = w - bar_w - 4
        strip.paste(Image.fromarray(bar), (x0, 2))
        lo, hi = ("-", "+") if kind == "signed" else ("low", "high")
        small = font_of(max(8, fs * 2 // 3))
        y = 2 + bar.shape[0]
        draw.text((x0, y), lo, fill=(230, 230, 230), font=small)
        draw.text((x0 + bar_w - draw.textlength(hi, font=small), y), hi, fill=(230, 230, 230), font=small)
        if kind == "signed":
            draw.text((x0 + bar_w / 2 - draw.textlength("0", font=small) / 2, y), "0", fill=(230, 230, 230), font=small)
    return np.concatenate([img, np.asarray(strip)], axis=0)


def write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    """THE whole-file CSV write: header + rows to a temporary file, then renamed over `path`."""
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    wr.writeheader()
    wr.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def csv_header(path: Path) -> list[str] | None:
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            return next(csv.reader(f), None)
    except (OSError, csv.Error):
        return None


class CsvAppender:
    """Append whole rows to a CSV, writing the header once; flush + fsync on every append.

    A file written with other columns (a method set with other extras, an older version) is
    rewritten once with this appender's columns before the first append."""

    def __init__(self, path: Path, fields: list[str]):
        self.path = path
        self.fields = fields
        self._checked = False

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        new = not self.path.exists() or self.path.stat().st_size == 0
        if not new and not self._checked and csv_header(self.path) != self.fields:
            write_csv(self.path, self.fields, read_csv(self.path))
        self._checked = True
        buf = io.StringIO()
        wr = csv.DictWriter(buf, fieldnames=self.fields, extrasaction="ignore", lineterminator="\n")
        if new:
            wr.writeheader()
        wr.writerows(rows)
        with open(self.path, "a", encoding="utf-8", errors="replace", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())


REPAIR_HINT = "run `xai explain` again with --repair to rebuild the folder's state from the maps on disk"


def damaged(path: Path, why: str, fix: str = REPAIR_HINT) -> StateError:
    """The one-line error of a damaged state file: the file, what is wrong, the fix."""
    return StateError(f"{path}: damaged state file ({why}); {fix}")


def read_csv_report(path: Path, required: tuple[str, ...] | list[str] = ()) -> tuple[list[dict], int]:
    """(whole rows, number of lines dropped) of a CSV in the output folder.

    A torn or garbage line (wrong number of fields, a field over the csv module's limit, an
    unterminated quote) is dropped and counted, never fatal. A file that is not a regular file,
    or whose header lacks the `required` columns, raises StateError (exit 2, names the fix)."""
    if not path.exists() and not path.is_symlink():
        return [], 0
    if not path.is_file():
        raise damaged(path, "not a regular file")
    rows: list[dict] = []
    dropped = 0
    header = None
    for rec in csv_records(path):
        if rec is None:  # a line the csv module cannot read
            dropped += 1
            if header is None:
                header = []  # an unreadable header: every row is unusable
            continue
        if header is None:
            header = rec
            continue
        if len(rec) != len(header) or "\0" in "".join(rec):
            dropped += 1
            continue
        rows.append(dict(zip(header, rec, strict=True)))
    if header is None:
        return [], dropped
    missing = [c for c in required if c not in header]
    if missing or len(set(header)) != len(header):
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise damaged(path, f"its header lacks the column(s) {shown}" if missing else "duplicate columns")
    return rows, dropped


def csv_records(path: Path):
    """The raw records of a CSV, one list of fields per line; None for a line the csv module
    cannot read (over its field limit, a broken quote): the caller decides what a bad line means."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f)
        while True:
            try:
                yield next(reader)
            except StopIteration:
                return
            except csv.Error:
                yield None


def read_csv(path: Path, required: tuple[str, ...] | list[str] = ()) -> list[dict]:
    """The whole rows of a CSV (torn/garbage lines dropped); see read_csv_report."""
    return read_csv_report(path, required)[0]


def _dup_mapping(loader, node, deep=False):
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in seen:
                loader.duplicates.append((key, key_node.start_mark.line + 1))
            seen.add(key)
        except TypeError:  # an unhashable key: the constructor below says so
            pass
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


class SafeLoaderDup(yaml.SafeLoader):
    """yaml.SafeLoader that records duplicate mapping keys ([(key, line)] in `.duplicates`)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates: list[tuple[object, int]] = []


SafeLoaderDup.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _dup_mapping)


def load_yaml(text: str) -> tuple[object, list[tuple[object, int]]]:
    """Safe-load YAML text: (data, duplicate keys as (key, line)). Raises yaml.YAMLError or
    RecursionError (too deeply nested)."""
    loader = SafeLoaderDup(text)
    try:
        return loader.get_single_data(), loader.duplicates
    finally:
        loader.dispose()


def versions() -> dict:
    import PIL
    import timm
    import torch
    import torchvision

    from ._version import __version__

    return {
        "xaicli": __version__,
        "python": sys.version.split()[0],
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "timm": timm.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def write_run_yaml(out: Path, config: dict, extra: dict) -> None:
    doc = {"config": config, **extra, "versions": versions()}
    atomic_write_bytes(out / "run.yaml", yaml.safe_dump(doc, sort_keys=False).encode("utf-8"))


def read_run_yaml(out: Path) -> dict:
    """OUT/run.yaml as a mapping ({} when there is none); a damaged one raises StateError."""
    p = out / "run.yaml"
    if not p.exists() and not p.is_symlink():
        return {}
    if not p.is_file():
        raise damaged(p, "not a regular file")
    try:
        doc, _ = load_yaml(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise damaged(p, "not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise damaged(p, f"not valid YAML{where}: {getattr(e, 'problem', None) or type(e).__name__}") from None
    except (RecursionError, MemoryError):
        raise damaged(p, "nested too deeply") from None
    except OSError as e:
        raise damaged(p, f"unreadable: {e.strerror or e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise damaged(p, "not a mapping with a `config:` mapping")
    if not isinstance(doc.get("resolved") or {}, dict) or not isinstance(doc.get("versions") or {}, dict):
        raise damaged(p, "`resolved` / `versions` are not mappings")
    return doc


def method_keys(run: dict) -> list[str]:
    """The method keys (output folders) a run.yaml names, tolerating hand edits."""
    methods = (run.get("config") or {}).get("methods")
    out = []
    for m in methods if isinstance(methods, list) else []:
        k = (m.get("id") or m.get("name")) if isinstance(m, dict) else m
        if isinstance(k, str) and k and "/" not in k and "\0" not in k and not k.startswith("."):
            out.append(k)
    return out


def read_manifest(out: Path) -> dict:
    """OUT/manifest.json, {} when missing or unreadable (it is rewritten at the end of every run)."""
    import json

    p = out / MANIFEST
    try:
        doc = json.loads(p.read_bytes().decode("utf-8")) if p.is_file() else {}
    except (OSError, ValueError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}


def write_manifest(out: Path, doc: dict) -> None:
    import json

    atomic_write_bytes(out / MANIFEST, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8"))
