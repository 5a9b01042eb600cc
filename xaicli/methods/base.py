"""Method contract, registry and the shared machinery (target selection, eval mode, upsampling).

A method maps a preprocessed batch to one map per image on the same device:
    method(model, x [B,C,H,W], target LongTensor[B] | None) -> maps [B,H,W] float32
`run` returns the same maps plus the logits of its own forward pass (so the runner needs no
extra forward) and optional per-image extras (written as CSV columns).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MethodError
from ..registry import build_registered, public_fields, registrar

METHODS: dict[str, type[Method]] = {}


register = registrar(METHODS)  # @register(name, one-line description) on a Method dataclass


@dataclass
class Explanation:
    maps: Tensor  # [B, H, W] float32, unnormalized
    logits: Tensor | None = None  # [B, classes], detached, from the method's own forward
    extras: dict[str, Tensor] = field(default_factory=dict)  # per-image values [B]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run in eval mode (BatchNorm in train mode couples the images of a batch); restore after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def select_target(logits: Tensor, target: Tensor | int | None) -> Tensor:
    """LongTensor [B]: the predicted class when target is None, else the given class(es)."""
    if target is None:
        return logits.argmax(dim=1)
    if isinstance(target, int):
        return torch.full((logits.shape[0],), target, dtype=torch.long, device=logits.device)
    return target.to(device=logits.device, dtype=torch.long).reshape(-1)


def check_target(target: Tensor, num_classes: int) -> None:
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise MethodError(f"target class out of range: the model has {num_classes} classes (0..{num_classes - 1})")


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, h, w] -> [B, H, W], bilinear (align_corners=False), on the maps' device."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of [B, C, H, W] (reflect padding, radius 3 sigma), on x's device."""
    if sigma <= 0:
        return x
    h, w = x.shape[-2:]
    r = max(1, min(int(3 * sigma + 0.5), h - 1, w - 1))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    y = F.pad(x, (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def target_score(logits: Tensor, target: Tensor, kind: str = "logit") -> Tensor:
    """[B] score of the target class: the logit (default) or the softmax probability."""
    if kind == "prob":
        return torch.softmax(logits.float(), dim=1).gather(1, target[:, None])[:, 0]
    return logits.gather(1, target[:, None])[:, 0]


def chunks(n: int, size: int, device) -> Iterator[Tensor]:
    """Index tensors covering range(n) in consecutive chunks of at most `size`."""
    for start in range(0, n, size):
        yield torch.arange(start, min(n, start + size), device=device)


@dataclass
class Method:
    """Base class. Parameters are dataclass fields (validated from config/CLI/API)."""

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    needs_layer: ClassVar[bool] = False

    def prepare(self, model: nn.Module, input_size: tuple[int, int]) -> None:
        """Resolve anything that depends on the model (e.g. the target layer); called once."""

    def bind_preprocess(self, preprocess) -> None:
        """Learn the model's preprocessing (a `models.preprocess.Preprocess`: mean, std, resize).

        Called by the runner and by `explain` when the model came from `load_model`, before
        `prepare`; methods that need pixel space (IG's black/uniform/image baselines) fill
        their unset `mean`/`std` from it, wrappers (SmoothGrad) pass it on. The default ignores it.
        """

    def run(self, model: nn.Module, x: Tensor, target: Tensor | None) -> Explanation:
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor | int | None = None) -> Tensor:
        if isinstance(target, int):
            target = torch.full((x.shape[0],), target, dtype=torch.long, device=x.device)
        return self.run(model, x, target).maps

    @classmethod
    def params(cls) -> list[dataclasses.Field]:
        return public_fields(cls)


def build_method(name: str, **params) -> Method:
    """Validate `params` against the method's dataclass fields and build it."""
    return build_registered(METHODS, "method", name, params, MethodError)


def explain(model, x: Tensor, method: str | Method = "gradcam", target=None, **params) -> Tensor:
    """Python API: maps [B, H, W] for a preprocessed batch `x` (on the model's device).

    `model` is an nn.Module or the LoadedModel from `load_model`; `target` is None (predicted
    class), an int, or a LongTensor [B]; `params` are the method's parameters.
    """
    net = getattr(model, "model", model)
    m = method if isinstance(method, Method) else build_method(method, **params)
    if getattr(model, "preprocess", None) is not None:
        m.bind_preprocess(model.preprocess)
    with eval_mode(net):
        m.prepare(net, tuple(x.shape[-2:]))
        return m(net, x, target)


# --------------------------------------------------------------------------------------------
# CAM family: the base class owns forward, hook, target score, ReLU and upsampling.
# --------------------------------------------------------------------------------------------
@dataclass
class CAMMethod(Method):
    """Map = ReLU(sum_k w_k A^k), upsampled. Subclasses give `weights(acts, grads)` -> [B, K]."""

    needs_layer: ClassVar[bool] = True
    needs_grad: ClassVar[bool] = True
    layer: str | None = None

    def prepare(self, model: nn.Module, input_size: tuple[int, int]) -> None:
        from ..models.layers import find_target_layer, get_module

        if self.layer is None:
            self.layer = find_target_layer(model, input_size)
        else:
            get_module(model, self.layer)  # raises with the candidates if wrong

    def weights(self, acts: Tensor, grads: Tensor | None) -> Tensor:
        raise NotImplementedError

    def combine(self, acts: Tensor, grads: Tensor | None) -> Tensor:
        """[B, K, h, w] -> [B, h, w] before ReLU; override for per-position weights."""
        w = self.weights(acts, grads)
        return torch.einsum("bk,bkhw->bhw", w, acts)

    def forward_backward(
        self, model: nn.Module, x: Tensor, target: Tensor | None, need_grad: bool | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """One forward (and backward) pass: (acts [B,K,h,w], grads or None, logits, target).

        Token activations [B,N,D] come back as a grid [B,D,h,w]; acts/grads are detached float32.
        """
        from ..models.layers import tokens_to_grid
        from .hooks import capture

        need_grad = self.needs_grad if need_grad is None else need_grad
        if self.layer is None:
            self.prepare(model, tuple(x.shape[-2:]))
        with capture(model, self.layer, start_graph=need_grad) as cap:
            with torch.no_grad():  # the trunk up to the layer records no graph (see capture)
                logits = model(x.detach())
            if cap.activation is None:
                raise MethodError(f"layer '{self.layer}' was not called in the forward pass; name another layer")
            tgt = select_target(logits, target)
            check_target(tgt, logits.shape[1])
            acts = cap.activation
            grads = None
            if need_grad:
                with torch.enable_grad():
                    score = logits.gather(1, tgt[:, None]).sum()
                    (grads,) = torch.autograd.grad(score, acts)
        acts = acts.detach()
        if acts.dim() == 3:  # ViT tokens [B, N, D] -> [B, D, h, w]
            acts = tokens_to_grid(acts)
            grads = tokens_to_grid(grads) if grads is not None else None
        return acts.float(), (grads.float() if grads is not None else None), logits.detach(), tgt

    def run(self, model: nn.Module, x: Tensor, target: Tensor | None) -> Explanation:
        acts, grads, logits, _ = self.forward_backward(model, x, target)
        cam = F.relu(self.combine(acts, grads))
        return Explanation(upsample(cam, tuple(x.shape[-2:])), logits)
