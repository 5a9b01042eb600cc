"""Decoding one image file to 8-bit RGB (layer 0: PIL and numpy only).

Used by the DataLoader workers (xaicli/data.py) and by anything else that reads a picture (IG's
image baseline): EXIF orientation applied, first frame, grayscale/palette/CMYK/16-bit converted,
transparency composited over white, and a pixel limit checked from the header before decoding.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 178_956_970  # PIL's hard limit (2 x MAX_IMAGE_PIXELS): bigger is a decompression bomb


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit scaled (not clipped), alpha composited over white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if a.max(initial=0) > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        return Image.fromarray((a * 255 + 0.5).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, check the pixel limit, apply EXIF orientation and convert to RGB (first frame).

    The size comes from the header before anything is decoded, so a decompression bomb is
    refused without allocating its pixels. PIL's own global guard (`Image.MAX_IMAGE_PIXELS`) is
    left as the process has it: only the DataLoader's worker processes lift it (for a
    `max_pixels` above PIL's limit), never the user's process.
    """
    with opened(path, max_pixels) as im:
        im.load()
        return to_rgb(ImageOps.exif_transpose(im))


@contextmanager
def opened(path: str | Path, max_pixels: int) -> Iterator[Image.Image]:
    """The image file opened at its first frame, its header size checked against `max_pixels`
    (ValueError, before any pixel is decoded); PIL's bomb warning silenced, its error reworded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as e:
            raise ValueError(f"{e} (above PIL's decompression-bomb limit in this process)") from None
        with im:
            w, h = im.size
            if w * h > max_pixels:
                raise ValueError(f"{w}x{h} = {w * h} pixels is above the pixel limit {max_pixels} (max_pixels)")
            im.seek(0)
            yield im


def draft_scale(size: tuple[int, int], min_short: int | None, max_side: int | None) -> float:
    """The smallest scale (<= 1) the picture may be decoded at: its shorter side stays >= min_short
    (what the model's resize needs, with margin) and its longer side >= max_side (the overlay's
    size; None = the original size, so no reduction)."""
    if min_short is None or max_side is None:
        return 1.0
    w, h = size
    return min(1.0, max(min_short / min(w, h), max_side / max(w, h)))


def draft_factor(size: tuple[int, int], min_short: int | None, max_side: int | None) -> int:
    """The JPEG DCT reduction (1, 2, 4 or 8) to decode at: the largest whose scale is at least
    `draft_scale` and that divides both sides exactly. A side that is not a multiple of the
    reduction ends in a partial block, so the decoded picture would not be the original scaled by
    exactly 1/n (a 1154x865 JPEG at 1/2 is 577x433, i.e. 865/433 != 2): the model's resize would
    then sample it up to half a pixel off and shift the map (measured: up to 57/255 on the model
    input). Such a picture is decoded at a reduction that divides it, or whole."""
    f = draft_scale(size, min_short, max_side)
    w, h = size
    for n in (8, 4, 2):
        if 1.0 / n >= f and w % n == 0 and h % n == 0:
            return n
    return 1


def load_for_run(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, min_short: int | None = None, max_side: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """(RGB image, original (width, height) after EXIF orientation).

    A JPEG is decoded at a reduced DCT scale (PIL `draft`: 1/2, 1/4 or 1/8, several times faster
    than a full decode) when `draft_factor` allows it; the image is then at least that large and
    exactly the original scaled by 1/n. The original size comes from the header, so crop boxes and
    annotation boxes stay in original pixel coordinates. Other formats are decoded whole (`fit_side`
    makes the overlay's copy).
    """
    with opened(path, max_pixels) as im:
        w, h = im.size
        n = draft_factor((w, h), min_short, max_side)
        if n > 1 and im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK", "YCbCr"):
            im.draft(im.mode, (w // n, h // n))
        im.load()
        dw, dh = im.size
        img = to_rgb(ImageOps.exif_transpose(im))
    swapped = (img.size[0], img.size[1]) == (dh, dw) and dw != dh
    return img, ((h, w) if swapped else (w, h))


def fit_side(img: Image.Image, max_side: int | None) -> Image.Image:
    """`img` resized (bilinear, antialiased) so its longer side is at most max_side."""
    if max_side is None or max(img.size) <= max_side:
        return img
    k = max_side / max(img.size)
    return img.resize((max(1, round(img.size[0] * k)), max(1, round(img.size[1] * k))), Image.BILINEAR)
