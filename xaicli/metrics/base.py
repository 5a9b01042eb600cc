"""Metric contract, registry and the shared machinery (normalisation, AUC, chunked forwards).

A metric scores maps of one method on a preprocessed batch, on the batch's device:
    metric(model, x [B,3,H,W], maps [B,H,W], target LongTensor[B], **extras) -> dict[str, Tensor]
Values of shape [B] are per-image scores (one metrics.csv row each); values of shape [B, S] are
curves (averaged per method and plotted). Extras a metric declares in `needs`:
    boxes      list (len B) of FloatTensor [k, 4] ground-truth boxes in the model-input frame
    reference  maps [B,H,W] of the `against` method (Win %)
    method     the Method object that made `maps` (sanity checks recompute maps)
Parameters are dataclass fields, validated like method parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import build_registered, public_fields, registrar

METRICS: dict[str, type[Metric]] = {}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


register = registrar(METRICS)  # @register(name, one-line description) on a Metric dataclass


@dataclass
class Metric:
    """Base class. Subclasses set `curve_x`/`direction` and implement `__call__`."""

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    # which way is better for the metric's main value: "lower" or "higher"
    direction: ClassVar[str] = "higher"
    # other per-image values the metric writes, with their direction (e.g. box-loc also writes box-iou)
    outputs: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        self._mean: tuple[float, float, float] = IMAGENET_MEAN
        self._std: tuple[float, float, float] = IMAGENET_STD

    def prepare(self, preprocess) -> None:
        """Take the model's normalisation (mean/std) from its Preprocess; called once."""
        if preprocess is not None:
            self._mean, self._std = tuple(preprocess.mean), tuple(preprocess.std)

    def __call__(self, model: nn.Module, x: Tensor, maps: Tensor, target: Tensor, **extras) -> dict[str, Tensor]:
        raise NotImplementedError

    def curve_x(self, steps: int) -> list[float]:
        """x coordinates of this metric's curve points (for plots)."""
        return list(range(steps))

    score_label: ClassVar[str] = "score"  # what the per-image value of a curve metric is called
    curve_xlabel: ClassVar[str] = "step"
    curve_ylabel: ClassVar[str] = "softmax probability of the target class"

    @classmethod
    def params(cls) -> list[dataclasses.Field]:
        return public_fields(cls)

    # -- helpers in normalised / pixel space -----------------------------------------------
    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = torch.tensor(self._mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self._std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return mean, std


def direction_of(name: str) -> str:
    """'lower' / 'higher' for a metrics.csv metric name (a metric or one of its extra outputs)."""
    if name in METRICS:
        return METRICS[name]().direction
    for cls in METRICS.values():
        if name in cls.outputs:
            return cls.outputs[name]
    return ""


def build_metric(name: str, **params) -> Metric:
    """Validate `params` against the metric's dataclass fields and build it."""
    return build_registered(METRICS, "metric", name, params, ConfigError)


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------
def normalize01(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-image min-max to [0, 1]. A constant map becomes all ones if positive, else all zeros
    (a map of ones keeps the whole image; a map of zeros keeps nothing; never NaN)."""
    flat = maps.flatten(1).float()
    lo, hi = flat.amin(1), flat.amax(1)
    rng = hi - lo
    const = rng <= eps
    out = (flat - lo[:, None]) / torch.where(const, torch.ones_like(rng), rng)[:, None]
    fill = (hi > 0).float()[:, None].expand_as(out)
    out = torch.where(const[:, None], fill, out)
    return out.view_as(maps)


def auc(curve: Tensor) -> Tensor:
    """Normalised area under curves [B, n+1] sampled at n equal steps over [0, 1]:
    (sum s - s_0/2 - s_n/2) / n (the trapezoid rule; definitions item 13)."""
    n = curve.shape[1] - 1
    if n <= 0:
        return curve[:, 0]
    return (curve.sum(1) - curve[:, 0] / 2 - curve[:, -1] / 2) / n


def target_probs(model: nn.Module, xs: Tensor, target: Tensor, internal_batch: int) -> Tensor:
    """Softmax probability of `target[i]` for each image xs[i], in chunks of `internal_batch`."""
    out = []
    with torch.no_grad():
        for i in range(0, xs.shape[0], internal_batch):
            logits = model(xs[i : i + internal_batch]).float()
            out.append(torch.softmax(logits, 1).gather(1, target[i : i + internal_batch, None])[:, 0])
    return torch.cat(out) if out else xs.new_zeros(0)


def chunked_probs(
    model: nn.Module, total: int, make: Callable[[Tensor], tuple[Tensor, Tensor]], internal_batch: int, device
) -> Tensor:
    """Score `total` perturbed images built on demand: `make(idx)` -> (images [C,3,H,W],
    targets [C]) for flat indices idx; the model sees at most `internal_batch` images at once."""
    out = []
    with torch.no_grad():
        for start in range(0, total, internal_batch):
            idx = torch.arange(start, min(start + internal_batch, total), device=device)
            imgs, tgt = make(idx)
            logits = model(imgs).float()
            out.append(torch.softmax(logits, 1).gather(1, tgt[:, None])[:, 0])
    return torch.cat(out)


def gaussian_blur(x: Tensor, klen: int = 11, sigma: float = 5.0) -> Tensor:
    """Depthwise Gaussian blur [B,C,H,W] (RISE's insertion substrate: klen 11, sigma 5), reflect padding."""
    ax = torch.arange(klen, device=x.device, dtype=x.dtype) - (klen - 1) / 2
    k1 = torch.exp(-(ax**2) / (2 * sigma**2))
    k1 = k1 / k1.sum()
    c = x.shape[1]
    pad = klen // 2
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    y = F.pad(x, (pad, pad, pad, pad), mode=mode)
    y = F.conv2d(y, k1.view(1, 1, 1, klen).repeat(c, 1, 1, 1), groups=c)
    y = F.conv2d(y, k1.view(1, 1, klen, 1).repeat(c, 1, 1, 1), groups=c)
    return y
