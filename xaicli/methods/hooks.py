"""THE ONLY module that registers hooks on a model.

Every hook is installed by a context manager and removed on any exit, exceptions included.
Hooks never modify the user's modules; activations are captured with a forward hook that
hands the rest of the network a copy, so in-place activations after the layer (ReLU(inplace),
timm's act layers) cannot overwrite what was captured or break the backward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..models.layers import get_module


class Capture:
    """What `capture` saw: the layer's output from the last forward pass."""

    def __init__(self) -> None:
        self.activation: torch.Tensor | None = None


@contextmanager
def capture(model: nn.Module, layer: str, start_graph: bool = False) -> Iterator[Capture]:
    """Record the output of `model.<layer>`; the hook is removed when the block exits.

    start_graph=True makes the captured activation a leaf that requires grad and turns autograd
    on from there: run the forward under `torch.no_grad()` and only the layers after the target
    layer are recorded, so d(score)/d(activation) costs a head-only backward and the trunk runs
    at inference speed and memory.
    """
    module = get_module(model, layer)
    cap = Capture()

    def hook(_mod, _inp, out):
        t = out[0] if isinstance(out, tuple | list) else out
        if start_graph:
            t = t.detach().requires_grad_(True)
            torch.set_grad_enabled(True)  # thread-local; the caller's no_grad() block restores it
        cap.activation = t
        # downstream in-place ops act on the copy; gradients still flow back through `t`
        clone = t.clone()
        return (clone, *out[1:]) if isinstance(out, tuple) else clone

    handle = module.register_forward_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()


def execution_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the modules holding parameters of their own, in the order a forward pass of `x`
    runs them (registration order can differ); the hooks are removed before returning."""
    order: list[str] = []
    handles = []
    for name, mod in model.named_modules():
        if any(True for _ in mod.parameters(recurse=False)):
            handles.append(
                mod.register_forward_pre_hook(lambda _m, _i, n=name: order.append(n) if n not in order else None)
            )
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return order


def count_hooks(model: nn.Module) -> int:
    """Number of hooks of any kind on the model's modules (0 for a clean model)."""
    n = 0
    for m in model.modules():
        for d in (
            m._forward_hooks,
            m._forward_pre_hooks,
            m._backward_hooks,
            getattr(m, "_backward_pre_hooks", {}),
        ):
            n += len(d)
    return n
