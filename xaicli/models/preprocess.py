"""Preprocessing taken from the model's own data config, plus the geometry to undo it.

A `Preprocess` resizes the shorter side, centre-crops and normalizes, exactly like timm's
eval transform and torchvision's `ImageClassification` preset (`crop="center"`); with
`crop="none"` it resizes the whole image to the input size instead (no crop, aspect not kept).
`crop_box` tells where the model's input lies in the original image, so heatmaps can be drawn
at the original size. `with_overrides` applies the config's `model:` preprocessing keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

_INTERP = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
}


@dataclass(frozen=True)
class Preprocess:
    input_size: tuple[int, int]  # (H, W) of the model input
    resize: int  # shorter side after resizing, before the centre crop
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop: str = "center"  # center: resize the shorter side, centre crop | none: resize to input_size

    def with_overrides(
        self,
        input_size: int | tuple[int, int] | None = None,
        resize: int | None = None,
        crop: str | None = None,
        mean=None,
        std=None,
        interpolation: str | None = None,
    ) -> Preprocess:
        """This preprocessing with the given keys replaced (None keeps a key). A new input size
        without `resize` keeps the ratio of resize to crop (e.g. 256/224)."""
        upd: dict = {}
        if input_size is not None:
            hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
            upd["input_size"] = (int(hw[0]), int(hw[1]))
            if resize is None:
                upd["resize"] = max(1, round(min(hw) * self.resize / min(self.input_size)))
        if resize is not None:
            upd["resize"] = int(resize)
        for k, v in (("crop", crop), ("interpolation", interpolation)):
            if v is not None:
                upd[k] = v
        for k, v in (("mean", mean), ("std", std)):
            if v is not None:
                upd[k] = tuple(float(a) for a in v)
        return dataclasses.replace(self, **upd)

    @classmethod
    def from_timm(cls, cfg: dict) -> Preprocess:
        """From `timm.data.resolve_data_config(...)` (input_size, crop_pct, interpolation, mean, std)."""
        _, h, w = cfg["input_size"]
        crop_pct = cfg.get("crop_pct") or 1.0
        # timm: scale_size = floor(img_size / crop_pct) for a square input
        resize = math.floor(min(h, w) / crop_pct)
        interp = cfg.get("interpolation", "bilinear")
        if interp not in _INTERP:
            interp = "bilinear"
        return cls((h, w), resize, interp, tuple(cfg["mean"]), tuple(cfg["std"]))

    @classmethod
    def from_torchvision(cls, preset) -> Preprocess:
        """From a torchvision weights' `transforms()` preset (ImageClassification)."""
        crop = preset.crop_size[0] if isinstance(preset.crop_size, list | tuple) else preset.crop_size
        resize = preset.resize_size[0] if isinstance(preset.resize_size, list | tuple) else preset.resize_size
        interp = getattr(preset.interpolation, "value", str(preset.interpolation))
        return cls((crop, crop), resize, interp, tuple(preset.mean), tuple(preset.std))

    def to_dict(self) -> dict:
        """For run.yaml (`resolved.preprocess`): what `xai render` needs to redraw without the model."""
        return {
            "input_size": list(self.input_size),
            "resize": self.resize,
            "crop": self.crop,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, d) -> Preprocess | None:
        """The inverse of `to_dict`; None for a missing or hand-damaged entry."""
        try:
            return cls(
                tuple(int(v) for v in d["input_size"]),
                int(d["resize"]),
                str(d.get("interpolation", "bilinear")),
                tuple(float(v) for v in d["mean"]),
                tuple(float(v) for v in d["std"]),
                str(d.get("crop", "center")),
            )
        except (KeyError, TypeError, ValueError, IndexError):
            return None

    # -- forward -------------------------------------------------------------------------
    def __call__(self, img: Image.Image) -> torch.Tensor:
        """PIL RGB image -> normalized float tensor [3, H, W]."""
        if self.crop == "none":
            img = TF.resize(img, list(self.input_size), interpolation=_INTERP[self.interpolation], antialias=True)
        else:
            img = TF.resize(img, self.resize, interpolation=_INTERP[self.interpolation], antialias=True)
            img = TF.center_crop(img, list(self.input_size))
        x = TF.to_tensor(img)
        return TF.normalize(x, self.mean, self.std)

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the model input in original-image pixel coordinates."""
        if self.crop == "none":
            return (0.0, 0.0, float(width), float(height))
        short, long_ = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize, int(self.resize * long_ / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        ch, cw = self.input_size
        top = int(round((new_h - ch) / 2.0))
        left = int(round((new_w - cw) / 2.0))
        sx, sy = new_w / width, new_h / height
        return (left / sx, top / sy, (left + cw) / sx, (top + ch) / sy)

    # -- inverse (for display) -------------------------------------------------------------
    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized [.., 3, H, W] -> [0, 1] image space."""
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(3, 1, 1)
        return x * std + mean

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """[0, 1] image space -> normalized (the inverse of `denormalize`)."""
        mean = torch.tensor(self.mean, device=x01.device, dtype=x01.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, device=x01.device, dtype=x01.dtype).view(3, 1, 1)
        return (x01 - mean) / std
