"""Gradient family: maps from d(objective)/d(input).

Conventions (see docs/methods.md):
- the objective is the target LOGIT by default (`objective: prob | neg_logit` also work);
- saliency and guided backprop reduce channels with max |.| (Simonyan 2013);
- input x gradient and IG reduce channels with a signed SUM (so that IG's map sums to its
  completeness total F(x) - F(x'));
- inner loops (IG path points, SmoothGrad samples) run through the context's chunker in pieces
  of `internal_batch`, halved on out-of-memory.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import MethodError
from ..hooks import guided_relu
from ..ops import REFERENCES, cpu_generator, reference
from ..registry import Batch, Count
from .base import (
    METHODS,
    BoundMethod,
    MethodSpec,
    Result,
    build_method,
    check_objective_field,
    check_target,
    register,
    select_target,
)


class BoundGradient(BoundMethod):
    """One forward and one backward: d objective / d x, reduced over channels by the spec."""

    guided = False

    def input_gradient(self, x: Tensor, target: Tensor | None, objective=None) -> tuple[Tensor, Tensor, Tensor]:
        """(d objective / d x [B,C,H,W], logits, target). `guided` gates every ReLU/ReLU6 backward."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad(), guided_relu(self.model) if self.guided else nullcontext(1) as n_gated:
            if not n_gated:
                raise MethodError(
                    f"{self.spec.name}: the model has no nn.ReLU/nn.ReLU6 modules to guide (functional relu or "
                    "other activations); use saliency or inputxgrad"
                )
            logits = self.model(x)
            tgt = select_target(logits, target)
            check_target(tgt, logits.shape[1])
            (grad,) = torch.autograd.grad((objective or self.objective)(logits, tgt).sum(), x)
        return grad, logits.detach(), tgt

    def compute(self, x: Tensor, target: Tensor | None) -> Result:
        grad, logits, tgt = self.input_gradient(x, target)
        return Result(self.spec.reduce(x.detach(), grad).float(), logits, tgt)


class BoundGuided(BoundGradient):
    guided = True


@dataclass
class GradientSpec(MethodSpec):
    objective: str = "logit"  # what is differentiated: logit | prob | neg_logit (see xaicli/objectives.py)

    bound = BoundGradient
    cost = "F + B"

    def __post_init__(self):
        check_objective_field(self.name, self.objective)

    def reduce(self, x: Tensor, grad: Tensor) -> Tensor:
        """[B,C,H,W] gradient -> [B,H,W] map."""
        return grad.abs().amax(dim=1)


@register("saliency", "Vanilla gradient (Simonyan 2013): max over channels of |d logit / d pixel|")
@dataclass
class Saliency(GradientSpec):
    map_kind = "magnitude"


@register("inputxgrad", "Input x Gradient: sum over channels of x * d logit / dx (signed)")
@dataclass
class InputXGradient(GradientSpec):
    map_kind = "signed"

    def reduce(self, x: Tensor, grad: Tensor) -> Tensor:
        return (x * grad).sum(dim=1)


@register(
    "guided_backprop",
    "Guided Backprop (Springenberg 2015): ReLU backward keeps positive signal only; max over channels of |.|",
)
@dataclass
class GuidedBackprop(GradientSpec):
    bound = BoundGuided
    map_kind = "magnitude"


# --------------------------------------------------------------------------------------------
# Integrated Gradients
# --------------------------------------------------------------------------------------------
def quadrature(n: int, rule: str, device=None) -> tuple[Tensor, Tensor]:
    """(alphas [n], weights [n]) on [0, 1]; the weights sum to 1 for every rule.

    gausslegendre: n Gauss-Legendre nodes; trapezoid: linspace(0, 1, n) with halved end weights
    1/(2(n-1)); riemann: midpoints (k + 1/2)/n with weights 1/n.
    """
    if rule == "gausslegendre":
        t, w = np.polynomial.legendre.leggauss(n)
        a, w = (t + 1.0) / 2.0, w / 2.0
    elif rule == "trapezoid":
        if n < 2:
            raise MethodError("integrated_gradients: the trapezoid rule needs n_steps >= 2")
        a = np.linspace(0.0, 1.0, n)
        w = np.full(n, 1.0 / (n - 1))
        w[0] = w[-1] = 0.5 / (n - 1)
    elif rule == "riemann":
        a = (np.arange(n) + 0.5) / n
        w = np.full(n, 1.0 / n)
    else:  # pragma: no cover - validated by the dataclass Literal
        raise MethodError(f"integrated_gradients: unknown rule '{rule}'")
    return torch.tensor(a, dtype=torch.float32, device=device), torch.tensor(w, dtype=torch.float32, device=device)


class BoundIG(BoundGradient):
    def setup(self) -> None:
        super().setup()
        s = self.spec
        self.mean = s.mean or self.ctx.mean
        self.std = s.std or self.ctx.std
        self._image = None
        if s.baseline not in REFERENCES:
            from ..images import load_image

            self._image = load_image(Path(s.baseline))
        if s.baseline in ("black", "uniform") and (self.mean is None or self.std is None):
            raise MethodError(
                f"integrated_gradients: baseline '{s.baseline}' is defined in pixel space and needs the "
                "model's normalisation: pass mean=(...) and std=(...), or a model from load_model()"
            )

    def baseline(self, x: Tensor) -> Tensor:
        """The baseline x' in the model's (normalised) input space, [B,C,H,W]; the same for every image."""
        s = self.spec
        if self._image is None:
            return reference(x, s.baseline, self.mean, self.std, seed=s.seed, blur_sigma=s.blur_sigma)
        pre = self.ctx.preprocess
        if pre is not None:
            t = pre(self._image)[None]
        else:
            from torchvision.transforms import functional as TF

            if self.mean is None or self.std is None:
                raise MethodError("integrated_gradients: an image baseline needs the model's mean/std")
            t = TF.normalize(TF.to_tensor(self._image), self.mean, self.std)[None]
        t = t.to(device=x.device, dtype=x.dtype)
        if tuple(t.shape[-2:]) != tuple(x.shape[-2:]):
            t = torch.nn.functional.interpolate(t, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return t.expand_as(x).contiguous()

    def path_integral(self, x: Tensor, base: Tensor, tgt: Tensor) -> Tensor:
        """IG attributions [B,C,H,W] = (x - x') * sum_k w_k dF(x' + a_k (x - x'))/dx.

        All B*K path points are flattened and sent through the model in chunks of `internal_batch`
        (any mix of images and steps per chunk); gradients are accumulated per image with index_add_.
        """
        alphas, weights = quadrature(self.spec.n_steps, self.spec.method, x.device)
        b_sz, k_sz = x.shape[0], alphas.shape[0]
        diff = x - base
        total = torch.zeros_like(x, dtype=torch.float32)

        def step(idx: Tensor) -> None:
            b, k = idx % b_sz, idx // b_sz
            pts = (base[b] + alphas[k].view(-1, 1, 1, 1).to(x.dtype) * diff[b]).requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(self.objective(self.model(pts), tgt[b]).sum(), pts)
            total.index_add_(0, b, g.float() * weights[k].view(-1, 1, 1, 1))

        self.ctx.chunker.map(self.loop("integrated_gradients"), b_sz * k_sz, self.spec.internal_batch, step, x.device)
        return diff.float() * total

    def attribute(self, x: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(attributions [B,C,H,W], delta [B], logits of x, target): delta = sum IG - (F(x) - F(x'))."""
        x = x.detach()
        base = self.baseline(x)
        with torch.no_grad():
            ends = self.model(torch.cat([x, base]))  # F(x) and F(x') in one forward
        logits = ends[: x.shape[0]]
        tgt = select_target(logits, target)
        check_target(tgt, logits.shape[1])
        f_x = self.objective(ends[: x.shape[0]], tgt).float()
        f_b = self.objective(ends[x.shape[0] :], tgt).float()
        attr = self.path_integral(x, base, tgt)
        delta = attr.sum(dim=(1, 2, 3)) - (f_x - f_b)
        return attr, delta, logits.detach(), tgt

    def compute(self, x: Tensor, target: Tensor | None) -> Result:
        attr, delta, logits, tgt = self.attribute(x, target)
        return Result(attr.sum(dim=1), logits, tgt, {"delta": delta})


@register(
    "integrated_gradients",
    "Integrated Gradients (Sundararajan 2017): path integral of gradients from a baseline; sum over channels",
)
@dataclass
class IntegratedGradients(GradientSpec):
    baseline: str = "black"  # black | mean | blur | uniform | path/to/image
    n_steps: Count = 50
    method: Literal["gausslegendre", "trapezoid", "riemann"] = "gausslegendre"
    score: Literal["logit", "prob"] | None = None  # older name of `objective`; wins when set
    internal_batch: Batch = 64  # path points per forward/backward
    blur_sigma: float = 10.0  # pixels, for baseline: blur
    seed: int = 0  # for baseline: uniform
    mean: tuple[float, float, float] | None = None  # the model's normalisation (default: the model's)
    std: tuple[float, float, float] | None = None

    bound = BoundIG
    map_kind = "signed"
    extras = {"delta": "completeness gap: sum of the attributions - (F(x) - F(baseline)), signed"}
    path_params = ("baseline",)
    cost = "2 F + n_steps x (F + B)"

    def __post_init__(self):
        if self.score is not None:
            self.objective = self.score
        super().__post_init__()
        if self.n_steps < 1 or self.internal_batch < 1:
            raise MethodError("integrated_gradients: n_steps and internal_batch must be >= 1")
        if self.baseline not in REFERENCES and not Path(self.baseline).is_file():
            raise MethodError(
                f"integrated_gradients: baseline '{self.baseline}' is neither one of "
                f"{', '.join(REFERENCES)} nor an existing image file"
            )
        if self.baseline not in REFERENCES:
            from PIL import Image

            try:
                with Image.open(self.baseline) as im:
                    im.verify()
            except Exception:
                raise MethodError(
                    f"integrated_gradients: baseline '{self.baseline}' exists but is not an image PIL can read"
                ) from None


# --------------------------------------------------------------------------------------------
# SmoothGrad (wrapper)
# --------------------------------------------------------------------------------------------
class BoundSmoothGrad(BoundMethod):
    def setup(self) -> None:
        self.base = build_method(self.spec.base, **self.spec.base_params).bind(self.ctx)

    def resolved(self) -> dict:
        return self.base.resolved()

    def compute(self, x: Tensor, target: Tensor | None) -> Result:
        s = self.spec
        x = x.detach()
        with torch.no_grad():
            logits = self.model(x)
        tgt = select_target(logits, target)  # the clean image's class, for every noisy copy
        check_target(tgt, logits.shape[1])
        b_sz = x.shape[0]
        flat = x.flatten(1)
        sigma = (s.noise_level * (flat.amax(1) - flat.amin(1))).view(-1, 1, 1, 1)
        # sample k's noise is the same for every image (so an image's map does not depend on its
        # batch) and comes from a CPU generator (the same on every device)
        noise = torch.randn((s.n_samples, *x.shape[1:]), generator=cpu_generator(s.seed)).to(x.device, x.dtype)
        acc = torch.zeros((b_sz, *x.shape[-2:]), dtype=torch.float32, device=x.device)

        def step(idx: Tensor) -> None:
            b, k = idx % b_sz, idx // b_sz
            m = self.base(x[b] + sigma[b] * noise[k], tgt[b]).maps.float()
            acc.index_add_(0, b, m * m if s.squared else m)

        self.ctx.chunker.map(self.loop("smoothgrad"), b_sz * s.n_samples, s.internal_batch, step, x.device)
        return Result(acc / s.n_samples, logits, tgt)


@register(
    "smoothgrad",
    "SmoothGrad (Smilkov 2017): mean of a gradient method's maps over noisy copies (optionally squared)",
)
@dataclass
class SmoothGrad(MethodSpec):
    base: Literal["saliency", "inputxgrad", "guided_backprop", "integrated_gradients"] = "saliency"
    n_samples: Count = 25
    noise_level: float = 0.15  # sigma = noise_level * (x_max - x_min), per image
    squared: bool = False  # SmoothGrad-Squared: mean of map**2
    internal_batch: Batch = 32  # noisy images per call of the base method
    seed: int = 0
    base_params: dict[str, Any] = field(default_factory=dict)  # e.g. {n_steps: 16} for IG

    bound = BoundSmoothGrad

    @property
    def map_kind(self) -> str:
        """the base method's; magnitude when squared"""
        kind = METHODS[self.base].map_kind
        return "magnitude" if self.squared and kind == "signed" else kind

    cost = "F + n_samples x (the base method)"

    def __post_init__(self):
        if self.n_samples < 1 or self.internal_batch < 1:
            raise MethodError("smoothgrad: n_samples and internal_batch must be >= 1")
        if self.noise_level < 0:
            raise MethodError("smoothgrad: noise_level must be >= 0")
        build_method(self.base, **self.base_params)  # validate the base's parameters now

    @classmethod
    def file_params(cls, params: dict) -> dict[str, str]:
        base = METHODS.get(params.get("base", "saliency"))
        inner = base.file_params(params.get("base_params") or {}) if base else {}
        return {f"base_params.{k}": v for k, v in inner.items()}
