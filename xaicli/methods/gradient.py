"""Gradient family: maps from d(target logit)/d(input)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import Explanation, Method, check_target, register, select_target


def input_gradient(model: nn.Module, x: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(d y_target / d x [B,C,H,W], logits, target) for a batch, one forward and one backward."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        tgt = select_target(logits, target)
        check_target(tgt, logits.shape[1])
        (grad,) = torch.autograd.grad(logits.gather(1, tgt[:, None]).sum(), x)
    return grad, logits.detach(), tgt


@register("saliency", "Vanilla gradient (Simonyan 2013): max over channels of |d logit / d pixel|")
@dataclass
class Saliency(Method):
    def run(self, model: nn.Module, x: Tensor, target: Tensor | None) -> Explanation:
        grad, logits, _ = input_gradient(model, x, target)
        return Explanation(grad.abs().amax(dim=1).float(), logits)
