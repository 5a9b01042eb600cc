"""The output layout (a contract that `xai evaluate` and users' scripts rely on) and its writers.

    OUT/run.yaml                      resolved config + package versions
    OUT/explanations.csv              one row per (image, method)
    OUT/errors.csv                    images that could not be processed (path, reason)
    OUT/<method>/<rel>.png            heatmap overlay at the original resolution
    OUT/<method>/<rel>.npy            raw map, float32, HxW of the model input, unnormalized

Files are written to a temporary name in the same folder and renamed (atomic on POSIX); CSV
rows are appended whole and flushed (fsync) at batch boundaries.
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
import yaml
from PIL import Image

EXPLANATION_FIELDS = [
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
    "delta",  # completeness delta for path methods (Integrated Gradients); empty otherwise
    "path",  # the source file
    "size",  # source size in bytes and mtime (ns) when processed: the resume key
    "mtime_ns",
]
ERROR_FIELDS = ["image", "path", "reason"]


def map_paths(out: Path, method: str, rel: str) -> tuple[Path, Path]:
    base = out / method / rel
    return base.with_name(base.name + ".png"), base.with_name(base.name + ".npy")


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


def save_png(path: Path, rgb: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=3)
    atomic_write_bytes(path, buf.getvalue())


@lru_cache(maxsize=16)
def colormap_lut(name: str) -> np.ndarray:
    """256x3 uint8 lookup table of a matplotlib colormap."""
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return (cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


def normalize01(m: np.ndarray) -> np.ndarray:
    """Per-image min-max to [0, 1] with an epsilon (an all-constant map gives zeros, never NaN)."""
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / max(hi - lo, 1e-12)


def overlay(orig: np.ndarray, cam: np.ndarray, box, cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """Heatmap over the original image at its own resolution.

    `cam` is the map over the model input; `box` (left, top, right, bottom) is where that input
    lies in the original image (the centre crop). Outside the box the model saw nothing, so the
    original is shown dimmed there.
    """
    h, w = orig.shape[:2]
    left, top, right, bottom = (int(round(v)) for v in box)
    left, top = max(left, 0), max(top, 0)
    right, bottom = min(max(right, left + 1), w), min(max(bottom, top + 1), h)
    m = normalize01(cam.astype(np.float32))
    resized = np.asarray(Image.fromarray(m, mode="F").resize((right - left, bottom - top), Image.BILINEAR))
    idx = np.clip(resized * 255.0 + 0.5, 0, 255).astype(np.uint8)
    color = colormap_lut(cmap)[idx]
    out = (orig.astype(np.float32) * 0.5).astype(np.uint8)  # dimmed outside the crop
    region = orig[top:bottom, left:right].astype(np.float32)
    out[top:bottom, left:right] = (region * (1.0 - alpha) + color.astype(np.float32) * alpha + 0.5).astype(np.uint8)
    return out


class CsvAppender:
    """Append whole rows to a CSV, writing the header once; flush + fsync on every append."""

    def __init__(self, path: Path, fields: list[str]):
        self.path = path
        self.fields = fields

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        new = not self.path.exists() or self.path.stat().st_size == 0
        buf = io.StringIO()
        wr = csv.DictWriter(buf, fieldnames=self.fields, extrasaction="ignore", lineterminator="\n")
        if new:
            wr.writeheader()
        wr.writerows(rows)
        with open(self.path, "a", encoding="utf-8", errors="replace", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return list(csv.DictReader(f))


def versions() -> dict:
    import PIL
    import timm
    import torch
    import torchvision

    from . import __version__

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
    p = out / "run.yaml"
    if not p.is_file():
        return {}
    return yaml.safe_load(p.read_text(encoding="utf-8")) or {}
