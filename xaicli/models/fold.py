"""Fold eval-mode BatchNorm into the convolution that feeds it: a prepared copy, verified.

    rep = fold_batchnorm(model, input_size, keep={"conv_head"})
    rep.model     the prepared copy (the model itself when nothing was folded or the check failed)
    rep.applied   True when rep.model is the folded copy
    rep.folded    [(conv name, BatchNorm name)] folded
    rep.note      one line saying why the model is used unprepared, else None

In eval mode a BatchNorm is a fixed per-channel affine map, y = (x - mean) * s + beta with
s = gamma / sqrt(var + eps). When x is a convolution's output, that map folds into the
convolution: W' = W * s (per output channel), b' = (b - mean) * s + beta, and the BatchNorm
becomes the identity (timm's BatchNormAct2d keeps its drop and activation). The logits stay the
same up to float rounding, and forward and backward get cheaper (the BatchNorm's own passes are
gone; on CPU its backward is costly).

Pairs are found from one traced forward (`hooks.trace_calls`), not from the registration order:
the BatchNorm's input must be the very tensor object the conv returned, each module is called
once per forward, no other module consumes the conv's output, and the conv's output is not the
output of a layer named in `keep` (a layer a method hooks: its activations would change by a
per-channel affine). A use the trace cannot see (a functional `x + conv(x)`, an in-place change
between the two) is caught by the check: the copy's logits on a probe batch must equal the
model's within a relative 1e-4, else the model is used unprepared and `note` says why.

Only plain `nn.BatchNorm2d` and timm's `BatchNormAct2d` are folded (other subclasses may do more
in their forward); the copy's parameters do not require gradients (methods differentiate with
respect to inputs and activations only). The model itself is never modified.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..hooks import trace_calls

RTOL = 1e-4  # the check: max |logit difference| <= RTOL * max(1, max |logit|)


class FoldedNorm(nn.Module):
    """What is left of a BatchNorm folded into its conv: the identity, or timm's BatchNormAct2d's
    drop and activation (kept as `drop` / `act`, so layer names below it still resolve)."""

    def __init__(self, drop: nn.Module | None = None, act: nn.Module | None = None):
        super().__init__()
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(x))


@dataclass
class FoldReport:
    model: nn.Module
    applied: bool = False
    folded: list[tuple[str, str]] = field(default_factory=list)  # (conv, BatchNorm)
    kept: list[str] = field(default_factory=list)  # convs left unfolded because a method hooks them
    max_diff: float | None = None  # max |logit difference| on the probe batch
    note: str | None = None  # why the model is used unprepared
    failed: bool = False  # it had BatchNorms to fold, but the copy failed or did not pass the check

    def summary(self) -> dict:
        """For run.yaml's `resolved.fold_bn`."""
        out: dict = {"applied": self.applied, "folded": len(self.folded)}
        if self.kept:
            out["kept"] = list(self.kept)
        if self.max_diff is not None:
            out["max_logit_diff"] = float(f"{self.max_diff:.3g}")
        if self.note:
            out["note"] = self.note
        return out


def _foldable_norm(m: nn.Module) -> bool:
    """An eval-mode BatchNorm2d with running statistics whose forward is known: plain, or timm's
    BatchNormAct2d (normalise, drop, act)."""
    if "forward" in vars(m) or getattr(m, "running_mean", None) is None or getattr(m, "running_var", None) is None:
        return False
    if type(m) is nn.BatchNorm2d:
        return True
    cls = type(m)
    return (
        cls.__name__ == "BatchNormAct2d"
        and cls.__module__.startswith("timm.")
        and isinstance(m, nn.BatchNorm2d)
        and hasattr(m, "drop")
        and hasattr(m, "act")
    )


def _pairs(net: nn.Module, probe: Tensor, keep: set[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """([(conv, BatchNorm)] that may be folded, [convs left alone because of `keep`])."""
    calls = trace_calls(net, probe)
    # containers pass their input on to a child; a foldable BatchNorm's children (drop, act) see its output
    children = {
        name for name, m in net.named_modules() if name and any(True for _ in m.children()) and not _foldable_norm(m)
    }
    n_calls: dict[str, int] = {}
    consumers: dict[int, int] = {}  # id(tensor) -> leaf module calls that took it as an input
    for name, _m, inp, _out in calls:
        n_calls[name] = n_calls.get(name, 0) + 1
        if name not in children:
            for t in inp:
                if isinstance(t, Tensor):
                    consumers[id(t)] = consumers.get(id(t), 0) + 1
    kept_out = {id(out) for name, _m, _i, out in calls if name in keep and isinstance(out, Tensor)}
    conv_of = {
        id(out): name
        for name, m, _i, out in calls
        if isinstance(m, nn.Conv2d) and isinstance(out, Tensor) and "forward" not in vars(m)
    }
    pairs, kept = [], []
    for name, m, inp, _out in calls:
        if not (_foldable_norm(m) and inp and isinstance(inp[0], Tensor)):
            continue
        conv = conv_of.get(id(inp[0]))
        if conv is None or n_calls[conv] != 1 or n_calls[name] != 1 or consumers.get(id(inp[0]), 0) != 1:
            continue
        if conv in keep or id(inp[0]) in kept_out:
            kept.append(conv)
            continue
        if net.get_submodule(conv).out_channels != m.num_features:
            continue
        pairs.append((conv, name))
    return pairs, kept


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    w = conv.weight
    s = (bn.weight.double() if bn.weight is not None else 1.0) / torch.sqrt(bn.running_var.double() + bn.eps)
    beta = bn.bias.double() if bn.bias is not None else 0.0
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(bn.running_mean, dtype=torch.float64)
    new_w = (w.double() * s.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
    conv.weight = nn.Parameter(new_w.contiguous(memory_format=_format_of(w)), requires_grad=False)
    conv.bias = nn.Parameter(((b - bn.running_mean.double()) * s + beta).to(w.dtype), requires_grad=False)


def _format_of(w: Tensor) -> torch.memory_format:
    """The weight's memory format (a 1x1 kernel is both: then the standard one)."""
    if w.is_contiguous() or w.dim() != 4:
        return torch.contiguous_format
    return torch.channels_last if w.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _logits(out) -> Tensor | None:
    return out if isinstance(out, Tensor) else None


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def probe_batch(model: nn.Module, input_size: tuple[int, int]) -> Tensor:
    """Two fixed images: N(0, 1) noise (a normalised input's scale) and a smooth gradient."""
    dev, dtype = _device_dtype(model)
    g = torch.Generator().manual_seed(0)
    h, w = input_size
    noise = torch.randn(1, 3, h, w, generator=g)
    ramp = torch.linspace(-2, 2, w).expand(1, 3, h, w) * torch.tensor([1.0, -0.5, 0.25]).view(1, 3, 1, 1)
    return torch.cat([noise, ramp]).to(device=dev, dtype=dtype)


def _strict_math():
    """TF32 off while checking (it would differ between any two equivalent graphs on Ampere+)."""
    if torch.cuda.is_available():
        return torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False)
    import contextlib

    return contextlib.nullcontext()


def fold_batchnorm(model: nn.Module, input_size: tuple[int, int], keep: set[str] | None = None) -> FoldReport:
    """The prepared copy of `model` (see the module docstring); `model` is not modified. Never
    raises for an odd model: anything unexpected means the model as loaded, with a note."""
    keep = set(keep or ())
    if not any(_foldable_norm(m) for m in model.modules()):
        return FoldReport(model, note="no BatchNorm2d to fold")
    was = model.training
    try:
        return _fold(model, input_size, keep)
    except Exception as e:  # a model deepcopy or hooks cannot handle (TorchScript, ...)
        return FoldReport(
            model, failed=True, note=f"the model could not be prepared ({type(e).__name__}: {str(e)[:120]})"
        )
    finally:
        model.train(was)


def _fold(model: nn.Module, input_size: tuple[int, int], keep: set[str]) -> FoldReport:
    model.eval()
    probe = probe_batch(model, input_size)
    net = copy.deepcopy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    try:
        pairs, kept = _pairs(net, probe[:1], keep)
    except Exception as e:  # a model the probe cannot run: the methods' own forward will say
        return FoldReport(model, failed=True, note=f"the probe forward failed ({type(e).__name__})")
    if not pairs:
        return FoldReport(model, kept=kept, note="no conv -> BatchNorm pair to fold")
    for conv_name, bn_name in pairs:
        bn = net.get_submodule(bn_name)
        _fold_into(net.get_submodule(conv_name), bn)
        parent, _, child = bn_name.rpartition(".")
        folded = FoldedNorm(getattr(bn, "drop", None), getattr(bn, "act", None))
        setattr(net.get_submodule(parent) if parent else net, child, folded)
    with torch.no_grad(), _strict_math():
        ref, got = _logits(model(probe)), _logits(net(probe))
    if ref is None or got is None or ref.shape != got.shape:
        return FoldReport(model, failed=True, note="the model's output is not a logits tensor: not checked, not folded")
    diff = float((got.double() - ref.double()).abs().max())
    scale = max(1.0, float(ref.double().abs().max()))
    if not diff <= RTOL * scale:  # NaN too
        return FoldReport(
            model,
            failed=True,
            max_diff=diff,
            note=f"folding changed the logits by up to {diff:.3g} (allowed {RTOL * scale:.3g}): a conv output "
            "is used elsewhere or the graph is unusual; running the model unprepared",
        )
    return FoldReport(net, applied=True, folded=pairs, kept=sorted(set(kept)), max_diff=diff)
