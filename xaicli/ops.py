"""Tensor operations every family shares, one of each: normalise to [0, 1], blur, upsample, the
named baselines/substrates (seeded on the CPU, so every device sees the same values) and the
chunker that runs inner loops in bounded pieces and halves its piece on out-of-memory.

Layer 0: imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


# --------------------------------------------------------------------------------------------
# maps
# --------------------------------------------------------------------------------------------
def _minmax(flat: Tensor, lo: Tensor, hi: Tensor, eps: float = 1e-12) -> Tensor:
    """THE normalisation: (flat - lo) / (hi - lo) per row, clamped to [0, 1]. A row whose range is
    (near) zero becomes all ones if hi is positive, else all zeros; never NaN."""
    rng = hi - lo
    const = rng <= eps
    out = ((flat - lo[:, None]) / torch.where(const, torch.ones_like(rng), rng)[:, None]).clamp(0.0, 1.0)
    fill = (hi > 0).float()[:, None].expand_as(out)
    return torch.where(const[:, None], fill, out)


def normalize01(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-image min-max of [B, ...] to [0, 1] (float32). A constant map becomes all ones if its
    value is positive, else all zeros: a map of ones keeps the whole image, a map of zeros keeps
    nothing; never NaN. The masking metrics (avg-drop, ...) and the overlays of non-negative
    (CAM-like) maps use this; `display01` builds the other map kinds on the same `_minmax`."""
    flat = maps.flatten(1).float()
    return _minmax(flat, flat.amin(1), flat.amax(1), eps).view(maps.shape)


MAP_KINDS = {
    "positive": "non-negative, spread out (CAM family): per-image min-max",
    "magnitude": "non-negative, energy in a few pixels (gradient magnitudes): clipped at the "
    "clip_percentile-th percentile from above, then min-max",
    "signed": "signed attributions (Input x Gradient, IG, ...): symmetric clipping at the "
    "clip_percentile-th percentile of |map|, zero at the centre (0.5) of a diverging colormap",
}


def display01(maps: Tensor, kind: str = "positive", clip_percentile: float = 99.5) -> Tensor:
    """[B, ...] -> [0, 1] for display, by map kind (MAP_KINDS; a method declares its `map_kind`).

    positive   normalize01 (min-max)
    magnitude  values above the per-image clip_percentile-th percentile are clipped to it, then
               min-max; a percentile not above the minimum (mass in fewer pixels than the clipped
               share) falls back to the maximum, i.e. plain min-max
    signed     s = clip_percentile-th percentile of |map|; map / s clipped to [-1, 1] mapped to
               [0, 1], so 0 -> 0.5 whatever the balance of positive and negative mass; an
               all-zero map is 0.5 everywhere
    """
    flat = maps.flatten(1).float()
    if kind == "positive" or flat.shape[1] == 0:
        return normalize01(maps)
    q = min(max(float(clip_percentile), 0.0), 100.0) / 100.0
    if kind == "magnitude":
        lo, top = flat.amin(1), flat.amax(1)
        hi = torch.quantile(flat, q, dim=1)
        hi = torch.where(hi > lo, hi, top)
        return _minmax(flat.clamp(max=hi[:, None].expand_as(flat)), lo, hi).view(maps.shape)
    if kind == "signed":
        a = flat.abs()
        s = torch.quantile(a, q, dim=1)
        s = torch.where(s > 0, s, a.amax(1))
        out = _minmax(flat, -s, s)
        out = torch.where((s > 0)[:, None], out, torch.full_like(out, 0.5))
        return out.view(maps.shape)
    raise ValueError(f"unknown map kind {kind!r} (allowed: {', '.join(MAP_KINDS)})")


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, h, w] -> [B, H, W], bilinear (align_corners=False), on the maps' device."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def gaussian_blur(x: Tensor, sigma: float, radius: int | None = None) -> Tensor:
    """Separable Gaussian blur of [B, C, H, W] on x's device, reflect padding.

    radius None: 3 sigma, clipped to the image (what the methods use); a fixed radius (RISE's
    insertion substrate: radius 5 = klen 11, sigma 5) pads by replication where reflection cannot.
    """
    if sigma <= 0:
        return x
    h, w = x.shape[-2:]
    r = max(1, min(int(3 * sigma + 0.5), h - 1, w - 1)) if radius is None else radius
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    mode = "reflect" if min(h, w) > r else "replicate"
    y = F.pad(x, (r, r, r, r), mode=mode)
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


# --------------------------------------------------------------------------------------------
# baselines / substrates: what stands in for "no information" in the model's input space
# --------------------------------------------------------------------------------------------
REFERENCES = ("black", "mean", "blur", "uniform")


def cpu_generator(seed: int) -> torch.Generator:
    """The one generator for seeded randomness: on the CPU, so CPU and CUDA get the same values."""
    return torch.Generator().manual_seed(int(seed))


def seeded_rand(shape, seed: int, like: Tensor, normal: bool = False) -> Tensor:
    """Uniform [0, 1) (or standard normal) values drawn on the CPU from `seed`, moved to like's device."""
    fn = torch.randn if normal else torch.rand
    return fn(tuple(shape), generator=cpu_generator(seed), dtype=torch.float32).to(device=like.device, dtype=like.dtype)


def reference(
    x: Tensor, kind: str, mean, std, *, seed: int = 0, blur_sigma: float = 10.0, blur_radius: int | None = None
) -> Tensor:
    """A reference image [B, C, H, W] in the model's normalised space, for baselines and substrates:

    black    pixel value 0 normalised with the model's mean/std
    mean     zero in normalised space (the dataset's mean colour)
    blur     Gaussian blur of x (sigma `blur_sigma` px; radius `blur_radius`, default 3 sigma)
    uniform  uniform noise in [0, 1] pixel space from `seed` (CPU generator: same on every device),
             drawn once per call as [1, C, H, W]: the same for every image, whatever its batch
    """
    if kind == "mean":
        return torch.zeros_like(x)
    if kind == "blur":
        return gaussian_blur(x, blur_sigma, blur_radius)
    m = torch.as_tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    if kind == "black":
        return ((0.0 - m) / s).expand_as(x).contiguous()
    if kind == "uniform":  # one draw for every image: an image's reference never depends on its batch
        return ((seeded_rand((1, *x.shape[1:]), seed, x) - m) / s).expand_as(x).contiguous()
    raise ValueError(f"unknown reference {kind!r} (allowed: {', '.join(REFERENCES)})")


# --------------------------------------------------------------------------------------------
# chunking with out-of-memory back-off
# --------------------------------------------------------------------------------------------
_OOM_TEXTS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_oom(e: BaseException) -> bool:
    """Out of memory on any device: CUDA/MPS OOM, or the CPU allocator's failure (RuntimeError
    "DefaultCPUAllocator: can't allocate memory", MemoryError): the chunker backs off the same way."""
    if isinstance(e, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e).lower() for t in _OOM_TEXTS)


def _free_cache(device) -> None:
    if getattr(device, "type", None) == "cuda":
        torch.cuda.empty_cache()


class Chunker:
    """Runs work in chunks; on out-of-memory halves the chunk and retries it.

    One chunker serves a whole run: inner loops (IG path points, SmoothGrad samples, Score-CAM
    channels, metric curve steps) call `map`, which remembers per loop key (a name, or a
    (name, owner) tuple so two entries of one method keep their own sizes) the largest chunk that
    fit, halves it on out-of-memory and never grows it back within the run; only when one item alone does not fit does the error
    reach the caller, whose outer batch (`split`) then halves. `on_event(kind, **info)` hears of
    every back-off (the run's JSON log).
    """

    def __init__(self, on_event: Callable[..., None] | None = None, cap: int | None = None):
        self.sizes: dict = {}
        self.cap = cap  # an upper bound for every chunk (tests: cap=1 runs every loop item by item)
        self.events = 0
        self.on_event = on_event or (lambda *a, **k: None)
        # on_chunk(key, done, n): inner-loop progress (announced with done=0 when a loop starts,
        # then after each chunk); the run sets it while a batch's methods run (progress.InnerProgress)
        self.on_chunk: Callable[[object, int, int], None] | None = None

    def _shrink(self, key: str, size: int, device) -> int:
        _free_cache(device)
        size = (size + 1) // 2
        self.sizes[key] = size
        self.events += 1
        self.on_event("oom_backoff", loop=key[0] if isinstance(key, tuple) else key, chunk=size)
        return size

    def map(self, key: str, n: int, size: int, fn: Callable[[Tensor], object], device=None) -> list:
        """[fn(idx) for idx in chunks of range(n)], chunk <= size; halves on out-of-memory."""
        size = max(1, min(size, n, self.sizes.get(key, size), self.cap or size))
        out, start = [], 0
        if self.on_chunk is not None:
            self.on_chunk(key, 0, n)
        while start < n:
            idx = torch.arange(start, min(n, start + size), device=device)
            try:
                out.append(fn(idx))
            except Exception as e:
                if not is_oom(e) or size == 1:
                    raise
                size = self._shrink(key, size, device)
                continue
            start += len(idx)
            if self.on_chunk is not None:
                self.on_chunk(key, start, n)
        return out

    def split(self, key: str, n: int, fn: Callable[[int, int], object], device=None) -> list[tuple[object, int]]:
        """The outer batch: [(fn(start, end), end - start)] over sub-batches; a part that does
        not fit even as one item gives (None, 1) and the run goes on."""
        size = min(self.sizes.get(key, n), n) or 1
        parts, start = [], 0
        while start < n:
            end = min(start + size, n)
            try:
                parts.append((fn(start, end), end - start))
                start = end
            except Exception as e:
                if not is_oom(e):
                    raise
                if size == 1:
                    _free_cache(device)
                    self.on_event("oom_image", loop=key[0] if isinstance(key, tuple) else key)
                    parts.append((None, 1))
                    start = end
                    continue
                size = self._shrink(key, size, device)
        return parts
