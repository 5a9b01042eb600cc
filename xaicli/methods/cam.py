"""CAM family. Each class writes only its channel-weight formula; see base.CAMMethod."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import CAMMethod, register


@register("gradcam", "Grad-CAM: channel weights = spatial mean of the target logit's gradient (Selvaraju 2017)")
@dataclass
class GradCAM(CAMMethod):
    counterfactual: bool = False  # use -gradient: regions that argue against the class

    def weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        g = -grads if self.counterfactual else grads
        return g.mean(dim=(2, 3))
