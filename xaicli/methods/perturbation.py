"""Perturbation family: maps from the model's response to masked inputs (no gradient into the
input, or a learned mask).

- `occlusion` (Zeiler & Fergus 2014): a patch slides over the image; a pixel's attribution is the
  mean, over the patches covering it, of f(x) - f(x with the patch filled) (Captum's definition).
- `rise` (Petsiuk 2018): N random s x s binary grids, upsampled with random shifts; map =
  sum_i f(x * M_i) M_i / (N p). The masks come from a seeded CPU generator and are shared by
  every image of the batch; a chunk builds only its own masks (4000 masks at 224 px would be
  800 MB).
- `meaningful_perturbation` (Fong & Vedaldi 2017): a 28 x 28 mask (1 = keep), upsampled and
  blurred, blends the image with its blurred copy; Adam minimises l1 |1 - m|_1 + l2 TV_beta(m) +
  softmax_c(jittered blend). The map is the deletion mask 1 - m (high = evidence).

Inner loops (patch positions, masks, images optimised together) go through the run's chunker.
Every substrate (fill, null image) comes from `ops.reference`; randomness from a CPU generator
seeded by `seed` only (never by an image's position in its batch), so CPU and CUDA agree and a
map does not depend on its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import MethodError
from ..ops import cpu_generator, gaussian_blur, reference
from .base import (
    BoundMethod,
    Context,
    MethodSpec,
    Result,
    check_objective_field,
    check_target,
    register,
    select_target,
)

Substrate = Literal["black", "mean", "blur", "uniform"]  # ops.reference: mean = 0 in normalised space


def substrate(ctx: Context, owner: str, x: Tensor, kind: str, seed: int = 0, blur_sigma: float = 10.0) -> Tensor:
    """ops.reference for a bound method: `black` and `uniform` need the model's mean/std."""
    if kind in ("black", "uniform") and (ctx.mean is None or ctx.std is None):
        raise MethodError(
            f"{owner}: substrate '{kind}' is defined in pixel space and needs the model's normalisation "
            "(a model from load_model(), or a context with mean/std); use 'mean' or 'blur'"
        )
    return reference(x, kind, ctx.mean, ctx.std, seed=seed, blur_sigma=blur_sigma)


def clean_forward(model, x: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        logits = model(x)
    tgt = select_target(logits, target)
    check_target(tgt, logits.shape[1])
    return logits.detach(), tgt


# --------------------------------------------------------------------------------------------
# Occlusion
# --------------------------------------------------------------------------------------------
def patch_starts(n: int, window: int, stride: int) -> list[int]:
    """Captum's positions along one axis: 0, stride, ..., ceil((n - window) / stride) + 1 of them;
    the last window may stick out of the image (it is clipped), so every pixel is covered."""
    return [k * stride for k in range(math.ceil((n - window) / stride) + 1)]


class BoundOcclusion(BoundMethod):
    def compute(self, x: Tensor, target: Tensor | None) -> Result:
        s = self.spec
        x = x.detach()
        logits, tgt = clean_forward(self.model, x, target)
        h, w = x.shape[-2:]
        wh, ww = min(s.window, h), min(s.window, w)  # a window larger than the image covers it
        sh, sw = max(1, min(s.stride, wh)), max(1, min(s.stride, ww))
        rows, cols = patch_starts(h, wh, sh), patch_starts(w, ww, sw)
        pos = torch.tensor([(r, c) for r in rows for c in cols], device=x.device)  # [P, 2]
        fill = substrate(self.ctx, s.name, x, s.fill, s.seed, s.blur_sigma)
        f_x = self.objective(logits, tgt).float()
        b_sz = x.shape[0]
        ar_h = torch.arange(h, device=x.device)
        ar_w = torch.arange(w, device=x.device)

        def masks(p: Tensor) -> Tensor:  # [n] position indices -> [n, 1, H, W] 1 inside the patch
            r, c = pos[p, 0], pos[p, 1]
            mr = (ar_h[None] >= r[:, None]) & (ar_h[None] < r[:, None] + wh)
            mc = (ar_w[None] >= c[:, None]) & (ar_w[None] < c[:, None] + ww)
            return (mr[:, :, None] & mc[:, None, :])[:, None].to(x.dtype)

        acc = torch.zeros((b_sz, h, w), dtype=torch.float32, device=x.device)

        def step(idx: Tensor) -> None:
            b, p = idx % b_sz, idx // b_sz
            m = masks(p)
            with torch.no_grad():
                out = self.model(x[b] * (1 - m) + fill[b] * m)
            diff = f_x[b] - self.objective(out, tgt[b]).float()
            acc.index_add_(0, b, diff.view(-1, 1, 1) * m[:, 0].float())

        self.ctx.chunker.map(self.loop("occlusion"), b_sz * len(pos), s.internal_batch, step, x.device)
        # patches covering each pixel: (covering rows) x (covering columns); >= 1 everywhere
        r0, c0 = torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)
        n_r = ((ar_h[:, None] >= r0) & (ar_h[:, None] < r0 + wh)).sum(1)
        n_c = ((ar_w[:, None] >= c0) & (ar_w[:, None] < c0 + ww)).sum(1)
        return Result(acc / (n_r[:, None] * n_c[None, :]).float(), logits, tgt)


@register(
    "occlusion",
    "Occlusion (Zeiler & Fergus 2014): mean drop of the objective over the sliding patches covering a pixel",
)
@dataclass
class Occlusion(MethodSpec):
    window: int = 16  # patch side in pixels (clipped to the image)
    stride: int = 8
    fill: Substrate = (
        "mean"  # what the patch shows: mean (0 in normalised space, Captum's default), black, blur, uniform
    )
    objective: str = "logit"
    blur_sigma: float = 10.0  # pixels, for fill: blur
    seed: int = 0  # for fill: uniform
    internal_batch: int = 64  # occluded images per forward

    bound = BoundOcclusion
    cost = "F + P x F (P patch positions: 729 at 224 px with window 16, stride 8)"
    map_kind = "signed"  # a patch can raise the objective: drops are signed

    def __post_init__(self):
        check_objective_field(self.name, self.objective)
        if self.window < 1 or self.stride < 1 or self.internal_batch < 1:
            raise MethodError("occlusion: window, stride and internal_batch must be >= 1")


# --------------------------------------------------------------------------------------------
# RISE
# --------------------------------------------------------------------------------------------
class BoundRise(BoundMethod):
    def grids(self, h: int, w: int):
        """(binary grids [N, s, s], shifts [N, 2], cell size): from the seed only, on the CPU."""
        s = self.spec
        g = cpu_generator(s.seed)
        grid = (torch.rand((s.n_masks, s.cells, s.cells), generator=g) < s.p).float()
        ch, cw = math.ceil(h / s.cells), math.ceil(w / s.cells)
        shifts = torch.stack(
            [torch.randint(0, ch, (s.n_masks,), generator=g), torch.randint(0, cw, (s.n_masks,), generator=g)], 1
        )
        return grid, shifts, (ch, cw)

    def compute(self, x: Tensor, target: Tensor | None) -> Result:
        s = self.spec
        x = x.detach()
        logits, tgt = clean_forward(self.model, x, target)
        b_sz, (h, w) = x.shape[0], x.shape[-2:]
        grid, shifts, (ch, cw) = self.grids(h, w)
        grid, shifts = grid.to(x.device), shifts.to(x.device)
        big = ((s.cells + 1) * ch, (s.cells + 1) * cw)
        ar_h = torch.arange(h, device=x.device)
        ar_w = torch.arange(w, device=x.device)
        base = substrate(self.ctx, s.name, x, s.substrate, s.seed, s.blur_sigma)
        acc = torch.zeros((b_sz, h, w), dtype=torch.float32, device=x.device)

        def masks(k: Tensor) -> Tensor:  # [n] mask indices -> [n, H, W] in [0, 1]
            up = F.interpolate(grid[k][:, None], size=big, mode="bilinear", align_corners=False)[:, 0]
            r = (shifts[k, 0][:, None] + ar_h[None])[:, :, None].expand(-1, h, w)
            c = (shifts[k, 1][:, None] + ar_w[None])[:, None, :].expand(-1, h, w)
            return up[torch.arange(len(k), device=x.device)[:, None, None], r, c]

        def step(idx: Tensor) -> None:
            b, k = idx % b_sz, idx // b_sz
            m = masks(k)
            mx = m[:, None].to(x.dtype)
            with torch.no_grad():
                score = self.objective(self.model(base[b] + mx * (x[b] - base[b])), tgt[b]).float()
            acc.index_add_(0, b, score.view(-1, 1, 1) * m.float())

        self.ctx.chunker.map(self.loop("rise"), b_sz * s.n_masks, s.internal_batch, step, x.device)
        return Result(acc / (s.n_masks * s.p), logits, tgt)


@register(
    "rise",
    "RISE (Petsiuk 2018): mean of random smooth masks weighted by the class probability of the masked image",
)
@dataclass
class Rise(MethodSpec):
    n_masks: int = 4000  # N (the paper's ResNet-50 setting)
    cells: int = 7  # s: the masks' grid is s x s
    p: float = 0.5  # probability that a cell is kept
    objective: str = "prob"  # softmax probability, as the paper
    substrate: Substrate = "mean"  # what a masked-out pixel becomes: mean = x * M in normalised space (the paper)
    blur_sigma: float = 10.0
    seed: int = 0
    internal_batch: int = 64  # masked images per forward

    bound = BoundRise
    cost = "F + N x F (N = n_masks)"
    map_kind = "positive"  # a weighted mean of binary masks
    contract_params: ClassVar[dict] = {"n_masks": 48}  # 4000 masks x 3 images x 6 runs is too slow for the contract

    def __post_init__(self):
        check_objective_field(self.name, self.objective)
        if self.n_masks < 1 or self.cells < 1 or self.internal_batch < 1:
            raise MethodError("rise: n_masks, cells and internal_batch must be >= 1")
        if not 0 < self.p <= 1:
            raise MethodError("rise: p must be in (0, 1]")


# --------------------------------------------------------------------------------------------
# Meaningful perturbation
# --------------------------------------------------------------------------------------------
def total_variation(m: Tensor, beta: float) -> Tensor:
    """sum over the mask of |d m/d row|^beta + |d m/d col|^beta, per image: [B, 1, h, w] -> [B]."""
    dr = (m[:, :, 1:, :] - m[:, :, :-1, :]).abs().pow(beta).sum(dim=(1, 2, 3))
    dc = (m[:, :, :, 1:] - m[:, :, :, :-1]).abs().pow(beta).sum(dim=(1, 2, 3))
    return dr + dc


class BoundMeaningful(BoundMethod):
    def compute(self, x: Tensor, target: Tensor | None) -> Result:
        s = self.spec
        x = x.detach()
        logits, tgt = clean_forward(self.model, x, target)
        b_sz, (h, w) = x.shape[0], x.shape[-2:]
        scale = h / 224.0  # blur radii and jitter are given at the paper's 224 px
        null = substrate(self.ctx, s.name, x, "blur", blur_sigma=s.null_blur * scale)
        g = cpu_generator(s.seed)  # one jitter per iteration, shared by every image
        j = max(0, round(s.jitter * scale))
        shifts = torch.randint(-j, j + 1, (s.iterations, 2), generator=g).tolist()
        keep = torch.empty((b_sz, 1, h, w), dtype=torch.float32, device=x.device)
        final = torch.empty(b_sz, dtype=torch.float32, device=x.device)

        def upsample(m: Tensor) -> Tensor:
            up = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
            if s.mask_blur > 0:
                up = gaussian_blur(up, s.mask_blur * scale)
            # clamp to [0, 1] against rounding without a zero gradient: the blurred all-ones
            # initial mask is 1 + 1e-7 in places, where a plain clamp would freeze it forever
            return up + (up.clamp(0, 1) - up).detach()

        def optimise(idx: Tensor) -> None:
            xb, nb, tb = x[idx], null[idx], tgt[idx]
            m = torch.ones((len(idx), 1, s.mask_size, s.mask_size), device=x.device, requires_grad=True)
            opt = torch.optim.Adam([m], lr=s.lr)
            with torch.enable_grad():
                for dy, dx in shifts:
                    up = upsample(m).to(x.dtype)
                    blend = nb + up * (xb - nb)
                    if dy or dx:
                        blend = torch.roll(blend, shifts=(dy, dx), dims=(2, 3))
                    score = self.objective(self.model(blend), tb).float()
                    loss = s.l1 * (1 - m).abs().sum(dim=(1, 2, 3)) + s.tv * total_variation(m, s.beta) + score
                    opt.zero_grad(set_to_none=True)
                    loss.sum().backward()  # a sum: each image's mask gets its own gradient (Adam is per element)
                    opt.step()
                    with torch.no_grad():
                        m.clamp_(0, 1)
            with torch.no_grad():
                up = upsample(m)
                keep[idx] = up.float()
                final[idx] = self.objective(self.model(nb + up.to(x.dtype) * (xb - nb)), tb).float()

        self.ctx.chunker.map(self.loop("meaningful_perturbation"), b_sz, s.internal_batch, optimise, x.device)
        deletion = 1 - keep[:, 0]
        extras = {"mp_prob": final, "mp_area": deletion.mean(dim=(1, 2))}
        return Result(deletion, logits, tgt, extras)


@register(
    "meaningful_perturbation",
    "Meaningful perturbation (Fong & Vedaldi 2017): the smallest smooth blur mask that removes the class (Adam)",
)
@dataclass
class MeaningfulPerturbation(MethodSpec):
    iterations: int = 300
    lr: float = 0.1  # Adam
    l1: float = 1e-4  # lambda1: weight of |1 - m|_1 (sum over the 28 x 28 mask)
    tv: float = 1e-2  # lambda2: weight of TV_beta(m)
    beta: float = 3.0
    mask_size: int = 28  # the mask's side (224 / mask_scale 8), resized to the input
    mask_blur: float = 5.0  # sigma (px at 224) of the blur of the upsampled mask
    null_blur: float = 10.0  # sigma (px at 224) of the blurred image that replaces deleted pixels
    jitter: int = 4  # max shift (px at 224) of the perturbed image per iteration
    objective: str = "prob"  # softmax probability, as the paper
    seed: int = 0
    internal_batch: int = 16  # images optimised together

    bound = BoundMeaningful
    extras = {
        "mp_prob": "objective (softmax probability) of the target on the final perturbed image",
        "mp_area": "fraction of the image the deletion mask removes (mean of 1 - m)",
    }
    cost = "F + iterations x (F + B)"
    map_kind = "positive"  # the deletion mask, 1 = evidence
    contract_params: ClassVar[dict] = {"iterations": 6}  # 300 optimiser steps x 6 runs are too slow there

    def __post_init__(self):
        check_objective_field(self.name, self.objective)
        if self.iterations < 1 or self.mask_size < 2 or self.internal_batch < 1:
            raise MethodError("meaningful_perturbation: iterations, internal_batch >= 1 and mask_size >= 2")
        if self.lr <= 0 or self.beta <= 0 or min(self.l1, self.tv, self.mask_blur, self.null_blur, self.jitter) < 0:
            raise MethodError("meaningful_perturbation: lr, beta > 0; l1, tv, blurs and jitter >= 0")
