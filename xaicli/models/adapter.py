"""Model knowledge in one place: what a method may ask about a model, answered here.

    adapter.default_layer()     the CAM target layer (last spatial feature block; a ViT's token layer)
    adapter.module(name)        a named module, or a MethodError listing the candidates
    adapter.head()              the classifier Linear that reads the pooled features (CAM's check)
    adapter.to_grid(t)          token activations [B, N, D] -> [B, D, h, w]; spatial maps unchanged
    adapter.canonizers()        the Zennit canonizers LRP applies to its copy (models/canonizers.py)

timm models answer through their own API (`get_classifier()`, `feature_info`); other models
through a traced dummy forward. Methods never inspect modules themselves.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor, nn

from ..errors import MethodError
from .layers import find_target_layer, get_module, spatial_layers, tokens_to_grid


class ModelAdapter:
    def __init__(self, model: nn.Module, input_size: tuple[int, int] = (224, 224)):
        self.model = model
        self.input_size = tuple(input_size)

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def is_timm(self) -> bool:
        return type(self.model).__module__.startswith("timm.") and hasattr(self.model, "get_classifier")

    def module(self, name: str) -> nn.Module:
        """The named module; a wrong name lists what may be named (timm: its feature_info blocks and
        the default layer; other models: the layers with spatial or token outputs)."""
        modules = dict(self.model.named_modules())
        if name in modules:
            return modules[name]
        if self.is_timm and getattr(self.model, "feature_info", None):
            shown = ", ".join(dict.fromkeys([*self.candidate_layers(), self.default_layer()]))
            raise MethodError(f"layer '{name}' is not a module of this model; candidates (timm feature_info): {shown}")
        return get_module(self.model, name, self.input_size)  # raises, listing the spatial layers

    @cached_property
    def _default_layer(self) -> str:
        return find_target_layer(self.model, self.input_size)

    def default_layer(self) -> str:
        return self._default_layer

    def resolve_layer(self, name: str | None) -> str:
        """The named layer (checked: a module whose output is a spatial map or tokens) or the default one."""
        if name is None:
            return self.default_layer()
        self.module(name)
        shape = self._output_shapes.get(name)
        if shape is not None and not (
            (len(shape) == 4 and shape[-1] * shape[-2] > 1) or (len(shape) == 3 and shape[1] > 1)
        ):
            shown = ", ".join(dict.fromkeys([*self.candidate_layers()[-12:], self.default_layer()]))
            raise MethodError(
                f"layer '{name}' is not spatial: its output is {list(shape)}, and CAM-style methods need a "
                f"[B,C,h,w] feature map or [B,N,D] tokens; candidates: {shown} (default: {self.default_layer()})"
            )
        return name

    @cached_property
    def _output_shapes(self) -> dict[str, tuple[int, ...]]:
        """{module name: output shape} from one dummy forward (modules the forward does not call are absent)."""
        from .layers import _trace

        try:
            return {n: tuple(t.shape) for n, _m, t in _trace(self.model, self.input_size)}
        except Exception:  # a model that cannot run the dummy input: the method's own forward will say
            return {}

    def candidate_layers(self) -> list[str]:
        """Layers a user may name: timm's feature_info modules, else every spatial/token layer."""
        if self.is_timm and getattr(self.model, "feature_info", None):
            return [f["module"] for f in self.model.feature_info]
        return spatial_layers(self.model, self.input_size)

    def head(self) -> str | None:
        """Name of the classifier Linear (timm: `get_classifier()`; else the last Linear), or None."""
        named = {id(m): n for n, m in self.model.named_modules()}
        if self.is_timm:
            clf = self.model.get_classifier()
            if isinstance(clf, nn.Linear) and id(clf) in named:
                return named[id(clf)]
        linears = [n for n, m in self.model.named_modules() if isinstance(m, nn.Linear)]
        return linears[-1] if linears else None

    def to_grid(self, t: Tensor) -> Tensor:
        if t.dim() == 3:  # ViT tokens [B, N, D] -> [B, D, h, w]
            return tokens_to_grid(t, self.input_size)
        if t.dim() != 4:
            raise MethodError(f"a layer output of shape {tuple(t.shape)} is neither a [B,C,h,w] map nor [B,N,D] tokens")
        return t

    def canonizers(self) -> list:
        """Fresh Zennit canonizers for this architecture (ResNet, VGG, timm EfficientNet, else
        BatchNorm merging); apply them to a copy: they modify the model they are applied to."""
        from .canonizers import canonizers_for

        return canonizers_for(self.model)

    def canonized_copy(self) -> nn.Module:
        """A canonized deep copy of the model for LRP (eval mode, no parameter gradients); the
        model itself is never modified."""
        from .canonizers import canonized_copy

        return canonized_copy(self.model, self.canonizers())

    def lrp_unsupported(self, model: nn.Module | None = None) -> list[tuple[str, str]]:
        """(name, type) of the layers of `model` (a canonized copy; default: this model) that no
        LRP rule covers."""
        from .canonizers import unsupported_layers

        return unsupported_layers(self.model if model is None else model)
