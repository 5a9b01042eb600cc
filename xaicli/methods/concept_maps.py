"""Concept maps: K maps per image, where each concept sits (CRAFT's concept localisation; DFF).

With `concepts: OUT/concepts/` (the factorisation `xai concepts extract` fitted on crops of one
class, W [K, C] at a layer): the image's activations at that layer, at every position of the
layer's grid, get non-negative coefficients u [K] with W fixed (min ||a - u W||, u >= 0: the
NMF transform); map k is u_k over the grid, upsampled bilinearly to the input size.

Without `concepts` (the default): Deep Feature Factorisation (Collins, Achanta & Süsstrunk,
ECCV 2018): each image's own activations [h*w, C] are factorised into `k` parts, largest first.

Activations are clamped at zero (NMF needs non-negative data; CRAFT takes post-ReLU layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import MethodError
from ..hooks import capture
from ..nmf import factorisation_file, load_factorisation, nmf_batched, nmf_transform
from ..ops import upsample
from ..registry import Count
from .base import BoundMethod, MethodSpec, Result, check_target, register, select_target

MAX_CONCEPTS = 64


def concept_names(k: int) -> tuple[str, ...]:
    return tuple(f"concept_{i}" for i in range(k))


class BoundConceptMaps(BoundMethod):
    def setup(self) -> None:
        self.w = None
        if self.spec.concepts:
            w, meta = load_factorisation(self.spec.concepts)
            self.w = w.to(self.ctx.device)
            layer = meta["layer"]
            if self.spec.layer and self.spec.layer != layer:
                raise MethodError(
                    f"concept_maps: layer '{self.spec.layer}' differs from the factorisation's layer '{layer}'"
                )
            self.layer = self.ctx.adapter.resolve_layer(layer)
        else:
            self.layer = self.ctx.adapter.resolve_layer(self.spec.layer or self.ctx.layer)

    def resolved(self) -> dict:
        return {"layer": self.layer}

    def compute(self, x: Tensor, target: Tensor | None) -> Result:
        with capture(self.model, self.layer) as cap, torch.no_grad():
            logits = self.model(x)
        if cap.activation is None:
            raise MethodError(f"layer '{self.layer}' was not called in the forward pass; name another layer")
        tgt = select_target(logits, target)
        check_target(tgt, logits.shape[1])
        acts = self.ctx.adapter.to_grid(cap.activation.detach()).float().clamp(min=0)  # [B, C, h, w]
        b, c, h, w = acts.shape
        flat = acts.flatten(2).transpose(1, 2)  # [B, h*w, C]
        if self.w is not None:
            if self.w.shape[1] != c:
                raise MethodError(
                    f"concept_maps: the factorisation has {self.w.shape[1]} channels, layer '{self.layer}' has {c}"
                )
            u = nmf_transform(flat, self.w, self.spec.iters)  # [B, h*w, K]
        else:
            u, _ = nmf_batched(flat, self.spec.k, self.spec.iters)
        k = u.shape[-1]
        maps = u.transpose(1, 2).reshape(b * k, h, w)
        maps = upsample(maps, tuple(x.shape[-2:])).reshape(b, k, *x.shape[-2:])
        return Result(maps.float(), logits.detach(), tgt)


@register(
    "concept_maps",
    "K concept maps: where each concept of a fitted factorisation (`concepts: OUT/concepts/`) sits; "
    "without one, each image's own NMF (DFF)",
)
@dataclass
class ConceptMaps(MethodSpec):
    concepts: str = ""  # OUT/concepts/ of `xai concepts extract` (or its concepts.safetensors); "" = DFF
    k: int = 4  # concepts per image without a factorisation (DFF)
    layer: str | None = None  # DFF's layer (default: the model's CAM layer); a factorisation names its own
    iters: Count = 200  # multiplicative-update iterations

    bound = BoundConceptMaps
    needs_layer = True
    path_params = ("concepts",)
    map_names: ClassVar[tuple[str, ...]] = concept_names(4)  # this instance's: concept_0 .. concept_{K-1}
    cost = "F (+ NMF on the layer grid, no backward)"

    def __post_init__(self):
        if not 1 <= self.k <= MAX_CONCEPTS:
            raise MethodError(f"method 'concept_maps': parameter 'k': between 1 and {MAX_CONCEPTS} (got {self.k})")
        if self.concepts:
            w, _ = load_factorisation(self.concepts)
            self.map_names = concept_names(w.shape[0])
        else:
            self.map_names = concept_names(self.k)

    @classmethod
    def file_params(cls, params: dict) -> dict[str, str]:
        v = params.get("concepts")
        return {"concepts": str(factorisation_file(v))} if isinstance(v, str) and v.strip() else {}
