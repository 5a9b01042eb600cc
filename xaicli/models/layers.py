"""Target-layer discovery and naming for CAM-style methods.

`find_target_layer` runs one forward pass on a dummy input and picks the last module whose
output is a spatial feature map [B, C, h, w] (h*w > 1), skipping pooling, dropout and identity
layers, then climbs to the outermost container that returns that very tensor (so ResNet-50
gives `layer4`, EfficientNet gives `bn2`, VGG gives the last ReLU before the final max-pool).
Vision transformers (token outputs [B, N, D]) get the last block; see `tokens_to_grid`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import MethodError
from ..hooks import trace_outputs

_POOL = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_PASS = (nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten)


def get_module(model: nn.Module, name: str, input_size: tuple[int, int] = (224, 224)) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        cands = spatial_layers(model, input_size)
        shown = ", ".join(cands[-12:])
        raise MethodError(f"layer '{name}' is not a module of this model; spatial candidates (last 12): {shown}")
    return modules[name]


def _trace(model: nn.Module, input_size: tuple[int, int]) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(name, module, output) for every module in completion order, from one dummy forward."""
    p = next(model.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    return trace_outputs(model, torch.zeros(1, 3, *input_size, device=dev))


def _is_spatial(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.shape[-1] * t.shape[-2] > 1


def _is_tokens(t: torch.Tensor) -> bool:
    return t.dim() == 3 and t.shape[1] > 1


def spatial_layers(model: nn.Module, input_size: tuple[int, int] = (224, 224)) -> list[str]:
    """Names of modules with spatial (or token) outputs, in completion order, without repeats."""
    try:
        recs = _trace(model, input_size)
    except Exception:
        return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    seen, out = set(), []
    for name, _m, t in recs:
        if (_is_spatial(t) or _is_tokens(t)) and name not in seen:
            seen.add(name)
            out.append(name)
    return out


def find_target_layer(model: nn.Module, input_size: tuple[int, int] = (224, 224)) -> str:
    recs = _trace(model, input_size)
    pooled: set[int] = set()  # tensors that pooling layers returned (VGG's last max-pool)
    last_sp = last_tok = None
    for i, (_name, mod, t) in enumerate(recs):
        if isinstance(mod, _POOL):
            pooled.add(id(t))
            continue
        if isinstance(mod, _PASS):
            continue
        if _is_spatial(t) and id(t) not in pooled:
            last_sp = i
        is_block = list(mod.children()) and not isinstance(mod, nn.Sequential | nn.ModuleList)
        if _is_tokens(t) and is_block:
            last_tok = i
    if last_tok is not None and (last_sp is None or last_tok > last_sp):
        # token model (ViT): gradients reach the patch tokens only before the last block mixes
        # them into the class token, so use the first token-output layer inside the last block.
        block, _m, _t = recs[last_tok]
        for name, _mod, t in recs:
            if name.startswith(block + ".") and _is_tokens(t):
                return name
        return block
    if last_sp is None:
        raise MethodError("could not find a spatial layer for CAM methods; name one with `layer:`")
    name, _m, tensor = recs[last_sp]
    # climb to the outermost container that returns this very tensor (ResNet: layer4.2 -> layer4)
    for later_name, _lm, later_t in recs[last_sp + 1 :]:
        if later_t is tensor and later_name and name.startswith(later_name + "."):
            name = later_name
    return name


def tokens_to_grid(t: torch.Tensor, input_size: tuple[int, int] | None = None) -> torch.Tensor:
    """[B, N, D] tokens -> [B, D, h, w], dropping leading class/register tokens.

    The patch grid is the largest square (or input-aspect) grid that fits N; the tokens before
    it (CLS, distillation, registers) are dropped.
    """
    b, n, d = t.shape
    if input_size is not None and input_size[0] != input_size[1]:
        ratio = input_size[1] / input_size[0]
        h = int(math.floor(math.sqrt(n / ratio)))
        while h > 0 and (n - h * int(round(h * ratio))) < 0:
            h -= 1
        w = int(round(h * ratio))
    else:
        h = w = int(math.isqrt(n))
    extra = n - h * w
    if h == 0 or extra < 0 or extra > 16:
        raise MethodError(f"cannot reshape {n} tokens into a patch grid")
    return t[:, extra:, :].transpose(1, 2).reshape(b, d, h, w)
