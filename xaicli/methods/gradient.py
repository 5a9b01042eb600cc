"""Gradient family: maps from d(target score)/d(input).

Conventions (see docs/methods.md):
- the target score is the class LOGIT (pre-softmax); IG offers `score: prob` as well;
- saliency and guided backprop reduce channels with max |.| (Simonyan 2013);
- input x gradient and IG reduce channels with a signed SUM (so that IG's map sums to its
  completeness total F(x) - F(x'));
- inner loops (IG path points, SmoothGrad samples) are chunked batches of `internal_batch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import MethodError
from .base import (
    Explanation,
    Method,
    build_method,
    check_target,
    chunks,
    gaussian_blur,
    register,
    select_target,
    target_score,
)


def input_gradient(
    model: nn.Module, x: Tensor, target: Tensor | None, guided: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """(d y_target / d x [B,C,H,W], logits, target) for a batch, one forward and one backward.

    `guided=True` gates every ReLU/ReLU6 backward with Guided Backprop's rule (hooks.guided_relu).
    """
    from contextlib import nullcontext

    from .hooks import guided_relu

    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), guided_relu(model) if guided else nullcontext(1) as n_gated:
        if not n_gated:
            raise MethodError(
                "guided_backprop: the model has no nn.ReLU/nn.ReLU6 modules to guide (functional relu or "
                "other activations); use saliency or inputxgrad"
            )
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


@register("inputxgrad", "Input x Gradient: sum over channels of x * d logit / dx (signed)")
@dataclass
class InputXGradient(Method):
    def run(self, model: nn.Module, x: Tensor, target: Tensor | None) -> Explanation:
        grad, logits, _ = input_gradient(model, x, target)
        return Explanation((x.detach() * grad).sum(dim=1).float(), logits)


@register(
    "guided_backprop",
    "Guided Backprop (Springenberg 2015): ReLU backward keeps positive signal only; max over channels of |.|",
)
@dataclass
class GuidedBackprop(Method):
    def run(self, model: nn.Module, x: Tensor, target: Tensor | None) -> Explanation:
        grad, logits, _ = input_gradient(model, x, target, guided=True)
        return Explanation(grad.abs().amax(dim=1).float(), logits)


# --------------------------------------------------------------------------------------------
# Integrated Gradients
# --------------------------------------------------------------------------------------------
BASELINES = ("black", "mean", "blur", "uniform")


def quadrature(n: int, rule: str, device=None) -> tuple[Tensor, Tensor]:
    """(alphas [n], weights [n]) on [0, 1]; the weights sum to 1 for every rule.

    gausslegendre: n Gauss-Legendre nodes; trapezoid: linspace(0, 1, n) with halved end weights
    1/(2(n-1)); riemann: midpoints (k + 1/2)/n with weights 1/n.
    """
    if rule == "gausslegendre":
        t, w = np.polynomial.legendre.leggauss(n)  # once per call, outside the hot path
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


def path_integral(
    model: nn.Module,
    x: Tensor,
    baseline: Tensor,
    tgt: Tensor,
    alphas: Tensor,
    weights: Tensor,
    internal_batch: int,
    score: str = "logit",
) -> Tensor:
    """IG attributions [B,C,H,W] = (x - x') * sum_k w_k dF(x' + a_k (x - x'))/dx.

    All B*K path points are flattened and sent through the model in chunks of `internal_batch`
    (any mix of images and steps per chunk); gradients are accumulated per image with index_add_.
    """
    b_sz, k_sz = x.shape[0], alphas.shape[0]
    diff = x - baseline
    total = torch.zeros_like(x, dtype=torch.float32)
    for idx in chunks(b_sz * k_sz, internal_batch, x.device):
        b, k = idx % b_sz, idx // b_sz
        pts = (baseline[b] + alphas[k].view(-1, 1, 1, 1).to(x.dtype) * diff[b]).requires_grad_(True)
        with torch.enable_grad():
            s = target_score(model(pts), tgt[b], score)
            (g,) = torch.autograd.grad(s.sum(), pts)
        total.index_add_(0, b, g.float() * weights[k].view(-1, 1, 1, 1))
    return diff.float() * total


@register(
    "integrated_gradients",
    "Integrated Gradients (Sundararajan 2017): path integral of gradients from a baseline; sum over channels",
)
@dataclass
class IntegratedGradients(Method):
    baseline: str = "black"  # black | mean | blur | uniform | path/to/image
    n_steps: int = 50
    method: Literal["gausslegendre", "trapezoid", "riemann"] = "gausslegendre"
    score: Literal["logit", "prob"] = "logit"
    internal_batch: int = 64  # path points per forward/backward
    blur_sigma: float = 10.0  # pixels, for baseline: blur
    seed: int = 0  # for baseline: uniform
    mean: tuple[float, float, float] | None = None  # the model's normalisation (filled by the runner)
    std: tuple[float, float, float] | None = None

    def __post_init__(self):
        if self.n_steps < 1 or self.internal_batch < 1:
            raise MethodError("integrated_gradients: n_steps and internal_batch must be >= 1")
        if self.baseline not in BASELINES and not Path(self.baseline).is_file():
            raise MethodError(
                f"integrated_gradients: baseline '{self.baseline}' is neither one of "
                f"{', '.join(BASELINES)} nor an existing image file"
            )

    def bind_preprocess(self, preprocess) -> None:
        self._preprocess = preprocess
        if self.mean is None:
            self.mean = tuple(preprocess.mean)
        if self.std is None:
            self.std = tuple(preprocess.std)

    def _norm(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.mean is None or self.std is None:
            raise MethodError(
                f"integrated_gradients: baseline '{self.baseline}' is defined in pixel space and needs the "
                "model's normalisation: pass mean=(...) and std=(...), or a model from load_model()"
            )
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return mean, std

    def make_baseline(self, x: Tensor) -> Tensor:
        """The baseline x' in the model's (normalised) input space, [B,C,H,W]."""
        if self.baseline == "mean":  # zero in normalised space = the dataset's mean colour
            return torch.zeros_like(x)
        if self.baseline == "blur":
            return gaussian_blur(x, self.blur_sigma)
        mean, std = self._norm(x)
        if self.baseline == "black":
            return ((0.0 - mean) / std).expand_as(x).contiguous()
        if self.baseline == "uniform":
            g = torch.Generator(device=x.device).manual_seed(self.seed)
            u = torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype)
            return (u - mean) / std
        from ..data import load_image

        img = load_image(Path(self.baseline))
        pre = getattr(self, "_preprocess", None)
        if pre is not None:
            t = pre(img)[None].to(device=x.device, dtype=x.dtype)
        else:
            from torchvision.transforms import functional as TF

            t = (TF.to_tensor(img)[None].to(device=x.device, dtype=x.dtype) - mean) / std
        if tuple(t.shape[-2:]) != tuple(x.shape[-2:]):
            t = torch.nn.functional.interpolate(t, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return t.expand_as(x).contiguous()

    def attribute(self, model: nn.Module, x: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(attributions [B,C,H,W], delta [B], logits of x): delta = sum IG - (F(x) - F(x'))."""
        x = x.detach()
        base = self.make_baseline(x)
        with torch.no_grad():
            ends = model(torch.cat([x, base]))  # F(x) and F(x') in one forward
        logits = ends[: x.shape[0]]
        tgt = select_target(logits, target)
        check_target(tgt, logits.shape[1])
        f_x = target_score(ends[: x.shape[0]], tgt, self.score).float()
        f_b = target_score(ends[x.shape[0] :], tgt, self.score).float()
        alphas, weights = quadrature(self.n_steps, self.method, x.device)
        attr = path_integral(model, x, base, tgt, alphas, weights, self.internal_batch, self.score)
        delta = attr.sum(dim=(1, 2, 3)) - (f_x - f_b)
        return attr, delta, logits.detach()

    def run(self, model: nn.Module, x: Tensor, target: Tensor | None) -> Explanation:
        attr, delta, logits = self.attribute(model, x, target)
        # signed completeness gap, like Captum's convergence delta: sum(IG) - (F(x) - F(x'))
        return Explanation(attr.sum(dim=1), logits, {"delta": delta})


# --------------------------------------------------------------------------------------------
# SmoothGrad (wrapper)
# --------------------------------------------------------------------------------------------
@register(
    "smoothgrad",
    "SmoothGrad (Smilkov 2017): mean of a gradient method's maps over noisy copies (optionally squared)",
)
@dataclass
class SmoothGrad(Method):
    base: Literal["saliency", "inputxgrad", "guided_backprop", "integrated_gradients"] = "saliency"
    n_samples: int = 25
    noise_level: float = 0.15  # sigma = noise_level * (x_max - x_min), per image
    squared: bool = False  # SmoothGrad-Squared: mean of map**2
    internal_batch: int = 32  # noisy images per call of the base method
    seed: int = 0
    base_params: dict[str, Any] = field(default_factory=dict)  # e.g. {n_steps: 16} for IG

    def __post_init__(self):
        if self.n_samples < 1 or self.internal_batch < 1:
            raise MethodError("smoothgrad: n_samples and internal_batch must be >= 1")
        if self.noise_level < 0:
            raise MethodError("smoothgrad: noise_level must be >= 0")
        self._base = build_method(self.base, **self.base_params)

    def bind_preprocess(self, preprocess) -> None:
        self._base.bind_preprocess(preprocess)

    def prepare(self, model: nn.Module, input_size: tuple[int, int]) -> None:
        self._base.prepare(model, input_size)

    def run(self, model: nn.Module, x: Tensor, target: Tensor | None) -> Explanation:
        x = x.detach()
        with torch.no_grad():
            logits = model(x)
        tgt = select_target(logits, target)  # the clean image's class, for every noisy copy
        check_target(tgt, logits.shape[1])
        b_sz = x.shape[0]
        flat = x.flatten(1)
        sigma = (self.noise_level * (flat.amax(1) - flat.amin(1))).view(-1, 1, 1, 1)
        g = torch.Generator(device=x.device).manual_seed(self.seed)
        acc = torch.zeros((b_sz, *x.shape[-2:]), dtype=torch.float32, device=x.device)
        for idx in chunks(b_sz * self.n_samples, self.internal_batch, x.device):
            b = idx % b_sz
            noise = torch.randn((len(idx), *x.shape[1:]), generator=g, device=x.device, dtype=x.dtype)
            m = self._base.run(model, x[b] + sigma[b] * noise, tgt[b]).maps.float()
            acc.index_add_(0, b, m * m if self.squared else m)
        return Explanation(acc / self.n_samples, logits)
