"""Metric contract, registry and the shared machinery (AUC, the chunked scorer).

A metric scores maps of one method on a preprocessed batch, on the batch's device:
    metric(ctx_or_model, x [B,3,H,W], maps [B,H,W], target LongTensor[B], **extras) -> MetricResult
`ctx_or_model` is a methods.base.Context (the engine's: model, mean/std, the run's chunker) or a
bare nn.Module (ImageNet mean/std, a fresh chunker). A MetricResult holds data, not file names:
    scores  {name: Tensor[B]}          one metrics.csv row per image each (res["deletion"])
    curves  {name: Curve(x, y[B,S])}   averaged per method, plotted against their own x-axis
    table   [ {index: image in batch, ...}, ... ]   extra rows (sanity.csv)
Extras a metric declares in `needs`:
    boxes      list (len B) of FloatTensor [k, 4] ground-truth boxes in the model-input frame
    reference  maps [B,H,W] of the `against` method (Win %)
    method     the BoundMethod that made `maps` (sanity checks rebind it to randomized copies)
Parameters are dataclass fields, validated like method parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError
from ..methods.base import Context, make_context
from ..ops import gaussian_blur, normalize01  # noqa: F401  (one of each; re-exported for metrics)
from ..registry import build_registered, public_fields, registrar

METRICS: dict[str, type[Metric]] = {}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


register = registrar(METRICS)  # @register(name, one-line description) on a Metric dataclass


@dataclass
class Curve:
    """A per-image curve y [B, S] sampled at x [S], with what its axes and its score are called."""

    x: list[float]
    y: Tensor
    xlabel: str = "step"
    ylabel: str = "softmax probability of the target class"
    score_label: str = "score"


@dataclass
class MetricResult(Mapping):
    scores: dict[str, Tensor] = field(default_factory=dict)
    curves: dict[str, Curve] = field(default_factory=dict)
    table: list[dict] = field(default_factory=list)

    def __getitem__(self, name: str) -> Tensor:
        return self.scores[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.scores)

    def __len__(self) -> int:
        return len(self.scores)


def as_context(model) -> Context:
    """The engine's Context as is; a bare nn.Module with ImageNet mean/std and a fresh chunker."""
    if isinstance(model, Context):
        return model
    ctx = make_context(model)
    if ctx.mean is None:
        ctx.mean, ctx.std = IMAGENET_MEAN, IMAGENET_STD
    return ctx


@dataclass
class Metric:
    """Base class. Subclasses set `direction` and implement `compute`."""

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    # which way is better for the metric's main value: "lower" or "higher"
    direction: ClassVar[str] = "higher"
    # other per-image values the metric writes, with their direction (e.g. box-loc also writes box-iou)
    outputs: ClassVar[dict[str, str]] = {}
    # the interval every per-image value lies in (checked by the contract tests)
    value_range: ClassVar[tuple[float, float]] = (float("-inf"), float("inf"))

    def __call__(self, model, x: Tensor, maps: Tensor, target: Tensor, **extras) -> MetricResult:
        return self.compute(as_context(model), x, maps, target, **extras)

    def compute(self, ctx: Context, x: Tensor, maps: Tensor, target: Tensor, **extras) -> MetricResult:
        raise NotImplementedError

    @classmethod
    def params(cls) -> list[dataclasses.Field]:
        return public_fields(cls)


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
def auc(curve: Tensor) -> Tensor:
    """Normalised area under curves [B, n+1] sampled at n equal steps over [0, 1]:
    (sum s - s_0/2 - s_n/2) / n (the trapezoid rule; definitions item 13)."""
    n = curve.shape[1] - 1
    if n <= 0:
        return curve[:, 0]
    return (curve.sum(1) - curve[:, 0] / 2 - curve[:, -1] / 2) / n


def chunked_probs(
    ctx: Context, key: str, total: int, make: Callable[[Tensor], tuple[Tensor, Tensor]], internal_batch: int
) -> Tensor:
    """Softmax probabilities (sigmoid with the Context's `probability: sigmoid` or one logit) of
    `total` perturbed images built on demand: `make(idx)` -> (images
    [C,3,H,W], targets [C]) for flat indices idx; the model sees at most `internal_batch` images at
    once, fewer after an out-of-memory (the run's chunker)."""

    sigmoid = getattr(ctx, "probability", "softmax") == "sigmoid"

    def score(idx: Tensor) -> Tensor:
        imgs, tgt = make(idx)
        logits = ctx.model(imgs).float()
        if sigmoid or logits.shape[1] == 1:  # `score: sigmoid` and single-logit (binary) heads
            return torch.sigmoid(logits).gather(1, tgt[:, None])[:, 0]
        return torch.softmax(logits, 1).gather(1, tgt[:, None])[:, 0]

    with torch.no_grad():
        out = ctx.chunker.map(key, total, internal_batch, score, ctx.device)
    return torch.cat(out) if out else torch.zeros(0, device=ctx.device)


def target_probs(ctx: Context, xs: Tensor, target: Tensor, internal_batch: int, key: str = "probs") -> Tensor:
    """Softmax probability of `target[i]` for each image xs[i], chunked."""
    return chunked_probs(ctx, key, xs.shape[0], lambda idx: (xs[idx], target[idx]), internal_batch)
