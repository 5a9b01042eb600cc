"""CAM family. Each spec writes only its channel-weight formula; `BoundCAM` owns the forward
pass, the hook on the resolved layer, the objective's gradient, the ReLU and the upsampling.

Conventions (see docs/methods.md): the objective is the class LOGIT (Score-CAM: softmax
probability by default); the layer's map is ReLU(sum_k w_k A^k) (Layer-CAM: per-position
weights), upsampled bilinearly (align_corners=False) to the input size; maps are unnormalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import MethodError
from ..hooks import capture, capture_io
from ..ops import upsample
from ..registry import Batch
from .base import (
    BoundMethod,
    MethodSpec,
    Result,
    check_objective_field,
    check_target,
    eval_mode,
    objective_of,
    register,
    select_target,
)


class BoundCAM(BoundMethod):
    """Resolves the layer once; one forward (and a head-only backward) per batch."""

    def setup(self) -> None:
        self.layer = self.ctx.adapter.resolve_layer(self.spec.layer or self.ctx.layer)
        self.objective = objective_of(self.spec.objective, negate=self.spec.negated)

    def resolved(self) -> dict:
        return {"layer": self.layer}

    def forward_backward(
        self, x: Tensor, target: Tensor | None, need_grad: bool = True
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """(acts [B,K,h,w], grads or None, logits, target), acts/grads detached float32.

        Autograd starts at the layer (hooks.capture(start_graph=True)): the trunk runs without a
        graph, so the gradient costs a head-only backward. Token activations come back as a grid.
        """
        with capture(self.model, self.layer, start_graph=need_grad) as cap:
            with torch.no_grad():
                logits = self.model(x.detach())
            if cap.activation is None:
                raise MethodError(f"layer '{self.layer}' was not called in the forward pass; name another layer")
            tgt = select_target(logits, target)
            check_target(tgt, logits.shape[1])
            acts, grads = cap.activation, None
            if need_grad:
                with torch.enable_grad():
                    (grads,) = torch.autograd.grad(self.objective(logits, tgt).sum(), acts)
        to_grid = self.ctx.adapter.to_grid
        acts = to_grid(acts.detach()).float()
        grads = to_grid(grads).float() if grads is not None else None
        return acts, grads, logits.detach(), tgt

    def compute(self, x: Tensor, target: Tensor | None) -> Result:
        acts, grads, logits, tgt = self.forward_backward(x, target, self.spec.needs_grad)
        cam = F.relu(self.spec.combine(acts, grads))
        return Result(upsample(cam, tuple(x.shape[-2:])), logits, tgt)


@dataclass
class CAMSpec(MethodSpec):
    """Map = ReLU(sum_k w_k A^k), upsampled. Subclasses give `weights(acts, grads)` -> [B, K]."""

    layer: str | None = None  # target layer (default: the model adapter's)
    objective: str = "logit"  # what is differentiated: logit | prob | neg_logit

    bound = BoundCAM
    needs_layer = True
    needs_grad: ClassVar[bool] = True
    cost = "F + head-only B"

    def __post_init__(self):
        check_objective_field(self.name, self.objective)

    @property
    def negated(self) -> bool:
        return False

    def weights(self, acts: Tensor, grads: Tensor | None) -> Tensor:
        raise NotImplementedError

    def combine(self, acts: Tensor, grads: Tensor | None) -> Tensor:
        """[B, K, h, w] -> [B, h, w] before ReLU; override for per-position weights."""
        return torch.einsum("bk,bkhw->bhw", self.weights(acts, grads), acts)


# --------------------------------------------------------------------------------------------
# CAM: needs a GAP + single Linear head, checked once at bind time
# --------------------------------------------------------------------------------------------
NO_CAM_HEAD = (
    "cam: needs a network ending in conv -> global average pooling -> a single Linear layer{why}; "
    "use gradcam instead (it equals CAM up to scale on such networks and works on any head)"
)


class BoundHeadCAM(BoundCAM):
    def setup(self) -> None:
        super().setup()
        head = self.ctx.adapter.head()
        if head is None:
            raise MethodError(NO_CAM_HEAD.format(why=" (this model has no Linear layer)"))
        x = torch.randn((2, 3, *self.ctx.input_size), generator=torch.Generator().manual_seed(0)).to(self.ctx.device)
        with eval_mode(self.model), torch.no_grad(), capture(self.model, self.layer) as cap:
            with capture_io(self.model, head) as io:
                logits = self.model(x)
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
        self.head = self.ctx.adapter.module(head)

    def resolved(self) -> dict:
        return {"layer": self.layer}

    def compute(self, x: Tensor, target: Tensor | None) -> Result:
        acts, _, logits, tgt = self.forward_backward(x, target, need_grad=False)
        w = self.head.weight.detach().float()[tgt]  # [B, K]; the bias is ignored
        cam = F.relu(torch.einsum("bk,bkhw->bhw", w, acts))
        return Result(upsample(cam, tuple(x.shape[-2:])), logits, tgt)


@register("cam", "CAM (Zhou 2016): FC weights of the class times the last conv maps; GAP + one Linear head only")
@dataclass
class CAM(CAMSpec):
    bound = BoundHeadCAM
    needs_grad = False
    cost = "F"

    def __post_init__(self):
        super().__post_init__()
        if self.objective != "logit":
            raise MethodError(
                "cam: the map is built from the head's weights of the target logit; objective must be logit"
            )


@register("gradcam", "Grad-CAM: channel weights = spatial mean of the target logit's gradient (Selvaraju 2017)")
@dataclass
class GradCAM(CAMSpec):
    counterfactual: bool = (
        False  # negate the objective: regions that argue against the class (guided_gradcam: the CAM factor)
    )

    @property
    def negated(self) -> bool:
        return self.counterfactual

    def weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        return grads.mean(dim=(2, 3))


class BoundGuidedGradCAM(BoundCAM):
    def setup(self) -> None:
        super().setup()
        from .gradient import BoundGuided, GuidedBackprop

        self.guided = BoundGuided(GuidedBackprop(objective=self.spec.objective), self.ctx)

    def compute(self, x: Tensor, target: Tensor | None) -> Result:
        acts, grads, logits, tgt = self.forward_backward(x, target)
        cam = upsample(F.relu(self.spec.combine(acts, grads)), tuple(x.shape[-2:]))
        gbp, _, _ = self.guided.input_gradient(x, tgt)
        return Result((gbp.float() * cam[:, None]).abs().amax(dim=1), logits, tgt)


@register(
    "guided_gradcam",
    "Guided Grad-CAM: Guided Backprop x upsampled Grad-CAM; max over channels of |.|",
)
@dataclass
class GuidedGradCAM(GradCAM):
    bound = BoundGuidedGradCAM
    map_kind = "magnitude"
    cost = "2 F + B + head-only B"


@register("gradcampp", "Grad-CAM++ (Chattopadhay 2018): positive gradients weighted by the closed-form alpha (eq. 19)")
@dataclass
class GradCAMPlusPlus(CAMSpec):
    # 0: equation 19 exactly. > 0 (pytorch-grad-cam uses 1e-6): alpha = g^2 / (2 g^2 + sum(A) g^3
    # + alpha_eps), which zeroes alpha where g^2 << alpha_eps, i.e. drops positions with tiny
    # gradients: maps look cleaner (pointing game higher on some data) but are no longer eq. 19
    alpha_eps: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.alpha_eps < 0:
            raise MethodError("gradcampp: alpha_eps must be >= 0 (0 = equation 19)")

    def weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        # alpha = g^2 / (2 g^2 + (sum_ab A_ab) g^3) = 1 / (2 + (sum_ab A_ab) g) where g != 0:
        # the channel sum of A is taken first, then multiplied by g (the g^3 term); alpha = 0
        # where g == 0 or the denominator vanishes (no g^3 underflow either).
        sum_a = acts.sum(dim=(2, 3), keepdim=True)
        if self.alpha_eps > 0:
            g2 = grads * grads
            denom = 2.0 * g2 + sum_a * g2 * grads + self.alpha_eps
        else:
            g2 = torch.ones_like(grads)
            denom = 2.0 + sum_a * grads
        ok = (grads != 0) & (denom != 0)
        alpha = torch.where(ok, g2 / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(grads))
        return (alpha * F.relu(grads)).sum(dim=(2, 3))


@register("xgradcam", "XGrad-CAM (Fu 2020): gradients weighted by the normalised activations")
@dataclass
class XGradCAM(CAMSpec):
    def weights(self, acts: Tensor, grads: Tensor) -> Tensor:
        sum_a = acts.sum(dim=(2, 3), keepdim=True)
        sum_a = torch.where(sum_a == 0, torch.ones_like(sum_a), sum_a)
        return (acts / sum_a * grads).sum(dim=(2, 3))


@register("layercam", "Layer-CAM (Jiang 2021): per-position weights ReLU(gradient) times activations")
@dataclass
class LayerCAM(CAMSpec):
    def combine(self, acts: Tensor, grads: Tensor) -> Tensor:
        return (F.relu(grads) * acts).sum(dim=1)


# --------------------------------------------------------------------------------------------
# Score-CAM: channel weights from masked forwards (no gradient), chunked
# --------------------------------------------------------------------------------------------
class BoundScoreCAM(BoundCAM):
    def compute(self, x: Tensor, target: Tensor | None) -> Result:
        s = self.spec
        acts, _, logits, tgt = self.forward_backward(x, target, need_grad=False)
        b_sz, k_sz = acts.shape[:2]
        size = tuple(x.shape[-2:])
        flat = acts.flatten(2)
        lo, hi = flat.amin(2), flat.amax(2)
        informative = (hi - lo) > 0  # [B, K]
        pairs = informative.flatten().nonzero()[:, 0]  # indices b * K + k
        # The mask is min-max(upsample(A^k)); upsampling is linear and keeps constants, so it is
        # min-max(upsample(min-max(A^k))): channels whose layer-resolution maps are equal after
        # min-max scaling (ReLU6-saturated or one-hot channels, often) mask the image identically,
        # and each distinct (image, mask) gets one forward.
        rows = flat.reshape(b_sz * k_sz, -1)[pairs]
        rows = (rows - lo.flatten()[pairs, None]) / (hi - lo).flatten()[pairs, None]
        key = torch.cat([(pairs // k_sz)[:, None].to(rows.dtype), rows], 1)
        uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
        grid = acts.shape[-2:]
        unique_scores = torch.zeros(len(uniq), device=x.device, dtype=torch.float32)
        x = x.detach()

        def step(idx: Tensor) -> None:
            b = uniq[idx, 0].long()
            m = upsample(uniq[idx, 1:].reshape(-1, *grid), size)  # [n, H, W]
            lo = m.flatten(1).amin(1).view(-1, 1, 1)
            hi = m.flatten(1).amax(1).view(-1, 1, 1)
            m = (m - lo) / (hi - lo).clamp_min(torch.finfo(m.dtype).tiny)
            unique_scores[idx] = self.objective(self.model(x[b] * m[:, None].to(x.dtype)), tgt[b]).float()

        with torch.no_grad():
            self.ctx.chunker.map(self.loop("scorecam"), len(uniq), s.internal_batch, step, x.device)
            scores = torch.zeros(b_sz * k_sz, device=x.device, dtype=torch.float32)
            scores[pairs] = unique_scores[inverse]
            scores = scores.view(b_sz, k_sz)
            if s.baseline:
                base = self.objective(self.model(torch.zeros_like(x)), tgt).float()
                scores = scores - base[:, None]
            if s.channel_softmax:
                scores = torch.softmax(scores.masked_fill(~informative, float("-inf")), dim=1)
                scores = torch.nan_to_num(scores, nan=0.0)  # an image with no informative channel
            else:
                scores = scores * informative
        cam = F.relu(torch.einsum("bk,bkhw->bhw", scores, acts))
        return Result(upsample(cam, size), logits, tgt)


@register(
    "scorecam",
    "Score-CAM (Wang 2020): channel weight = class probability of the input masked by that channel (no gradient)",
)
@dataclass
class ScoreCAM(CAMSpec):
    """Variant: the official code's by default (softmax probability of X * H^k, no baseline, no
    channel softmax). `baseline: true` subtracts f_c of the zero (mean-colour) image and
    `channel_softmax: true` applies softmax over channels (the paper's Algorithm 1 uses both).
    Constant channels carry no information and get weight 0 (no 0/0 in the min-max scaling);
    their masked forwards are skipped."""

    objective: str = "prob"
    score: Literal["prob", "logit"] | None = None  # older name of `objective`; wins when set
    baseline: bool = False
    channel_softmax: bool = False
    internal_batch: Batch = 64  # masked images per forward

    bound = BoundScoreCAM
    needs_grad = False
    cost = "F + K x F (K channels of the layer)"

    def __post_init__(self):
        if self.score is not None:
            self.objective = self.score
        super().__post_init__()
        if self.internal_batch < 1:
            raise MethodError("scorecam: internal_batch must be >= 1")
