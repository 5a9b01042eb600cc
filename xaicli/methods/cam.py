"""CAM family. Each class writes only its channel-weight formula; see base.CAMMethod.

Conventions (see docs/methods.md): the target score is the class LOGIT (Score-CAM: softmax
probability by default); the layer's map is ReLU(sum_k w_k A^k) (Layer-CAM: per-position
weights), upsampled bilinearly (align_corners=False) to the input size; maps are unnormalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MethodError
from .base import CAMMethod, Explanation, chunks, register, target_score, upsample

NO_CAM_HEAD = (
    "cam: needs a network ending in conv -> global average pooling -> a single Linear layer{why}; "
    "use gradcam instead (it equals CAM up to scale on such networks and works on any head)"
)


@register("cam", "CAM (Zhou 2016): FC weights of the class times the last conv maps; GAP + one Linear head only")
@dataclass
class CAM(CAMMethod):
    needs_grad = False

    def prepare(self, model: nn.Module, input_size: tuple[int, int]) -> None:
        """Resolve the layer, find the head Linear and check that head(GAP(layer)) == logits."""
        from .base import eval_mode
        from .hooks import capture, capture_io

        super().prepare(model, input_size)
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise MethodError(NO_CAM_HEAD.format(why=" (this model has no Linear layer)"))
        head = linears[-1]
        p = next(model.parameters(), None)
        dev = p.device if p is not None else torch.device("cpu")
        g = torch.Generator().manual_seed(0)
        x = torch.randn((2, 3, *input_size), generator=g).to(dev)
        with eval_mode(model), torch.no_grad(), capture(model, self.layer) as cap, capture_io(model, head) as io:
            logits = model(x)
        acts = cap.activation
        if acts is None or acts.dim() != 4:
            raise MethodError(NO_CAM_HEAD.format(why=f" (layer '{self.layer}' does not give a [B,C,h,w] map)"))
        gap = acts.float().mean(dim=(2, 3))
        ok = (
            io.input is not None
            and io.input.dim() == 2
            and io.input.shape == gap.shape
            and torch.allclose(io.input.float(), gap, rtol=1e-3, atol=1e-4)
            and io.output.shape == logits.shape
            and torch.allclose(io.output.float(), logits.float(), rtol=1e-3, atol=1e-4)
        )
        if not ok:
            why = f" (the head '{head}' does not read the global average of layer '{self.layer}' straight into the logits)"
            raise MethodError(NO_CAM_HEAD.format(why=why))
        self._head = head

    def run(self, model: nn.Module, x: Tensor, target: Tensor | None) -> Explanation:
        from ..models.layers import get_module

        if getattr(self, "_head", None) is None:
            self.prepare(model, tuple(x.shape[-2:]))
        acts, _, logits, tgt = self.forward_backward(model, x, target)
        w = get_module(model, self._head).weight.detach().float()[tgt]  # [B, K]; the bias is ignored
        cam = F.relu(torch.einsum("bk,bkhw->bhw", w, acts))
        return Explanation(upsample(cam, tuple(x.shape[-2:])), logits)


@register("gradcam", "Grad-CAM: channel weights = spatial mean of the target logit's gradient (Selvaraju 2017)")
@dataclass
class GradCAM(CAMMethod):
    counterfactual: bool = False  # use -gradient: regions that argue against the class

    def weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        g = -grads if self.counterfactual else grads
        return g.mean(dim=(2, 3))


@register(
    "guided_gradcam",
    "Guided Grad-CAM: Guided Backprop x upsampled Grad-CAM; max over channels of |.|",
)
@dataclass
class GuidedGradCAM(GradCAM):
    def run(self, model: nn.Module, x: Tensor, target: Tensor | None) -> Explanation:
        from .gradient import input_gradient

        acts, grads, logits, tgt = self.forward_backward(model, x, target)
        cam = upsample(F.relu(self.combine(acts, grads)), tuple(x.shape[-2:]))
        gbp, _, _ = input_gradient(model, x, tgt, guided=True)
        return Explanation((gbp.float() * cam[:, None]).abs().amax(dim=1), logits)


@register("gradcampp", "Grad-CAM++ (Chattopadhay 2018): positive gradients weighted by the closed-form alpha (eq. 19)")
@dataclass
class GradCAMPlusPlus(CAMMethod):
    def weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        # alpha = g^2 / (2 g^2 + (sum_ab A_ab) g^3) = 1 / (2 + (sum_ab A_ab) g) where g != 0:
        # the channel sum of A is taken first, then multiplied by g (the g^3 term); alpha = 0
        # where g == 0 or the denominator vanishes (no g^3 underflow either).
        sum_a = acts.sum(dim=(2, 3), keepdim=True)
        denom = 2.0 + sum_a * grads
        ok = (grads != 0) & (denom != 0)
        alpha = torch.where(ok, 1.0 / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(grads))
        return (alpha * F.relu(grads)).sum(dim=(2, 3))


@register("xgradcam", "XGrad-CAM (Fu 2020): gradients weighted by the normalised activations")
@dataclass
class XGradCAM(CAMMethod):
    def weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        sum_a = acts.sum(dim=(2, 3), keepdim=True)
        sum_a = torch.where(sum_a == 0, torch.ones_like(sum_a), sum_a)
        return (acts / sum_a * grads).sum(dim=(2, 3))


@register("layercam", "Layer-CAM (Jiang 2021): per-position weights ReLU(gradient) times activations")
@dataclass
class LayerCAM(CAMMethod):
    def combine(self, acts: Tensor, grads: Tensor) -> Tensor:
        return (F.relu(grads) * acts).sum(dim=1)


@register(
    "scorecam",
    "Score-CAM (Wang 2020): channel weight = class probability of the input masked by that channel (no gradient)",
)
@dataclass
class ScoreCAM(CAMMethod):
    """Variant: the official code's by default (softmax probability of X * H^k, no baseline, no
    channel softmax). `baseline: true` subtracts f_c of the zero (mean-colour) image and
    `channel_softmax: true` applies softmax over channels (the paper's Algorithm 1 uses both).
    Constant channels carry no information and get weight 0 (no 0/0 in the min-max scaling);
    their masked forwards are skipped."""

    needs_grad = False
    score: Literal["prob", "logit"] = "prob"
    baseline: bool = False
    channel_softmax: bool = False
    internal_batch: int = 64  # masked images per forward

    def __post_init__(self):
        if self.internal_batch < 1:
            raise MethodError("scorecam: internal_batch must be >= 1")

    def run(self, model: nn.Module, x: Tensor, target: Tensor | None) -> Explanation:
        acts, _, logits, tgt = self.forward_backward(model, x, target)
        b_sz, k_sz = acts.shape[:2]
        size = tuple(x.shape[-2:])
        flat = acts.flatten(2)
        informative = (flat.amax(2) - flat.amin(2)) > 0  # [B, K]
        pairs = informative.flatten().nonzero()[:, 0]  # indices b * K + k
        scores = torch.zeros(b_sz * k_sz, device=x.device, dtype=torch.float32)
        x = x.detach()
        with torch.no_grad():
            for idx in chunks(len(pairs), self.internal_batch, x.device):
                p = pairs[idx]
                b, k = p // k_sz, p % k_sz
                m = upsample(acts[b, k], size)  # [n, H, W]
                lo = m.flatten(1).amin(1).view(-1, 1, 1)
                hi = m.flatten(1).amax(1).view(-1, 1, 1)
                m = (m - lo) / (hi - lo).clamp_min(torch.finfo(m.dtype).tiny)
                out = model(x[b] * m[:, None].to(x.dtype))
                scores[p] = target_score(out, tgt[b], self.score).float()
            scores = scores.view(b_sz, k_sz)
            if self.baseline:
                base = target_score(model(torch.zeros_like(x)), tgt, self.score).float()
                scores = scores - base[:, None]
            if self.channel_softmax:
                scores = torch.softmax(scores.masked_fill(~informative, float("-inf")), dim=1)
                scores = torch.nan_to_num(scores, nan=0.0)  # an image with no informative channel
            else:
                scores = scores * informative
        cam = F.relu(torch.einsum("bk,bkhw->bhw", scores, acts))
        return Explanation(upsample(cam, size), logits)
