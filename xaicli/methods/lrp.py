"""Layer-wise Relevance Propagation (Bach 2015; Montavon 2019) with Zennit as the rule engine.

Binding makes a canonized deep copy of the model once (`ctx.adapter.canonized_copy()`: BatchNorm
merged into the conv/linear before it, skip connections as a Zennit `Sum` module; the user's
model is never modified) and refuses a model with a layer no rule covers, naming it. Each batch
registers the composite's rule hooks on the copy (`hooks.lrp_rules`), runs one forward and one
modified backward from the initial relevance (`objectives.RELEVANCE`: the target logit, or the
contrastive `clrp` / `sglrp` vectors that sum to zero), and removes the hooks.

Composites (the first conv/linear layer = the input layer):
  epsilon_gamma_box           zB at the input (bounds = the normalised pixel range), gamma on convs, epsilon on dense
  epsilon_plus_flat           flat at the input, z+ on convs, epsilon on dense
  epsilon_alpha2_beta1_flat   flat at the input, alpha-beta (alpha=2, beta=1) on convs, epsilon on dense
  epsilon_plus                z+ on convs, epsilon on dense (input included)
  epsilon                     epsilon everywhere (LRP-0 as epsilon -> 0)
  zplus                       z+ everywhere (alpha=1, beta=0): Relevance-CAM's rule
Everywhere: ReLU/ReLU6 pass relevance on, average pooling and Sum split it in proportion to
their inputs (Norm), max pooling gives it to the maximum. Maps are signed: the sum over channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import MethodError
from ..hooks import capture, lrp_rules
from ..objectives import RELEVANCE
from ..ops import upsample
from .base import BoundMethod, MethodSpec, Result, check_target, register, select_target

Composite = Literal[
    "epsilon_gamma_box", "epsilon_plus_flat", "epsilon_alpha2_beta1_flat", "epsilon_plus", "epsilon", "zplus"
]
FirstRule = Literal["box", "flat", "wsquare", "zplus", "epsilon"]
Initial = Literal["logit", "clrp", "sglrp"]  # the initial relevances of objectives.RELEVANCE


def box_bounds(x: Tensor, mean, std) -> tuple[Tensor, Tensor]:
    """zB's pixel bounds in the model's input space: the normalised images of 0 and 1 per channel
    ([1, C, 1, 1]) when the normalisation is known, else each image's own min and max ([B, 1, 1, 1])."""
    if mean is not None and std is not None and len(mean) == x.shape[1]:
        m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (0 - m) / s, (1 - m) / s
    flat = x.detach().flatten(1)
    return flat.amin(1).view(-1, 1, 1, 1), flat.amax(1).view(-1, 1, 1, 1)


def make_composite(spec, low: Tensor, high: Tensor):
    """The Zennit composite of `spec` (no canonizers: the bound copy is canonized already)."""
    from zennit.composites import LayerMapComposite, SpecialFirstLayerMapComposite
    from zennit.layer import Sum
    from zennit.rules import AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, WSquare, ZBox, ZPlus
    from zennit.types import AvgPool, BatchNorm, Convolution

    st = spec.stabilizer
    base = [
        ((torch.nn.ReLU, torch.nn.ReLU6), Pass()),
        (Sum, Norm(stabilizer=st)),
        (AvgPool, Norm(stabilizer=st)),
        (BatchNorm, Pass()),  # only merged (identity) BatchNorms remain: the bound method checks it
    ]
    eps = Epsilon(epsilon=spec.epsilon)
    conv = {
        "epsilon_gamma_box": Gamma(gamma=spec.gamma, stabilizer=st),
        "epsilon_plus_flat": ZPlus(stabilizer=st),
        "epsilon_alpha2_beta1_flat": AlphaBeta(alpha=spec.alpha, beta=spec.beta, stabilizer=st),
        "epsilon_plus": ZPlus(stabilizer=st),
        "epsilon": Epsilon(epsilon=spec.epsilon),
        "zplus": ZPlus(stabilizer=st),
    }[spec.composite]
    dense = ZPlus(stabilizer=st) if spec.composite == "zplus" else eps
    layer_map = [*base, (Convolution, conv), (torch.nn.Linear, dense)]
    first = spec.first_rule or {"epsilon_gamma_box": "box", "epsilon_plus_flat": "flat"}.get(
        spec.composite, "flat" if spec.composite == "epsilon_alpha2_beta1_flat" else None
    )
    if first is None:
        return LayerMapComposite(layer_map=layer_map)
    rule = {
        "box": lambda: ZBox(low=low, high=high, stabilizer=st),
        "flat": lambda: Flat(stabilizer=st),
        "wsquare": lambda: WSquare(stabilizer=st),
        "zplus": lambda: ZPlus(stabilizer=st),
        "epsilon": lambda: Epsilon(epsilon=spec.epsilon),
    }[first]()
    return SpecialFirstLayerMapComposite(layer_map=layer_map, first_map=[((Convolution, torch.nn.Linear), rule)])


class BoundLRP(BoundMethod):
    """Owns the canonized copy; one forward and one modified backward per batch."""

    def setup(self) -> None:
        adapter = self.ctx.adapter
        name = self.spec.name
        layer = getattr(self.spec, "layer", None) or (self.ctx.layer if self.spec.needs_layer else None)
        self.layer = adapter.resolve_layer(layer) if (layer or self.spec.needs_layer) else None
        self.net = adapter.canonized_copy()
        bad = adapter.lrp_unsupported(self.net)
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise MethodError(
                f"{name}: no LRP rule for layer '{bad[0][0]}' ({bad[0][1]}){more}; LRP supports conv/linear "
                "networks with ReLU/ReLU6, pooling and BatchNorm after a conv: torchvision VGG/ResNet, timm "
                "EfficientNet(-Lite), sequential CNNs"
            )

    def resolved(self) -> dict:
        return {"layer": self.layer} if self.layer else {}

    def propagate(self, x: Tensor, target: Tensor | None):
        """(relevance [B,C,H,W] at the input or the layer, layer activations or None, logits, target,
        initial relevance [B, classes])."""
        low, high = box_bounds(x, self.ctx.mean, self.ctx.std)
        composite = make_composite(self.spec, low, high)
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad(), lrp_rules(self.net, composite):
            if self.layer is None:
                logits = self.net(x)
                acts = None
            else:
                with capture(self.net, self.layer) as cap:
                    logits = self.net(x)
                acts = cap.activation
                if acts is None:
                    raise MethodError(f"layer '{self.layer}' was not called in the forward pass; name another layer")
            tgt = select_target(logits.detach(), target)
            check_target(tgt, logits.shape[1])
            init = RELEVANCE[self.spec.objective](logits.detach(), tgt)
            (rel,) = torch.autograd.grad(logits, x if acts is None else acts, grad_outputs=init)
        if acts is not None:
            rel = self.ctx.adapter.to_grid(rel.detach())
            acts = self.ctx.adapter.to_grid(acts.detach())
        return rel.detach().float(), acts, logits.detach(), tgt, init.float()

    def compute(self, x: Tensor, target: Tensor | None) -> Result:
        rel, _, logits, tgt, init = self.propagate(x, target)
        gap = rel.flatten(1).sum(1) - init.sum(1)
        maps = upsample(rel.sum(dim=1), tuple(x.shape[-2:]))
        return Result(maps, logits, tgt, {"conservation_gap": gap})


@register("lrp", "LRP (Bach 2015) with a named rule composite (Zennit) on a canonized copy; signed relevance")
@dataclass
class LRP(MethodSpec):
    """Relevance of each pixel (sum over channels, signed), or of a named layer's positions (`layer`:
    the layer's relevance summed over channels, upsampled). `conservation_gap` = sum of the map's
    relevance - sum of the initial relevance (0 with zero biases and epsilon -> 0)."""

    composite: Composite = "epsilon_gamma_box"
    objective: Initial = "logit"  # initial relevance (objectives.RELEVANCE)
    layer: str | None = None  # relevance at this layer instead of the input
    epsilon: float = 1e-6  # epsilon rule (dense layers; every layer in `epsilon`)
    gamma: float = 0.25  # gamma rule (convolutions in epsilon_gamma_box)
    alpha: float = 2.0  # alpha-beta rule (convolutions in epsilon_alpha2_beta1_flat); alpha - beta = 1
    beta: float = 1.0
    stabilizer: float = 1e-6  # added to denominators of the non-epsilon rules
    first_rule: FirstRule | None = None  # input layer override

    bound = BoundLRP
    extras = {"conservation_gap": "sum of the relevance map - sum of the initial relevance (LRP conservation)"}
    cost = "F + B (modified backward)"
    map_kind = "signed"  # relevance for (+) and against (-) the objective: a diverging overlay
    prepared_model = False  # its canonizers merge the BatchNorms into its own copy (rules per layer type)

    def __post_init__(self):
        if self.epsilon < 0 or self.stabilizer < 0:
            raise MethodError(f"{self.name}: epsilon and stabilizer must be >= 0")
        if self.gamma < 0:
            raise MethodError(f"{self.name}: gamma must be >= 0")
        if abs(self.alpha - self.beta - 1.0) > 1e-9 or self.beta < 0:
            raise MethodError(f"{self.name}: the alpha-beta rule needs alpha - beta = 1 and beta >= 0")


@register("clrp", "Contrastive LRP: initial relevance +1 at the target, -1/(C-1) at the others (sums to 0)")
@dataclass
class CLRP(LRP):
    objective: Initial = "clrp"


@register("sglrp", "Softmax-gradient LRP (Iwana 2019): y_t(1-y_t) at the target, -y_t y_i at the others")
@dataclass
class SGLRP(LRP):
    objective: Initial = "sglrp"


class BoundRelevanceCAM(BoundLRP):
    def compute(self, x: Tensor, target: Tensor | None) -> Result:
        rel, acts, logits, tgt, init = self.propagate(x, target)
        w = rel.sum(dim=(2, 3))  # [B, K]: the channel's relevance
        cam = torch.einsum("bk,bkhw->bhw", w, acts.float())
        if self.spec.relu:
            cam = F.relu(cam)
        gap = rel.flatten(1).sum(1) - init.sum(1)
        return Result(upsample(cam, tuple(x.shape[-2:])), logits, tgt, {"conservation_gap": gap})


@register(
    "relevance_cam",
    "Relevance-CAM (Lee 2021): channel weights = spatial sum of the layer's (contrastive, z+) relevance",
)
@dataclass
class RelevanceCAM(LRP):
    """Map = sum_k w_k A^k with w_k = sum_ij R^k_ij, the relevance of the layer's channel k propagated
    from the objective (default: CLRP with z+ everywhere, as the paper); ReLU optional, upsampled
    bilinearly like every CAM. Works at shallow layers (ResNet `layer2`), where Grad-CAM's
    gradients lose class discrimination."""

    composite: Composite = "zplus"
    objective: Initial = "clrp"
    relu: bool = True  # ReLU of the map (the reference code shows it without)

    bound = BoundRelevanceCAM
    needs_layer = True

    @property
    def map_kind(self) -> str:
        """positive (after the ReLU); signed with relu: false"""
        return "positive" if self.relu else "signed"

    extras = {"conservation_gap": "sum of the layer's relevance - sum of the initial relevance"}
    cost = "F + B to the layer (modified)"
