"""Faithfulness: deletion/insertion (Petsiuk 2018), pixel flipping and region perturbation with
AOPC (Bach 2015; Samek 2017), Average Drop / Increase in Confidence / Win % (Grad-CAM++ paper).

Curve metrics build the perturbed images of many (image, step) pairs at once with tensor ops:
the map is ranked once (argsort), a step's mask is `rank < k_step`, and the model scores the
pairs in chunks of `internal_batch`. Nothing loops over single images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..methods.base import Context
from ..ops import normalize01, reference
from ..registry import Batch
from .base import Curve, Metric, MetricResult, auc, chunked_probs, register, target_probs

Substrate = Literal["mean", "zero", "black", "blur", "uniform"]  # zero = black: the names of ops.reference
PosInt = Annotated[int, Field(gt=0, le=1_000_000)]
PosFloat = Annotated[float, Field(gt=0)]


def substrate_images(ctx: Context, x: Tensor, kind: str, seed: int) -> Tensor:
    """What replaces removed pixels, in normalised space, [B,3,H,W] (ops.reference):
    mean = 0 in normalised space (the dataset's mean colour; RISE's deletion), zero (or black) =
    black pixels, blur = Gaussian blur klen 11 sigma 5 of the image (RISE's insertion), uniform =
    uniform noise in [0, 1] pixel space (seeded on the CPU: the same on every device and for
    every image of the batch)."""
    kind = "black" if kind == "zero" else kind
    return reference(x, kind, ctx.mean, ctx.std, seed=seed, blur_sigma=5.0, blur_radius=5)


def unit_ranks(maps: Tensor, patch: int, descending: bool = True) -> tuple[Tensor, tuple[int, int]]:
    """Rank of each unit (pixel, or patch x patch region by summed relevance) in the perturbation
    order: rank [B, U] (0 = perturbed first) and the unit grid (gh, gw). Ties keep index order."""
    b, h, w = maps.shape
    m = maps.float()
    if patch > 1:
        gh, gw = math.ceil(h / patch), math.ceil(w / patch)
        m = F.pad(m, (0, gw * patch - w, 0, gh * patch - h))
        m = F.avg_pool2d(m[:, None], patch, stride=patch)[:, 0] * (patch * patch)
    else:
        gh, gw = h, w
    scores = torch.nan_to_num(m.flatten(1), nan=0.0)
    order = torch.argsort(scores, dim=1, descending=descending, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=maps.device).expand_as(order))
    return ranks, (gh, gw)


def perturbation_curve(
    ctx: Context,
    key: str,
    x: Tensor,
    target: Tensor,
    ranks: Tensor,
    grid: tuple[int, int],
    patch: int,
    counts: Tensor,
    substrate: Tensor,
    insert: bool,
    internal_batch: int,
) -> Tensor:
    """Target probabilities [B, S] after perturbing the first counts[s] units of each image.

    Deletion (insert=False) puts the substrate on the perturbed units; insertion starts from the
    substrate and puts the original back on them. All B*S images are built per chunk from flat
    indices, so a chunk may mix images and steps."""
    b, _, h, w = x.shape
    s = counts.shape[0]
    gh, gw = grid

    def make(idx: Tensor) -> tuple[Tensor, Tensor]:
        bi, si = idx // s, idx % s
        unit_mask = ranks[bi] < counts[si][:, None]  # [C, U]
        mask = unit_mask.view(-1, 1, gh, gw)
        if patch > 1:
            mask = mask.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[..., :h, :w]
        keep, fill = (substrate[bi], x[bi]) if insert else (x[bi], substrate[bi])
        return torch.where(mask, fill, keep), target[bi]

    return chunked_probs(ctx, key, b * s, make, internal_batch).view(b, s)


# --------------------------------------------------------------------------------------------
# deletion / insertion
# --------------------------------------------------------------------------------------------
@register(
    "deletion",
    "Deletion AUC (Petsiuk 2018): remove pixels most-relevant first; area under the probability curve. Lower is better",
)
@dataclass
class Deletion(Metric):
    step: PosFloat = 1792  # pixels per step (>= 1), or a fraction of all pixels (< 1); RISE: 224*8
    substrate: Substrate = "mean"  # what replaces removed pixels
    internal_batch: Batch = 32  # perturbed images per forward pass
    seed: int = 0  # for the uniform substrate

    direction: ClassVar[str] = "lower"
    value_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    insert: ClassVar[bool] = False
    curve_xlabel: ClassVar[str] = "fraction of pixels removed"

    def counts(self, units: int, device) -> Tensor:
        k = max(1, round(self.step * units)) if self.step < 1 else int(self.step)
        n = math.ceil(units / k)
        return torch.clamp(torch.arange(n + 1, device=device) * k, max=units)

    def compute(self, ctx, x, maps, target, **extras) -> MetricResult:
        ranks, grid = unit_ranks(maps, 1)
        units = ranks.shape[1]
        counts = self.counts(units, x.device)
        sub = substrate_images(ctx, x, self.substrate, self.seed)
        y = perturbation_curve(ctx, self.name, x, target, ranks, grid, 1, counts, sub, self.insert, self.internal_batch)
        curve = Curve((counts.float() / units).tolist(), y, self.curve_xlabel, score_label="AUC")
        return MetricResult({self.name: auc(y)}, {self.name: curve})


@register(
    "insertion",
    "Insertion AUC (Petsiuk 2018): restore pixels most-relevant first onto a blurred image. Higher is better",
)
@dataclass
class Insertion(Deletion):
    substrate: Substrate = "blur"  # the image every step starts from

    direction: ClassVar[str] = "higher"
    insert: ClassVar[bool] = True
    curve_xlabel: ClassVar[str] = "fraction of pixels inserted"


# --------------------------------------------------------------------------------------------
# region perturbation / pixel flipping + AOPC
# --------------------------------------------------------------------------------------------
@register(
    "aopc",
    "AOPC of region perturbation (Samek 2017): patches MoRF, mean drop of the probability over L+1 steps. Higher is better",
)
@dataclass
class RegionPerturbation(Metric):
    patch: PosInt = 8  # region side in pixels (regions ranked by summed relevance)
    regions: PosInt | None = 100  # L: regions perturbed in all (None = every region)
    per_step: PosFloat = 1  # regions per step (>= 1), or a fraction of L (< 1)
    substrate: Substrate = "uniform"  # what replaces a perturbed region
    order: Literal["morf", "lerf"] = "morf"  # most relevant first, or least relevant first
    internal_batch: Batch = 32
    seed: int = 0

    curve_xlabel: ClassVar[str] = "regions perturbed"
    value_range: ClassVar[tuple[float, float]] = (-1.0, 1.0)

    @property
    def direction(self) -> str:  # type: ignore[override]
        return "higher" if self.order == "morf" else "lower"

    def compute(self, ctx, x, maps, target, **extras) -> MetricResult:
        ranks, grid = unit_ranks(maps, self.patch, descending=self.order == "morf")
        units = ranks.shape[1]
        total = min(self.regions or units, units)
        k = max(1, round(self.per_step * total)) if self.per_step < 1 else int(self.per_step)
        n = math.ceil(total / k)
        counts = torch.clamp(torch.arange(n + 1, device=x.device) * k, max=total)
        sub = substrate_images(ctx, x, self.substrate, self.seed)
        y = perturbation_curve(
            ctx, self.name, x, target, ranks, grid, self.patch, counts, sub, False, self.internal_batch
        )
        aopc = (y[:, :1] - y).mean(1)  # (1/(L+1)) sum_k f(x^0) - f(x^k)
        curve = Curve([float(c) for c in counts.tolist()], y, self.curve_xlabel, score_label="AOPC")
        return MetricResult({self.name: aopc}, {self.name: curve})


@register(
    "aopc-lerf",
    "AOPC of region perturbation, least relevant first (LeRF). Lower is better",
)
@dataclass
class RegionPerturbationLeRF(RegionPerturbation):
    order: Literal["morf", "lerf"] = "lerf"


@register(
    "pixel-flipping",
    "Pixel flipping (Bach 2015): single pixels MoRF in steps of 2%, reported as AOPC. Higher is better",
)
@dataclass
class PixelFlipping(RegionPerturbation):
    patch: PosInt = 1
    regions: PosInt | None = None
    per_step: PosFloat = 0.02

    curve_xlabel: ClassVar[str] = "pixels flipped"


# --------------------------------------------------------------------------------------------
# Average Drop, Increase in Confidence, Win (Grad-CAM++ paper)
# --------------------------------------------------------------------------------------------
@dataclass
class _Masked(Metric):
    """Y = p(x), O = p(E (.) x) with E the [0,1] min-max map (constant maps: 1 if positive)."""

    value_range: ClassVar[tuple[float, float]] = (0.0, 100.0)
    internal_batch: Batch = 32
    space: Literal["normalized", "pixel"] = (
        "normalized"  # multiply E into the normalised tensor (0 -> mean colour) or into [0,1] pixels (0 -> black)
    )

    def confidences(self, ctx, x, maps, target) -> tuple[Tensor, Tensor]:
        e = normalize01(maps).to(x.dtype)[:, None]
        if self.space == "normalized":
            xm = x * e
        else:
            mean = torch.as_tensor(ctx.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            std = torch.as_tensor(ctx.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            xm = ((x * std + mean) * e - mean) / std
        y = target_probs(ctx, x, target, self.internal_batch, self.name)
        o = target_probs(ctx, xm, target, self.internal_batch, self.name)
        return y, o


@register(
    "avg-drop", "Average Drop % (Grad-CAM++): 100*max(0, Y-O)/Y with O the probability on map*image. Lower is better"
)
@dataclass
class AvgDrop(_Masked):
    direction: ClassVar[str] = "lower"

    def compute(self, ctx, x, maps, target, **extras) -> MetricResult:
        y, o = self.confidences(ctx, x, maps, target)
        return MetricResult({self.name: 100.0 * torch.clamp(y - o, min=0) / y.clamp_min(1e-12)})


@register("increase", "Increase in Confidence % (Grad-CAM++): share of images where O > Y. Higher is better")
@dataclass
class Increase(_Masked):
    direction: ClassVar[str] = "higher"

    def compute(self, ctx, x, maps, target, **extras) -> MetricResult:
        y, o = self.confidences(ctx, x, maps, target)
        return MetricResult({self.name: 100.0 * (o > y).float()})


@register(
    "win",
    "Win % (Grad-CAM++): share of images where this method's confidence drop is smaller than --against's. Higher is better",
)
@dataclass
class Win(_Masked):
    against: str | None = None  # the method (output folder) to compare with

    needs: ClassVar[frozenset[str]] = frozenset({"reference"})
    direction: ClassVar[str] = "higher"

    def compute(self, ctx, x, maps, target, *, reference: Tensor, **extras) -> MetricResult:
        y, o = self.confidences(ctx, x, maps, target)
        _, o_ref = self.confidences(ctx, x, reference, target)
        # relative drops (Y - O) / Y; the smaller one wins, a tie is no win
        drop, drop_ref = (y - o) / y.clamp_min(1e-12), (y - o_ref) / y.clamp_min(1e-12)
        return MetricResult({self.name: 100.0 * (drop < drop_ref).float()})
