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
- `extremal_perturbation` (Fong, Patrick & Vedaldi 2019): for each area a, the smooth mask of
  area a (1 = keep) whose preserved image (the rest blurred) scores highest; the area is held by a
  rank penalty on the sorted mask (over the image and a margin, so no place is cheaper) instead of
  lambda-weighted L1/TV. One map per area.

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


def blurred_disks(h: int, w: int, radii: list[float], sigma: float, device) -> Tensor:
    """[R, 1, h, w]: a disk of each radius centred at (h // 2, w // 2), Gaussian-blurred (sigma)."""
    yy = (torch.arange(h, device=device, dtype=torch.float32) - h // 2)[:, None]
    xx = (torch.arange(w, device=device, dtype=torch.float32) - w // 2)[None, :]
    r = torch.as_tensor(radii, device=device, dtype=torch.float32).view(-1, 1, 1, 1)
    return gaussian_blur(((yy**2 + xx**2)[None, None] <= r**2).float(), sigma)


class BoundMeaningful(BoundMethod):
    def circle_init(self, xb: Tensor, nb: Tensor, tb: Tensor, scale: float) -> Tensor:
        """`init: circle`, the start of the authors' Caffe script (generate_learned_mask) [n, 1, h, w]
        (1 = keep): 1 - the smallest centred blurred disk
        (radii 0, 5, ..., 170 px at 224, blur sigma 10) whose deletion brings the objective to
        within 1 % of the largest disk's, (f_r - f_170) / (f(x) - f_170) < 0.01; the largest if none."""
        h, w = xb.shape[-2:]
        radii = [r * scale for r in range(0, 175, 5)]
        keep = 1 - blurred_disks(h, w, radii, 10.0 * scale, xb.device)  # [R, 1, h, w]
        with torch.no_grad():
            f_x = self.objective(self.model(xb), tb).float()
            f = torch.stack(
                [self.objective(self.model(nb + k.to(xb.dtype) * (xb - nb)), tb).float() for k in keep], dim=1
            )  # [n, R]
        rel = (f - f[:, -1:]) / (f_x - f[:, -1])[:, None]
        below = rel < 0.01
        first = torch.where(below.any(dim=1), below.float().argmax(dim=1), torch.full_like(tb, len(radii) - 1))
        return keep[first]

    def compute(self, x: Tensor, target: Tensor | None) -> Result:
        s = self.spec
        x = x.detach()
        logits, tgt = clean_forward(self.model, x, target)
        b_sz, (h, w) = x.shape[0], x.shape[-2:]
        scale = h / 224.0  # blur radii and jitter are given at the paper's 224 px
        null = substrate(self.ctx, s.name, x, "blur", blur_sigma=s.null_blur * scale)
        g = cpu_generator(s.seed)  # one jitter per iteration, shared by every image
        j = max(0, round(s.jitter * scale))
        # the image (and its blurred copy) moves under the fixed mask by (dy, dx) in [0, j)^2: the
        # official code crops a (224 + j)-px image at a random offset, the paper's x0(. - tau)
        shifts = torch.randint(0, max(j, 1), (s.iterations, 2), generator=g).tolist()
        keep = torch.empty((b_sz, 1, h, w), dtype=torch.float32, device=x.device)
        final = torch.empty(b_sz, dtype=torch.float32, device=x.device)

        def upsample(m: Tensor) -> Tensor:
            up = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
            if s.mask_blur > 0:
                up = gaussian_blur(up, s.mask_blur * scale)
            # clamp to [0, 1] against rounding without a zero gradient: the blurred all-ones
            # initial mask is 1 + 1e-7 in places, where a plain clamp would freeze it forever
            return up + (up.clamp(0, 1) - up).detach()

        def shifted(t: Tensor, dy: int, dx: int) -> Tensor:
            if not (dy or dx):
                return t
            return F.pad(t, (0, dx, 0, dy), mode="replicate")[:, :, dy : dy + h, dx : dx + w]

        def optimise(idx: Tensor) -> None:
            xb, nb, tb = x[idx], null[idx], tgt[idx]
            if s.init == "circle":
                start = F.interpolate(self.circle_init(xb, nb, tb, scale), size=(s.mask_size,) * 2, mode="nearest")
            else:
                start = torch.ones((len(idx), 1, s.mask_size, s.mask_size), device=x.device)
            m = start.float().clone().requires_grad_(True)
            opt = torch.optim.Adam([m], lr=s.lr)
            with torch.enable_grad():
                for dy, dx in shifts:
                    up = upsample(m).to(x.dtype)
                    xs, ns = shifted(xb, dy, dx), shifted(nb, dy, dx)
                    score = self.objective(self.model(ns + up * (xs - ns)), tb).float()
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
    jitter: int = 4  # the image moves under the mask by 0..jitter-1 px (at 224) per axis, per iteration
    init: Literal["ones", "circle"] = "ones"  # ones: keep everything; circle: the Caffe script's start (a deleted disk)
    objective: str = "prob"  # softmax probability, as the paper
    seed: int = 0
    internal_batch: int = 16  # images optimised together

    bound = BoundMeaningful
    extras = {
        "mp_prob": "objective (softmax probability) of the target on the final perturbed image",
        "mp_area": "fraction of the image the deletion mask removes (mean of 1 - m)",
    }
    cost = "F + iterations x (F + B) (+ 36 F with init: circle)"
    map_kind = "positive"  # the deletion mask, 1 = evidence
    contract_params: ClassVar[dict] = {"iterations": 6}  # 300 optimiser steps x 6 runs are too slow there

    def __post_init__(self):
        check_objective_field(self.name, self.objective)
        if self.iterations < 1 or self.mask_size < 2 or self.internal_batch < 1:
            raise MethodError("meaningful_perturbation: iterations, internal_batch >= 1 and mask_size >= 2")
        if self.lr <= 0 or self.beta <= 0 or min(self.l1, self.tv, self.mask_blur, self.null_blur, self.jitter) < 0:
            raise MethodError("meaningful_perturbation: lr, beta > 0; l1, tv, blurs and jitter >= 0")


# --------------------------------------------------------------------------------------------
# Extremal perturbation
# --------------------------------------------------------------------------------------------
def smooth_kernel(h: int, w: int, step: int, sigma: float, radius: int, device) -> Tensor:
    """[(2r+1)^2, h, w]: k(|u - c_v| / sigma) for each pixel u and the (2r+1)^2 parameter cells v
    around u's cell (cell centres c_v = step v + (step - 1) / 2); k(z) = exp(-2 max(0, z - 1/2)^2),
    flat within sigma/2 and Gaussian (std sigma/2) beyond (the smooth kernel of the paper's
    reference implementation). h, w: multiples of step (the grid's extent)."""
    off = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    centre = (step - 1) / 2

    def dist(n: int) -> Tensor:  # [2r+1, n]: from pixel u to the centres of the cells around its cell
        u = torch.arange(n, dtype=torch.float32, device=device)
        return u[None] - (step * (torch.div(u, step, rounding_mode="floor")[None] + off[:, None]) + centre)

    dy, dx = dist(h), dist(w)
    z = torch.sqrt(dy[:, None, :, None] ** 2 + dx[None, :, None, :] ** 2) / sigma  # [2r+1, 2r+1, h, w]
    return torch.exp(-2 * (z - 0.5).clamp(min=0) ** 2).reshape(-1, h, w)


def smooth_mask(param: Tensor, kernel: Tensor, step: int, radius: int, coldness: float, size) -> Tensor:
    """The paper's smooth mask m(u) = smax_v k(u - c_v) pbar_v at every pixel u, over the parameter
    cells v within `radius` cells of u's cell (smax = the softmax-weighted mean with coldness T;
    the max as T -> inf). param [N, 1, gh, gw] (zero outside the grid), kernel from smooth_kernel
    for (gh step, gw step) -> [N, 1, *size]."""
    n, k2 = param.shape[0], kernel.shape[0]
    gh, gw = param.shape[-2:]
    u = F.unfold(param, 2 * radius + 1, padding=radius).view(n, k2, gh, 1, gw, 1)
    s = u * kernel.view(1, k2, gh, step, gw, step)  # the pixels of a cell read the same parameters
    m = (s * torch.softmax(coldness * s, dim=1)).sum(dim=1).view(n, 1, gh * step, gw * step)
    return m[:, :, : size[0], : size[1]]


def blur_pyramid(x: Tensor, levels: int, max_blur: float) -> Tensor:
    """[B, L, C, H, W]: level l is x blurred with sigma = max_blur (1 - l / (L - 1)); level L-1 is x."""
    return torch.stack([gaussian_blur(x, max_blur * (1 - lvl / (levels - 1))) for lvl in range(levels)], dim=1)


def apply_pyramid(pyr: Tensor, m: Tensor) -> Tensor:
    """The blur perturbation: each pixel reads the pyramid at level m (L - 1), linearly interpolated
    between the two levels around it (m = 1: the image, m = 0: the strongest blur). The lower level
    is at most L - 2, so at m = 1 the gradient is the one-sided difference to the level below (a
    floor at L - 1 would give a zero gradient to every fully kept pixel).
    pyr [N, L, C, H, W], m [N, 1, H, W] in [0, 1] -> [N, C, H, W]."""
    levels = pyr.shape[1]
    pos = m.to(pyr.dtype) * (levels - 1)
    lo = pos.detach().floor().clamp(0, levels - 2)
    frac = (pos - lo)[:, :, None]  # [N, 1, 1, H, W]
    idx = lo.long()[:, :, None].expand(-1, -1, pyr.shape[2], -1, -1)  # [N, 1, C, H, W]
    y0, y1 = pyr.gather(1, idx), pyr.gather(1, idx + 1)
    return (y0 + frac * (y1 - y0))[:, 0]


def area_name(a: float) -> str:
    return f"area_{a:g}"


class BoundExtremal(BoundMethod):
    def geometry(self, h: int, w: int):
        """(step, sigma, max_blur, radius) at this input size: the paper's values are at 224 px."""
        s = self.spec
        scale = min(h, w) / 224.0
        step = max(1, round(s.step * scale))
        sigma = max(s.sigma * scale, 1e-3)
        radius = 1 + math.ceil(sigma / step)
        return step, sigma, s.max_blur * scale, radius

    def compute(self, x: Tensor, target: Tensor | None) -> Result:
        s = self.spec
        x = x.detach()
        logits, tgt = clean_forward(self.model, x, target)
        b_sz, (h, w) = x.shape[0], x.shape[-2:]
        k = len(s.areas)
        step, sigma, max_blur, radius = self.geometry(h, w)
        gh, gw = math.ceil(h / step), math.ceil(w / step)
        # The mask is evaluated, and its area counted, over the image plus a margin of `pad` cells
        # (>= sigma px) on each side, as the reference does: a blob's tail outside the image costs
        # area too. Counted on the image alone, a blob at a border or corner costs a half or a
        # quarter of one inside, and the masks drift there (on coffee.png: blobs at the borders,
        # p 0.007 at area 0.2). The parameters stay on the image's grid (zero in the margin).
        pad = radius
        ph, pw, off = (gh + 2 * pad) * step, (gw + 2 * pad) * step, pad * step
        kernel = smooth_kernel(ph, pw, step, sigma, radius, x.device)
        n_px = ph * pw
        # the sorted mask's target: a * h * w ones (a of the image's area; the reference's
        # a * ph * pw keeps ~1.4 a of a 224-px image), zeros elsewhere (per area)
        ref = torch.ones((k, n_px), device=x.device)
        for i, a in enumerate(s.areas):
            ref[i, : n_px - int(round(a * h * w))] = 0

        def mask_of(param: Tensor) -> tuple[Tensor, Tensor]:  # (over image + margin, on the image)
            full = smooth_mask(F.pad(param, (pad,) * 4), kernel, step, radius, s.coldness, (ph, pw))
            return full, full[:, :, off : off + h, off : off + w]

        masks = torch.empty((b_sz, k, h, w), dtype=torch.float32, device=x.device)
        prob = torch.empty((b_sz, k), dtype=torch.float32, device=x.device)

        def optimise(idx: Tensor) -> None:
            n = len(idx)
            pyr = blur_pyramid(x[idx], s.levels, max_blur).repeat_interleave(k, dim=0)  # [n k, L, C, H, W]
            tb = tgt[idx].repeat_interleave(k)
            r = ref.repeat(n, 1)
            param = torch.ones((n * k, 1, gh, gw), device=x.device, requires_grad=True)
            opt = torch.optim.SGD([param], lr=s.lr, momentum=s.momentum, dampening=s.momentum)
            weight = s.regul_weight
            with torch.enable_grad():
                for t in range(s.iterations):
                    full, m = mask_of(param)
                    xp = apply_pyramid(pyr, m).to(x.dtype)
                    if s.jitter and t % 2 == 0:
                        xp = torch.flip(xp, dims=(3,))
                    reward = self.objective(self.model(xp), tb).float()
                    regul = ((full.flatten(1).sort(dim=1).values - r) ** 2).mean(dim=1)
                    opt.zero_grad(set_to_none=True)
                    (weight * regul - reward).sum().backward()  # each mask its own term: per-element steps
                    opt.step()
                    with torch.no_grad():
                        param.clamp_(0, 1)
                    weight *= s.regul_growth
            with torch.no_grad():
                m = mask_of(param)[1].clamp(0, 1)
                out = self.model(apply_pyramid(pyr, m).to(x.dtype))
                masks[idx] = m.view(n, k, h, w).float()
                prob[idx] = torch.softmax(out.float(), dim=1).gather(1, tb[:, None])[:, 0].view(n, k)

        self.ctx.chunker.map(self.loop("extremal_perturbation"), b_sz, s.internal_batch, optimise, x.device)
        extras = {}
        for i, a in enumerate(s.areas):
            extras[f"ep_prob_{a:g}"] = prob[:, i]
            extras[f"ep_area_{a:g}"] = masks[:, i].mean(dim=(1, 2))
        return Result(masks, logits, tgt, extras)


def _extremal_extras(areas) -> dict[str, str]:
    out = {}
    for a in areas:
        out[f"ep_prob_{a:g}"] = f"softmax probability of the target on the image preserved by the area-{a:g} mask"
        out[f"ep_area_{a:g}"] = f"mean of the area-{a:g} mask (the area it reached; {a:g} asked)"
    return out


@register(
    "extremal_perturbation",
    "Extremal perturbation (Fong, Patrick & Vedaldi 2019): per area a, the smooth mask of area a whose preserved region keeps the score highest",
)
@dataclass
class ExtremalPerturbation(MethodSpec):
    areas: tuple[float, ...] = (0.05, 0.1, 0.2)  # fractions of the image kept: one map per area
    iterations: int = 800
    lr: float = 0.01  # SGD with momentum (the reference's optimiser)
    momentum: float = 0.9
    regul_weight: float = 300.0  # lambda of the area rank penalty at the first iteration
    regul_growth: float = 1.0035  # lambda is multiplied by this after each iteration
    step: int = 7  # px (at 224) between the mask's parameters
    sigma: float = 21.0  # px (at 224): the smooth kernel's size
    coldness: float = 20.0  # T of the smooth max
    max_blur: float = 20.0  # sigma (px at 224) of the strongest blur (a deleted pixel)
    levels: int = 8  # blur levels the perturbation interpolates between
    jitter: bool = True  # flip the perturbed image horizontally every other iteration
    objective: str = "logit"  # the reward: the model's output for the target (the reference's)
    internal_batch: int = 4  # images optimised together (each with len(areas) masks)

    bound = BoundExtremal
    map_names: ClassVar[tuple[str, ...]] = tuple(area_name(a) for a in (0.05, 0.1, 0.2))
    extras: ClassVar[dict[str, str]] = _extremal_extras((0.05, 0.1, 0.2))
    cost = "F + iterations x n_areas x (F + B) (one mask per area, all optimised in one batch)"
    map_kind = "positive"  # the preservation mask, 1 = kept (evidence)
    contract_params: ClassVar[dict] = {"iterations": 6}  # 800 steps x 3 areas x 6 runs are too slow there

    def __post_init__(self):
        check_objective_field(self.name, self.objective)
        self.areas = tuple(float(a) for a in self.areas)
        if not self.areas or any(not 0 < a < 1 for a in self.areas):
            raise MethodError("extremal_perturbation: areas must be a non-empty list of fractions in (0, 1)")
        if len({area_name(a) for a in self.areas}) != len(self.areas):
            raise MethodError("extremal_perturbation: areas must be distinct")
        if self.iterations < 1 or self.step < 1 or self.internal_batch < 1 or self.levels < 2:
            raise MethodError("extremal_perturbation: iterations, step, internal_batch >= 1 and levels >= 2")
        if self.lr <= 0 or self.sigma <= 0 or self.max_blur <= 0 or self.coldness <= 0:
            raise MethodError("extremal_perturbation: lr, sigma, max_blur and coldness must be > 0")
        if not 0 <= self.momentum < 1 or self.regul_weight < 0 or self.regul_growth < 1:
            raise MethodError("extremal_perturbation: momentum in [0, 1), regul_weight >= 0, regul_growth >= 1")
        # the maps and CSV columns depend on `areas`: instance values shadow the class defaults
        self.map_names = tuple(area_name(a) for a in self.areas)
        self.extras = _extremal_extras(self.areas)
