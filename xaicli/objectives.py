"""Objectives: the score a method explains, in one place.

An objective maps the logits [B, C] and the target classes [B] to one differentiable score per
image [B]. Gradient methods differentiate it with respect to the input, CAM methods with respect
to a layer, IG integrates it, Score-CAM reads it on masked inputs. Counterfactual Grad-CAM
differentiates the negated objective (with the default logit: `neg_logit`), not a hand-negated
gradient.

    @register_objective("my_score", "what it measures")
    def my_score(logits, target): ...

LRP starts from an initial relevance vector over the classes instead, [B, C]
(`@register_relevance(name, description)`): `logit` (the target logit at the target, 0
elsewhere), and the contrastive `clrp` and `sglrp`, whose entries sum to zero.

Layer 0: imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Objective = Callable[[Tensor, Tensor], Tensor]  # (logits [B, C], target [B]) -> [B]

OBJECTIVES: dict[str, Objective] = {}
DESCRIPTIONS: dict[str, str] = {}


def register_objective(name: str, description: str):
    def deco(fn: Objective) -> Objective:
        OBJECTIVES[name] = fn
        DESCRIPTIONS[name] = description
        return fn

    return deco


@register_objective("logit", "the target class's logit (pre-softmax); the default")
def logit(logits: Tensor, target: Tensor) -> Tensor:
    return logits.gather(1, target[:, None])[:, 0]


@register_objective("prob", "the target class's softmax probability")
def prob(logits: Tensor, target: Tensor) -> Tensor:
    return torch.softmax(logits.float(), dim=1).gather(1, target[:, None])[:, 0]


@register_objective("sigmoid", "the sigmoid of the target logit (multi-label and binary heads, `score: sigmoid`)")
def sigmoid(logits: Tensor, target: Tensor) -> Tensor:
    return torch.sigmoid(logit(logits, target).float())


@register_objective("neg_logit", "minus the target logit: evidence against the class (counterfactual)")
def neg_logit(logits: Tensor, target: Tensor) -> Tensor:
    return -logit(logits, target)


# --------------------------------------------------------------------------------------------
# initial relevance for LRP: (logits [B, C], target [B]) -> [B, C]
# --------------------------------------------------------------------------------------------
RELEVANCE: dict[str, Objective] = {}
RELEVANCE_DESCRIPTIONS: dict[str, str] = {}


def register_relevance(name: str, description: str):
    def deco(fn: Objective) -> Objective:
        RELEVANCE[name] = fn
        RELEVANCE_DESCRIPTIONS[name] = description
        return fn

    return deco


def _one_hot(logits: Tensor, target: Tensor) -> Tensor:
    return torch.zeros_like(logits).scatter_(1, target[:, None], 1.0)


@register_relevance("logit", "the target logit at the target class, 0 elsewhere (sum = target logit)")
def relevance_logit(logits: Tensor, target: Tensor) -> Tensor:
    return _one_hot(logits, target) * logits.detach()


@register_relevance("clrp", "contrastive LRP: +1 at the target, -1/(C-1) at every other class (sum = 0)")
def relevance_clrp(logits: Tensor, target: Tensor) -> Tensor:
    c = logits.shape[1]
    hot = _one_hot(logits, target)
    return hot - (1.0 - hot) / max(c - 1, 1)


@register_relevance("sglrp", "softmax-gradient LRP: y_t(1-y_t) at the target, -y_t y_i at the others (sum = 0)")
def relevance_sglrp(logits: Tensor, target: Tensor) -> Tensor:
    y = torch.softmax(logits.detach().float(), dim=1).to(logits.dtype)
    yt = y.gather(1, target[:, None])  # [B, 1]
    hot = _one_hot(logits, target)
    return hot * yt * (1 - yt) - (1 - hot) * yt * y


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise KeyError(name)
    return OBJECTIVES[name]
