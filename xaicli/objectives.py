"""Objectives: the score a method explains, in one place.

An objective maps the logits [B, C] and the target classes [B] to one differentiable score per
image [B]. Gradient methods differentiate it with respect to the input, CAM methods with respect
to a layer, IG integrates it, Score-CAM reads it on masked inputs. Counterfactual Grad-CAM
differentiates the negated objective (with the default logit: `neg_logit`), not a hand-negated
gradient. Contrastive objectives (CLRP, SGLRP) register
here as well:

    @register_objective("my_score", "what it measures")
    def my_score(logits, target): ...

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


@register_objective("neg_logit", "minus the target logit: evidence against the class (counterfactual)")
def neg_logit(logits: Tensor, target: Tensor) -> Tensor:
    return -logit(logits, target)


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise KeyError(name)
    return OBJECTIVES[name]
