"""THE ONLY module that registers hooks on a model (layer 0: imports torch only).

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


def _module(model: nn.Module, layer: str | nn.Module) -> nn.Module:
    """A module given by name (validated by the model adapter beforehand) or as is."""
    if isinstance(layer, nn.Module):
        return layer
    modules = dict(model.named_modules())
    if layer not in modules:
        raise KeyError(f"layer '{layer}' is not a module of this model")
    return modules[layer]


class Capture:
    """What `capture` saw: the layer's output from the last forward pass."""

    def __init__(self) -> None:
        self.activation: torch.Tensor | None = None


@contextmanager
def capture(model: nn.Module, layer: str | nn.Module, start_graph: bool = False) -> Iterator[Capture]:
    """Record the output of `model.<layer>`; the hook is removed when the block exits.

    start_graph=True makes the captured activation a leaf that requires grad and turns autograd
    on from there: run the forward under `torch.no_grad()` and only the layers after the target
    layer are recorded, so d(score)/d(activation) costs a head-only backward and the trunk runs
    at inference speed and memory.
    """
    module = _module(model, layer)
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


@contextmanager
def replace_output(model: nn.Module, layer: str | nn.Module, output: torch.Tensor) -> Iterator[None]:
    """While the block is open, `model.<layer>` returns `output` instead of what it computed (the
    rest of the network runs on it): CRAFT's perturbed concept activations. Removed on any exit."""
    module = _module(model, layer)

    def hook(_mod, _inp, out):
        return (output, *out[1:]) if isinstance(out, tuple) else output

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _forward_then_remove(model: nn.Module, x: torch.Tensor, handles: list) -> None:
    """One forward pass of `x` without autograd for the hooks in `handles`, removed afterwards."""
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()


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
    _forward_then_remove(model, x, handles)
    return order


def trace_outputs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(name, module, output) for every named submodule whose output is a tensor, in completion
    order, from one forward pass of `x` in eval mode without autograd; hooks removed after."""
    was_training = model.training
    model.eval()
    try:
        calls = trace_calls(model, x)
    finally:
        model.train(was_training)
    return [(name, mod, out) for name, mod, _inp, out in calls if isinstance(out, torch.Tensor)]


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


# --------------------------------------------------------------------------------------------
# Module inputs/outputs (CAM head check) and guided ReLU backward (Guided Backprop)
# --------------------------------------------------------------------------------------------
class IOCapture:
    """What `capture_io` saw: the first input and the output of a module (last forward)."""

    def __init__(self) -> None:
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None


@contextmanager
def capture_io(model: nn.Module, layer: str | nn.Module) -> Iterator[IOCapture]:
    """Record the first positional input and the output of `model.<layer>`; read-only."""
    module = _module(model, layer)
    cap = IOCapture()

    def hook(_mod, inp, out):
        cap.input = inp[0] if inp else None
        cap.output = out[0] if isinstance(out, tuple | list) else out

    handle = module.register_forward_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()


#: activation modules whose backward pass Guided Backprop gates (ReLU family only: the rule
#: 1[x>0]·1[R>0]·R is defined for piecewise-linear rectifiers; functional F.relu is not seen)
GUIDED_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)


class _PositiveGradGate(torch.autograd.Function):
    """Identity forward (a copy, so later in-place ops cannot touch the rectifier's output);
    backward keeps only positive incoming gradient. Placed right after a ReLU, the chain gives
    R_in = 1[x>0] · 1[R_out>0] · R_out (the ReLU's own backward supplies 1[x>0])."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


@contextmanager
def guided_relu(model: nn.Module) -> Iterator[int]:
    """Guided-backprop backward for every ReLU/ReLU6 module while the block is open.

    The modules themselves are not touched (their `inplace` flag and forward stay as they
    are): a forward hook appends a positive-gradient gate to each rectifier's output. Yields
    the number of gated modules; every hook is removed on any exit.
    """
    handles = []

    def hook(_mod, _inp, out):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            return _PositiveGradGate.apply(out)
        return None

    try:
        for m in model.modules():
            if isinstance(m, GUIDED_ACTIVATIONS):
                handles.append(m.register_forward_hook(hook))
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------
# LRP rules (Zennit composites)
# --------------------------------------------------------------------------------------------
@contextmanager
def lrp_rules(model: nn.Module, composite) -> Iterator[nn.Module]:
    """Register an LRP rule composite (a `zennit.core.Composite`: its rule hooks, and the
    canonizers it carries) on `model` while the block is open; every hook is removed and every
    canonizer reverted on any exit. xaicli's LRP canonizes a deep copy once and passes composites
    without canonizers, so only the rule hooks come and go here."""
    composite.register(model)
    try:
        yield model
    finally:
        composite.remove()


def _pick(out, index: int | str):
    if isinstance(index, str):
        return out[index] if isinstance(out, dict) else getattr(out, index)
    return out[index]


@contextmanager
def select_output(model: nn.Module, index: int | str | None) -> Iterator[nn.Module]:
    """Make `model(x)` return one element of what its forward returns (a tuple/list position, a
    dict key or an attribute name such as `logits`), for models whose forward returns more than the
    logits; None changes nothing. The hook is removed when the block exits."""
    if index is None:
        yield model
        return
    handle = model.register_forward_hook(lambda _m, _i, out: _pick(out, index))
    try:
        yield model
    finally:
        handle.remove()


def describe_output(out) -> str | None:
    """None when `out` is a logits tensor [B, C]; else what it is, for an error message."""
    if isinstance(out, torch.Tensor):
        return None if out.dim() == 2 else f"a tensor of shape {list(out.shape)}"
    if isinstance(out, tuple | list):
        parts = ", ".join(
            f"[{i}] {list(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__}" for i, o in enumerate(out[:6])
        )
        return f"a {type(out).__name__} of {len(out)} ({parts})"
    if isinstance(out, dict):
        return f"a dict with keys {list(out)[:8]}"
    return f"a {type(out).__name__}" + (" (it has .logits)" if hasattr(out, "logits") else "")


# --------------------------------------------------------------------------------------------
# Who consumed which tensor (BatchNorm folding finds its conv -> BatchNorm pairs by execution)
# --------------------------------------------------------------------------------------------
def trace_calls(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module, tuple, object]]:
    """(name, module, positional inputs, output) of every named submodule call of one forward
    pass of `x` without autograd, in completion order (a module called twice appears twice).
    Every tensor stays referenced by the list, so `is` between records means the same tensor
    object (the output of one call handed to another). Hooks are removed before returning."""
    records: list[tuple[str, nn.Module, tuple, object]] = []

    def make(name, mod):
        def hook(_m, inp, out):
            records.append((name, mod, tuple(inp), out))

        return hook

    handles = [mod.register_forward_hook(make(name, mod)) for name, mod in model.named_modules() if name]
    _forward_then_remove(model, x, handles)
    return records
