"""Image discovery (folder / glob / list file / single file) and the batched loading pipeline.

Decoding runs in DataLoader workers: each item is opened with EXIF orientation applied and
converted to RGB correctly (grayscale, RGBA/LA/palette with transparency over white, CMYK,
16-bit), preprocessed for the model, and returned with its original pixels for the overlay.
A file that cannot be decoded comes back as a failure (path, reason) instead of an exception.
"""

from __future__ import annotations

import glob as globmod
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import InputError
from .images import DEFAULT_MAX_PIXELS, fit_side, load_for_run, load_image  # noqa: F401 (load_image re-exported)
from .locks import close_inherited_locks
from .models.preprocess import Preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
LIST_SUFFIXES = (".txt", ".lst", ".list")
# draft decoding keeps the shorter side >= DRAFT_MARGIN x the model's resize. Measured (12 JPEGs of
# 1-12 MP, overlay_max_side 768): a margin of 4 halves the median Grad-CAM difference to full decoding
# (0.015 -> 0.005 after min-max) but not the largest (0.028 -> 0.030), and costs 1.5x the decode +
# preprocess time of a margin of 2; no margin that still drafts reaches 1e-3 (docs/benchmarks.md).
DRAFT_MARGIN = 2


@dataclass(frozen=True)
class ImageItem:
    path: Path  # where to read it
    rel: str  # output key: POSIX path relative to the input root, extension dropped


@dataclass
class Discovery:
    root: Path
    items: list[ImageItem]
    ignored: int = 0  # files without an image extension in a folder


def printable(s: str) -> str:
    """A file name that is not valid UTF-8 (surrogate escapes) -> valid text with U+FFFD."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def display_path(path: Path | str) -> str:
    """A source path as the CSVs and the report show it: '..' and '.' folded away lexically
    (`configs/../imgs/a.png` -> `imgs/a.png`), valid UTF-8."""
    return printable(os.path.normpath(str(path)))


def side_keys(rel: str, path: Path | str | None, root: Path | None = None) -> list[str]:
    """The names under which a side file (labels CSV, annotations) may list an image, in order of
    preference: its output key (relative path without extension), the relative path with its
    extension, the file name, the file stem. One rule for every side file."""
    keys = [rel]
    if path is not None:
        p = Path(path)
        if root is not None and p.is_relative_to(root):
            keys.append(p.relative_to(root).as_posix())
        keys += [rel + p.suffix, p.name, p.stem]
    return list(dict.fromkeys(keys))


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def safe_rel(path: Path, root: Path) -> str:
    """Relative POSIX path under `root`; never contains '..' or an absolute part."""
    try:
        # abspath normalizes '..' without following symlinks: a symlinked file keeps its own name
        rel = PurePosixPath(Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix())
    except ValueError:
        # outside the root (absolute entry in a list file, a symlink out): keep the name parts only
        parts = [p for p in PurePosixPath(path.as_posix()).parts if p not in ("/", "..", ".") and not p.endswith(":")]
        rel = PurePosixPath("_external", *parts)
    parts = [p for p in rel.parts if p not in ("..", ".", "/")]
    return str(PurePosixPath(*parts)) if parts else path.name


def _keys(paths: list[Path], root: Path) -> list[ImageItem]:
    """Output keys: relative path without extension, unique, never starting with a reserved '.xai-'."""
    seen_paths, uniq = set(), []
    for p in paths:  # a list file naming one file twice: once
        a = os.path.abspath(p)
        if a not in seen_paths:
            seen_paths.add(a)
            uniq.append(p)
    rels = [safe_rel(p, root) for p in uniq]
    stems = [str(PurePosixPath(r).with_suffix("")) for r in rels]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    out, used = [], set()
    for p, r, s in zip(uniq, rels, stems, strict=True):
        # a.jpg and a.png in one folder would collide: keep the extension as _jpg / _png
        key = s if counts[s] == 1 else s + "_" + PurePosixPath(r).suffix.lstrip(".").lower()
        key = "/".join("_" + c if c.startswith(".xai-") else c for c in printable(key).split("/"))
        base, n = key, 2
        while key in used:  # a.jpg + a.JPG, or a_jpg.png next to them: number the later ones
            key, n = f"{base}~{n}", n + 1
        used.add(key)
        out.append(ImageItem(p, key))
    return out


def discover(spec: str | Path | list, recursive: bool = True, extensions=IMAGE_EXTENSIONS) -> Discovery:
    """Find the images a run should process, in a deterministic (sorted) order. A list of inputs
    (`xai explain a.jpg b/ c.txt`, or a glob the shell expanded) is discovered one by one and keyed
    relative to their common folder; a file named twice is done once."""
    if isinstance(spec, list | tuple):
        if len(spec) == 1:
            return discover(spec[0], recursive, extensions)
        if not spec:
            raise InputError("input: no input given")
        parts = [discover(one, recursive, extensions) for one in spec]
        root = Path(os.path.commonpath([os.path.abspath(d.root) for d in parts]))
        paths = sorted((it.path for d in parts for it in d.items), key=lambda q: os.path.abspath(q))
        return Discovery(root, _keys(paths, root), sum(d.ignored for d in parts))
    s = str(spec)
    exts = tuple(e.lower() for e in extensions)
    if _has_glob(s) and not Path(s).exists():
        root = Path(s.split("*")[0].split("?")[0].split("[")[0] or ".")
        root = root if root.is_dir() else root.parent
        paths = sorted(Path(p) for p in globmod.glob(s, recursive=True) if os.path.isfile(p) or os.path.islink(p))
        if not paths:
            raise InputError(f"input: the pattern '{s}' matches no file")
        return Discovery(root, _keys(paths, root))
    p = Path(s)
    if not p.exists() and not p.is_symlink():
        raise InputError(f"input: '{s}' does not exist (give a folder, a glob pattern, an image or a .txt list)")
    if p.is_dir():
        walker = p.rglob("*") if recursive else p.glob("*")
        paths, ignored = [], 0
        for f in walker:
            if f.is_dir():
                continue
            if f.suffix.lower() in exts:
                paths.append(f)
            else:
                ignored += 1
        paths.sort(key=lambda q: q.as_posix())
        if not paths:
            raise InputError(f"input: no images ({', '.join(exts)}) in folder '{s}'")
        return Discovery(p, _keys(paths, p), ignored)
    if p.suffix.lower() in LIST_SUFFIXES:
        base = p.parent
        lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
        paths = []
        for ln in lines:
            ln = ln.strip()
            if not ln or ln.startswith("#"):
                continue
            q = Path(ln)
            paths.append(q if q.is_absolute() else base / q)
        if not paths:
            raise InputError(f"input: the list file '{s}' names no image")
        return Discovery(base, _keys(paths, base))
    return Discovery(p.parent, _keys([p], p.parent))


# ------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------
def _reason(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {msg}"[:300]


class ImageDataset(Dataset):
    """Decoded, preprocessed images; `extra(i)` (a picklable callable) adds per-item tensors read
    in the worker too (the targets of a labels file, the stored maps `xai evaluate` scores)."""

    def __init__(
        self,
        items: list[ImageItem],
        preprocess: Preprocess,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        extra=None,
        overlay_max_side: int | None = None,
        draft: bool = False,
    ):
        self.items = items
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.extra = extra
        self.overlay_max_side = overlay_max_side  # `orig` with its longer side at most this (None: original)
        # JPEGs decoded at a reduced DCT scale that keeps the shorter side >= 2x the model's resize
        # (so its antialiased resize sees the same detail) and the overlay's size (images.load_for_run)
        self.min_short = DRAFT_MARGIN * preprocess.resize if draft else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        try:
            img, size = load_for_run(self.items[i].path, self.max_pixels, self.min_short, self.overlay_max_side)
            x = self.preprocess(img)
            orig = fit_side_uint8(img, self.overlay_max_side)
            extra = self.extra(i) if self.extra is not None else {}
            return {"index": i, "x": x, "orig": orig, "size": size, "extra": extra, "error": None}
        except Exception as e:  # any decode problem is this image's failure, not the run's
            return {"index": i, "x": None, "orig": None, "size": None, "extra": {}, "error": _reason(e)}


def fit_side_uint8(img, max_side: int | None) -> torch.Tensor:
    """`images.fit_side` as an HxWx3 uint8 tensor, resized by torch's uint8 antialiased bilinear
    kernel (channels-last, vectorised): the same pixels as PIL's within one grey level (measured:
    0.05-0.2 % of the values differ, by 1) in half the CPU time (2.9 vs 5.9 ms for a 1000x752 ->
    768 px overlay copy). Only the overlay's copy is made this way; the model input keeps the
    model's own (PIL) preprocessing."""
    a = torch.from_numpy(np.array(img, dtype=np.uint8))
    if max_side is None or max(img.size) <= max_side:
        return a
    if a.dim() != 3 or a.shape[2] != 3:
        return torch.from_numpy(np.array(fit_side(img, max_side), dtype=np.uint8))
    k = max_side / max(img.size)
    size = (max(1, round(img.size[1] * k)), max(1, round(img.size[0] * k)))
    t = torch.nn.functional.interpolate(a.permute(2, 0, 1)[None], size=size, mode="bilinear", antialias=True)
    return t[0].permute(1, 2, 0).contiguous()


@dataclass
class Batch:
    indices: list[int]
    x: torch.Tensor | None  # [B, 3, H, W] for the decoded images
    origs: list[torch.Tensor]  # HxWx3 uint8, original resolution (EXIF-rotated; overlay_max_side: reduced)
    failures: list[tuple[int, str]]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # stacked `extra` tensors
    sizes: list[tuple[int, int]] = field(default_factory=list)  # original (width, height), from the header


def collate(samples: list[dict]) -> Batch:
    ok = [s for s in samples if s["error"] is None]
    keys = ok[0]["extra"].keys() if ok else ()
    return Batch(
        indices=[s["index"] for s in ok],
        x=torch.stack([s["x"] for s in ok]) if ok else None,
        origs=[s["orig"] for s in ok],
        failures=[(s["index"], s["error"]) for s in samples if s["error"] is not None],
        extra={k: torch.stack([torch.as_tensor(s["extra"][k]) for s in ok]) for k in keys},
        sizes=[s["size"] for s in ok],
    )


def die_with_parent(parent: int | None = None) -> bool:
    """Linux: ask the kernel to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG),
    so decode workers never outlive a main process killed with -9. No-op elsewhere; True if set."""
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if parent is not None and os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def _worker_init(_worker_id: int, parent: int | None = None) -> None:
    import signal

    from PIL import Image

    die_with_parent(parent)  # a `kill -9` of the main process takes its workers at once
    # forked workers inherit the output lock's file descriptor; drop it so the lock dies with
    # the main process (kill -9) instead of living on in orphaned workers
    close_inherited_locks()
    # the worker is our own process: `max_pixels` (checked from the header) replaces PIL's guard
    Image.MAX_IMAGE_PIXELS = None
    # `timeout`, systemd and cron stop the whole process group with SIGTERM, a terminal's Ctrl-C
    # sends SIGINT to it: the main process handles both (finishes the batch, exit 130) and the
    # DataLoader then shuts its workers down
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset: ImageDataset, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        worker_init_fn=partial(_worker_init, parent=os.getpid()) if workers > 0 else None,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if workers > 0 else None,
    )
