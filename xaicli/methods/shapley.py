"""Shapley family: KernelSHAP over superpixels and GradientSHAP (expected gradients).

- `kernelshap` (Lundberg & Lee 2017): the image is cut into M segments (SLIC superpixels from
  scikit-image, or a regular grid that needs nothing); a coalition z in {0,1}^M keeps the present
  segments and sets the others to a substrate (`ops.reference`). With 2^M - 2 <= n_samples every
  non-trivial coalition is enumerated with the Shapley kernel weight
  pi(z) = (M-1) / (C(M,|z|) |z| (M-|z|)), which makes the solution the exact Shapley values;
  otherwise |z| is drawn from the kernel's size distribution (paired: every z with its complement)
  and the regression weights are uniform. The empty and full coalitions enter as the constraint
  sum(phi) = f(x) - f(baseline) (one variable eliminated, weighted least squares in float64).
  The map paints each segment with its phi.
- `gradientshap` (expected gradients, Erion et al.; Lundberg & Lee's GradientSHAP): the mean
  over K samples (baseline x'_k from a distribution, alpha_k ~ U(0,1)) of
  (x - x'_k) * grad f(x'_k + alpha_k (x - x'_k)), summed over channels. The distribution is a
  substrate plus Gaussian noise, or the images of a folder.

Both write the efficiency gap sum(phi) - (f(x) - E f(baseline)) as the CSV column
`efficiency_gap` (KernelSHAP: zero up to rounding, by construction). Randomness (coalitions,
baselines, alphas) comes from a CPU generator seeded by `seed` only, the same for every image of
a batch and on every device; the model's forwards run through the run's chunker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import MethodError
from ..ops import REFERENCES, cpu_generator
from .base import BoundMethod, MethodSpec, Result, check_objective_field, register
from .perturbation import Substrate, clean_forward, substrate

GAP = {"efficiency_gap": "sum of the attributions - (f(x) - mean f(baseline)), signed (Shapley efficiency)"}


# --------------------------------------------------------------------------------------------
# segmentation
# --------------------------------------------------------------------------------------------
def grid_segments(h: int, w: int, n: int) -> Tensor:
    """[H, W] labels of a rows x cols grid, rows x cols = n (the factorisation closest to a square),
    clipped to the image."""
    rows = max(d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0)
    rows, cols = min(rows, h), min(n // rows, w)
    r = torch.arange(h) * rows // h
    c = torch.arange(w) * cols // w
    return r[:, None] * cols + c[None, :]


def slic_segments(img: np.ndarray, n: int, compactness: float) -> Tensor:
    """[H, W] contiguous labels of SLIC superpixels of an [H, W, 3] image in [0, 1]."""
    try:
        from skimage.segmentation import slic
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MethodError(
            "kernelshap: segments 'slic' needs scikit-image (pip install scikit-image); or use segments: grid"
        ) from e
    lab = slic(img, n_segments=n, compactness=compactness, start_label=0, channel_axis=-1)
    if n > 1 and lab.max() == 0:  # noise-like images: enforcing connectivity merges every fragment
        lab = slic(
            img, n_segments=n, compactness=compactness, start_label=0, channel_axis=-1, enforce_connectivity=False
        )
    _, inv = np.unique(lab, return_inverse=True)
    return torch.from_numpy(inv.reshape(lab.shape).astype(np.int64))


def to_pixels(x: Tensor, mean, std) -> Tensor:
    """[C, H, W] normalised -> [0, 1] pixels (the model's mean/std; else the image's own min-max)."""
    x = x.detach().float().cpu()
    if mean is not None and std is not None:
        m = torch.tensor(mean).view(-1, 1, 1)
        s = torch.tensor(std).view(-1, 1, 1)
        return (x * s + m).clamp(0, 1)
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo).clamp(min=1e-12)


# --------------------------------------------------------------------------------------------
# KernelSHAP
# --------------------------------------------------------------------------------------------
def shapley_kernel(m: int, size: Tensor) -> Tensor:
    """pi(z) = (M-1) / (C(M,|z|) |z| (M-|z|)) for 0 < |z| < M (float64)."""
    comb = torch.tensor([math.comb(m, int(k)) for k in size.tolist()], dtype=torch.float64)
    k = size.double()
    return (m - 1) / (comb * k * (m - k))


def coalitions(m: int, n_samples: int, seed: int) -> tuple[Tensor, Tensor]:
    """(z [S, M] float64 in {0,1}, regression weights [S]) without the empty and full coalitions."""
    if m < 2:
        return torch.zeros((0, m), dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    if 2**m - 2 <= n_samples:  # every coalition, Shapley kernel weights: exact
        codes = torch.arange(1, 2**m - 1)
        z = ((codes[:, None] >> torch.arange(m)[None]) & 1).double()
        return z, shapley_kernel(m, z.sum(1))
    g = cpu_generator(seed)
    sizes = torch.arange(1, m, dtype=torch.float64)
    p = (m - 1) / (sizes * (m - sizes))
    half = (n_samples + 1) // 2
    k = torch.multinomial(p / p.sum(), half, replacement=True, generator=g) + 1  # |z| ~ the kernel
    order = torch.rand((half, m), generator=g).argsort(dim=1)  # a random subset of each size
    z = (order < k[:, None]).double()
    z = torch.cat([z, 1 - z])[:n_samples]  # paired sampling
    return z, torch.ones(len(z), dtype=torch.float64)


def solve_shapley(z: Tensor, w: Tensor, y: Tensor, delta: float) -> Tensor:
    """phi [M] minimising sum_s w_s (y_s - z_s . phi)^2 subject to sum(phi) = delta (float64, CPU).

    y are f(z) - f(baseline); the last variable is eliminated: phi_M = delta - sum(phi_<M).
    """
    m = z.shape[1]
    if m == 1 or len(z) == 0:
        return torch.full((m,), delta / m, dtype=torch.float64)
    a = z[:, :-1] - z[:, -1:]
    b = y - z[:, -1] * delta
    sw = w.sqrt()[:, None]
    beta = torch.linalg.lstsq(a * sw, (b * sw[:, 0])[:, None], driver="gelsd").solution[:, 0]
    return torch.cat([beta, (delta - beta.sum())[None]])


class BoundKernelShap(BoundMethod):
    def setup(self) -> None:
        super().setup()
        if self.spec.segments == "slic":
            try:
                import skimage.segmentation  # noqa: F401
            except ImportError as e:
                raise MethodError(
                    "kernelshap: segments 'slic' needs scikit-image (pip install scikit-image); or use segments: grid"
                ) from e

    def segment(self, x: Tensor) -> Tensor:
        """[B, H, W] labels (CPU), from each image alone."""
        s = self.spec
        h, w = x.shape[-2:]
        if s.segments == "grid":
            return grid_segments(h, w, s.n_segments).expand(x.shape[0], h, w).clone()
        imgs = [to_pixels(xi, self.ctx.mean, self.ctx.std).permute(1, 2, 0).double().numpy() for xi in x]
        return torch.stack([slic_segments(im, s.n_segments, s.compactness) for im in imgs])

    def compute(self, x: Tensor, target: Tensor | None) -> Result:
        s = self.spec
        x = x.detach()
        logits, tgt = clean_forward(self.model, x, target)
        b_sz, (h, w) = x.shape[0], x.shape[-2:]
        base = substrate(self.ctx, s.name, x, s.baseline, s.seed, s.blur_sigma)
        with torch.no_grad():
            f_x = self.objective(logits, tgt).double().cpu()
            f_b = self.objective(self.model(base), tgt).double().cpu()
        labels = self.segment(x)
        plans = []
        for b in range(b_sz):
            m = int(labels[b].max()) + 1
            n = s.n_samples if s.n_samples is not None else 2 * m + 2048
            plans.append((m, *coalitions(m, n, s.seed)))
        m_max = max(p[0] for p in plans)
        owner = torch.cat([torch.full((len(p[1]),), b, dtype=torch.long) for b, p in enumerate(plans)])
        zpad = torch.zeros((len(owner), m_max), dtype=x.dtype)
        start = 0
        for m, z, _ in plans:
            zpad[start : start + len(z), :m] = z.to(x.dtype)
            start += len(z)
        owner_d, zpad_d = owner.to(x.device), zpad.to(x.device)
        flat_labels = labels.to(x.device).flatten(1)  # [B, H*W]
        y = torch.zeros(len(owner), dtype=torch.float64, device=x.device)

        def step(idx: Tensor) -> None:
            b = owner_d[idx]
            keep = zpad_d[idx].gather(1, flat_labels[b]).view(-1, 1, h, w)
            with torch.no_grad():
                y[idx] = self.objective(self.model(base[b] + keep * (x[b] - base[b])), tgt[b]).double()

        self.ctx.chunker.map(self.loop("kernelshap"), len(owner), s.internal_batch, step, x.device)
        y = y.cpu()
        maps, gaps, start = [], [], 0
        for b, (_m, z, wts) in enumerate(plans):
            delta = float(f_x[b] - f_b[b])
            phi = solve_shapley(z, wts, y[start : start + len(z)] - f_b[b], delta)
            start += len(z)
            maps.append(phi[labels[b]])
            gaps.append(phi.sum() - delta)
        maps_t = torch.stack(maps).float().to(x.device)
        return Result(maps_t, logits, tgt, {"efficiency_gap": torch.stack(gaps).float().to(x.device)})


@register(
    "kernelshap",
    "KernelSHAP (Lundberg & Lee 2017): Shapley values of superpixels (SLIC or grid) by kernel-weighted least squares",
)
@dataclass
class KernelShap(MethodSpec):
    segments: Literal["slic", "grid"] = "slic"  # slic needs scikit-image; grid needs nothing
    n_segments: int = 50  # SLIC's target count (the result may differ), or the grid's exact count
    compactness: float = 10.0  # SLIC
    n_samples: int | None = None  # coalitions per image; null = 2 M + 2048 (the shap library's auto)
    baseline: Substrate = "mean"  # what an absent segment becomes (mean = 0 in normalised space)
    objective: str = "logit"
    blur_sigma: float = 10.0  # for baseline: blur
    seed: int = 0
    internal_batch: int = 64  # coalition images per forward

    bound = BoundKernelShap
    extras = GAP
    cost = "2 F + n_samples x F (all 2^M - 2 coalitions when fewer)"
    map_kind = "signed"  # Shapley values for and against the objective
    contract_params: ClassVar[dict] = {"n_samples": 40}  # 2148 coalitions x 3 images x 6 runs: too slow there

    def __post_init__(self):
        check_objective_field(self.name, self.objective)
        if self.n_segments < 1 or self.internal_batch < 1 or (self.n_samples is not None and self.n_samples < 1):
            raise MethodError("kernelshap: n_segments, n_samples and internal_batch must be >= 1")


# --------------------------------------------------------------------------------------------
# GradientSHAP
# --------------------------------------------------------------------------------------------
class BoundGradientShap(BoundMethod):
    def setup(self) -> None:
        super().setup()
        s = self.spec
        self.images = None
        if s.baseline not in REFERENCES:
            self.images = self.load_folder(Path(s.baseline))

    def load_folder(self, folder: Path) -> Tensor:
        from ..data import IMAGE_EXTENSIONS
        from ..images import load_image

        pre = self.ctx.preprocess
        if pre is None:
            raise MethodError("gradientshap: a folder of baseline images needs the model's preprocessing (load_model)")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)[: self.spec.max_images]
        if not files:
            raise MethodError(f"gradientshap: the baseline folder '{folder}' holds no image")
        t = torch.stack([pre(load_image(f)) for f in files])
        size = tuple(self.ctx.input_size)
        if tuple(t.shape[-2:]) != size:
            t = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
        return t

    def compute(self, x: Tensor, target: Tensor | None) -> Result:
        s = self.spec
        x = x.detach()
        logits, tgt = clean_forward(self.model, x, target)
        b_sz = x.shape[0]
        g = cpu_generator(s.seed)  # sample k is the same for every image: a map does not depend on its batch
        alphas = torch.rand(s.n_samples, generator=g).to(x.device, x.dtype)
        noise = (torch.randn((s.n_samples, *x.shape[1:]), generator=g) * s.noise).to(x.device, x.dtype)
        if self.images is None:
            ref = substrate(self.ctx, s.name, x, s.baseline, s.seed, s.blur_sigma)
            pick = None
        else:
            ref = None
            pick = torch.randint(0, len(self.images), (s.n_samples,), generator=g)
            pool = self.images.to(x.device, x.dtype)[pick]  # [K, C, H, W]
        attr = torch.zeros_like(x, dtype=torch.float32)
        f_base = torch.zeros(b_sz, dtype=torch.float32, device=x.device)

        def step(idx: Tensor) -> None:
            b, k = idx % b_sz, idx // b_sz
            bases = (ref[b] if ref is not None else pool[k]) + noise[k]
            diff = x[b] - bases
            pts = (bases + alphas[k].view(-1, 1, 1, 1) * diff).requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(self.objective(self.model(pts), tgt[b]).sum(), pts)
            with torch.no_grad():
                f_base.index_add_(0, b, self.objective(self.model(bases), tgt[b]).float())
            attr.index_add_(0, b, (diff * grad).float())

        self.ctx.chunker.map(self.loop("gradientshap"), b_sz * s.n_samples, s.internal_batch, step, x.device)
        maps = attr.sum(dim=1) / s.n_samples
        f_x = self.objective(logits, tgt).float()
        gap = maps.sum(dim=(1, 2)) - (f_x - f_base / s.n_samples)
        return Result(maps, logits, tgt, {"efficiency_gap": gap})


@register(
    "gradientshap",
    "GradientSHAP / expected gradients: mean of (x - x') * gradient at random points between x and baselines x'",
)
@dataclass
class GradientShap(MethodSpec):
    baseline: str = "black"  # black | mean | blur | uniform (+ noise), or a folder of images
    noise: float = 0.1  # std of the Gaussian noise added to every baseline (normalised units)
    n_samples: int = 50  # (baseline, alpha) pairs per image
    max_images: int = 64  # a folder baseline: its first images (sorted)
    objective: str = "logit"
    blur_sigma: float = 10.0  # for baseline: blur
    seed: int = 0
    internal_batch: int = 32  # path points per forward/backward

    bound = BoundGradientShap
    extras = GAP
    path_params = ("baseline",)
    cost = "F + n_samples x (2 F + B)"
    map_kind = "signed"  # expected gradients x (x - baseline), channels summed
    contract_params: ClassVar[dict] = {"n_samples": 8}  # 50 samples x 3 images x 6 runs: slow on 2 cores there

    def __post_init__(self):
        check_objective_field(self.name, self.objective)
        if self.n_samples < 1 or self.internal_batch < 1 or self.max_images < 1:
            raise MethodError("gradientshap: n_samples, max_images and internal_batch must be >= 1")
        if self.noise < 0:
            raise MethodError("gradientshap: noise must be >= 0")
        if self.baseline not in REFERENCES and not Path(self.baseline).is_dir():
            raise MethodError(
                f"gradientshap: baseline '{self.baseline}' is neither one of {', '.join(REFERENCES)} nor a folder"
            )
