"""Localization against ground-truth boxes: pointing game (Zhang 2016, 15 px tolerance), energy-based
pointing game (Score-CAM), and box localization (threshold, largest connected component, IoU >= 0.5).

Boxes come from an annotation file in ORIGINAL image pixel coordinates (x1, y1, x2, y2; x to the
right, y down; pixel i covers [i, i+1)) and are mapped into the model-input frame through the
preprocessing's resize + centre crop (`Preprocess.crop_box`); everything below works in that
frame, where the maps live. Pixel (row r, col c) has its centre at (c + 0.5, r + 0.5).

Annotation files:
    CSV    header image,x1,y1,x2,y2[,label|class]  (xmin,ymin,xmax,ymax also accepted); one row per box
    JSON   {"image": [[x1, y1, x2, y2], ...]}  or  {"image": [{"box": [...], "label": 967}, ...]}
           or  [{"image": ..., "box": [x1, y1, x2, y2], "label": 967}, ...]  ("class" = "label")
    XML    Pascal VOC (one file, or a folder of them): <filename>, <object><bndbox>; VOC's 1-based
           inclusive xmin..xmax becomes [xmin - 1, xmax); <object><name> is the box's label
A box's label (optional) is kept as text. The pointing game's per-class protocol (`average:
class`) reads labels that are integers as the model's class index; other metrics ignore labels.
`image` matches an image like every side file does (data.side_keys): its key (path relative to
the input root, without extension), that key with the extension, the file name, or the file stem.
"""

from __future__ import annotations

import csv
import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..data import side_keys
from ..errors import ConfigError
from .base import Metric, MetricResult, register

Box = tuple[float, float, float, float]


@dataclass
class Annotations:
    boxes: dict[str, list[Box]] = field(default_factory=dict)
    source: str = ""
    labels: dict[str, list[str | None]] = field(default_factory=dict)  # per box, parallel to boxes

    @classmethod
    def load(cls, path: str | Path) -> Annotations:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"annotations: file not found: {p}")
        try:
            if p.is_dir():
                files = sorted(p.glob("*.xml"))
                if not files:
                    raise ConfigError(f"annotations: no Pascal VOC .xml file in folder {p}")
                table: dict[str, list[tuple[Box, str | None]]] = {}
                for f in files:
                    for k, v in _read_voc(f).items():
                        table.setdefault(k, []).extend(v)
            elif p.suffix.lower() == ".csv":
                table = _read_csv(p)
            elif p.suffix.lower() == ".json":
                table = _read_json(p)
            elif p.suffix.lower() == ".xml":
                table = _read_voc(p)
            else:
                raise ConfigError(f"annotations: {p}: use a .csv, .json, Pascal VOC .xml file or a folder of .xml")
        except ConfigError:
            raise
        except (
            ValueError,
            KeyError,
            TypeError,
            IndexError,
            ET.ParseError,
            json.JSONDecodeError,
            UnicodeDecodeError,
        ) as e:
            raise ConfigError(f"annotations: {p} could not be read: {type(e).__name__}: {e}") from None
        for k, bs in table.items():
            for b, _ in bs:
                if not (b[2] > b[0] and b[3] > b[1]):
                    raise ConfigError(f"annotations: {p}: box {list(b)} of '{k}' needs x2 > x1 and y2 > y1")
        boxes = {k: [b for b, _ in bs] for k, bs in table.items()}
        return cls(boxes, str(p), {k: [lab for _, lab in bs] for k, bs in table.items()})

    def lookup(self, rel: str, path: Path | str | None) -> list[Box] | None:
        for k in side_keys(rel, path):
            if k in self.boxes:
                return self.boxes[k]
        return None

    def lookup_labels(self, rel: str, path: Path | str | None) -> list[str | None] | None:
        for k in side_keys(rel, path):
            if k in self.boxes:
                return self.labels.get(k) or [None] * len(self.boxes[k])
        return None

    def class_labels_in_input(self, rel, path, size, preprocess, input_hw) -> list[int | None] | None:
        """The class index of each box boxes_in_input keeps (None: no label), or None without an entry."""
        bs, labs = self.lookup(rel, path), self.lookup_labels(rel, path)
        if bs is None:
            return None
        w, h = size
        keep = kept_boxes(torch.tensor(bs, dtype=torch.float32), preprocess.crop_box(w, h), input_hw)
        return [class_index(lab) for lab, k in zip(labs, keep.tolist(), strict=True) if k]

    def boxes_in_input(self, rel, path, size, preprocess, input_hw, device) -> Tensor | None:
        """The image's boxes [k, 4] in the model-input frame (clipped; empty ones dropped), or
        None when the file has no entry for the image."""
        bs = self.lookup(rel, path)
        if bs is None:
            return None
        w, h = size
        return to_input_frame(torch.tensor(bs, dtype=torch.float32), preprocess.crop_box(w, h), input_hw).to(device)


def class_index(label: str | None) -> int | None:
    """A box label as the model's class index: an integer label ("967"), else None."""
    if label is None:
        return None
    try:
        return int(str(label).strip())
    except ValueError:
        return None


def kept_boxes(boxes: Tensor, crop: Box, input_hw: tuple[int, int]) -> Tensor:
    """[k] bool: the boxes to_input_frame keeps (not empty once clipped to the model input)."""
    out = _to_frame(boxes, crop, input_hw)
    return (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])


def to_input_frame(boxes: Tensor, crop: Box, input_hw: tuple[int, int]) -> Tensor:
    """Boxes [k, 4] in original pixels -> model-input pixels, given the crop box (left, top,
    right, bottom) of the model input in the original image; clipped to the input, empty dropped."""
    out = _to_frame(boxes, crop, input_hw)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep]


def _to_frame(boxes: Tensor, crop: Box, input_hw: tuple[int, int]) -> Tensor:
    left, top, right, bottom = crop
    hh, ww = input_hw
    sx, sy = ww / (right - left), hh / (bottom - top)
    out = torch.stack(
        [(boxes[:, 0] - left) * sx, (boxes[:, 1] - top) * sy, (boxes[:, 2] - left) * sx, (boxes[:, 3] - top) * sy], 1
    )
    out[:, 0::2] = out[:, 0::2].clamp(0, ww)
    out[:, 1::2] = out[:, 1::2].clamp(0, hh)
    return out


def _label(v) -> str | None:
    return None if v is None or str(v).strip() == "" else str(v).strip()


def _read_csv(p: Path) -> dict[str, list[tuple[Box, str | None]]]:
    with open(p, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ConfigError(f"annotations: {p} has no rows")
    cols = set(rows[0])
    names = next((n for n in (("x1", "y1", "x2", "y2"), ("xmin", "ymin", "xmax", "ymax")) if set(n) <= cols), None)
    if "image" not in cols or names is None:
        raise ConfigError(f"annotations: {p} needs a header image,x1,y1,x2,y2 (or image,xmin,ymin,xmax,ymax)")
    lab = next((c for c in ("label", "class") if c in cols), None)
    table: dict[str, list[tuple[Box, str | None]]] = {}
    for r in rows:
        box = tuple(float(r[n]) for n in names)
        table.setdefault(r["image"].strip(), []).append((box, _label(r.get(lab)) if lab else None))
    return table


def _json_box(b) -> tuple[Box, str | None]:
    if isinstance(b, dict):
        return tuple(float(c) for c in b.get("box", b.get("bbox"))), _label(b.get("label", b.get("class")))
    return tuple(float(c) for c in b), None


def _read_json(p: Path) -> dict[str, list[tuple[Box, str | None]]]:
    data = json.loads(p.read_text(encoding="utf-8"))
    table: dict[str, list[tuple[Box, str | None]]] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            v = [v] if v and not isinstance(v[0], list | dict) else v
            table[k] = [_json_box(b) for b in v]
    elif isinstance(data, list):
        for item in data:
            table.setdefault(str(item["image"]), []).append(_json_box(item))
    else:
        raise ConfigError(f"annotations: {p}: expected a mapping image -> boxes, or a list of {{image, box}}")
    for k, bs in table.items():
        if any(len(b) != 4 for b, _ in bs):
            raise ConfigError(f"annotations: {p}: every box of '{k}' needs 4 numbers x1,y1,x2,y2")
    return table


def _read_voc(p: Path) -> dict[str, list[tuple[Box, str | None]]]:
    root = ET.parse(p).getroot()
    name = (root.findtext("filename") or p.stem).strip()
    boxes = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        x1, y1, x2, y2 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append(((x1 - 1.0, y1 - 1.0, x2, y2), _label(obj.findtext("name"))))  # 1-based inclusive -> [x1, x2)
    return {name: boxes}


def pad_boxes(boxes: list[Tensor], device) -> Tensor:
    """List of [k_i, 4] -> [B, K, 4]; padding boxes lie at +inf (never hit, never inside)."""
    k = max((len(b) for b in boxes), default=1) or 1
    out = torch.full((len(boxes), k, 4), float("inf"), device=device)
    for i, b in enumerate(boxes):
        if len(b):
            out[i, : len(b)] = b.to(device)
    return out


def box_mask(boxes: Tensor, hw: tuple[int, int]) -> Tensor:
    """[B, K, 4] boxes -> [B, H, W] bool: pixels whose centre lies in any box."""
    h, w = hw
    cx = torch.arange(w, device=boxes.device, dtype=torch.float32) + 0.5
    cy = torch.arange(h, device=boxes.device, dtype=torch.float32) + 0.5
    inx = (cx >= boxes[..., 0:1]) & (cx < boxes[..., 2:3])  # [B, K, W]
    iny = (cy >= boxes[..., 1:2]) & (cy < boxes[..., 3:4])  # [B, K, H]
    return (iny[..., :, None] & inx[..., None, :]).any(1)


def largest_component_box(mask: Tensor) -> Tensor:
    """[B, H, W] bool -> [B, 4] box (x1, y1, x2, y2) around the largest 8-connected component
    (label propagation with 3x3 max-pooling, on the device); all-zero boxes for empty masks."""
    b, h, w = mask.shape
    m = mask.float()[:, None]
    labels = (torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float32).view(1, 1, h, w)) * m
    for it in range(h * w):
        new = F.max_pool2d(labels, 3, stride=1, padding=1) * m
        if it % 8 == 7 and torch.equal(new, labels):
            break
        labels = new
    lab = labels.view(b, -1).long()
    counts = torch.zeros(b, h * w + 1, device=mask.device, dtype=torch.long)
    counts.scatter_add_(1, lab, torch.ones_like(lab))
    counts[:, 0] = 0
    best = counts.argmax(1)
    comp = (lab == best[:, None]) & (best[:, None] > 0)
    comp = comp.view(b, h, w)
    rows, cols = comp.any(2), comp.any(1)
    ar_h = torch.arange(h, device=mask.device)
    ar_w = torch.arange(w, device=mask.device)
    big = h + w
    y1 = torch.where(rows, ar_h, big).amin(1)
    y2 = torch.where(rows, ar_h, -1).amax(1) + 1
    x1 = torch.where(cols, ar_w, big).amin(1)
    x2 = torch.where(cols, ar_w, -1).amax(1) + 1
    box = torch.stack([x1, y1, x2, y2], 1).float()
    return torch.where(comp.flatten(1).any(1)[:, None], box, torch.zeros_like(box))


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """a [B, 4], b [B, K, 4] -> IoU [B, K] (padding boxes at inf give 0)."""
    a = a[:, None]
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = torch.nan_to_num(iw * ih, nan=0.0)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = torch.nan_to_num((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]), nan=0.0, posinf=0.0)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))


NonNeg = Annotated[float, Field(ge=0)]


@register(
    "pointing-game",
    "Pointing game (Zhang 2016): 100 if the map's maximum lies within `tolerance` px of a box. Higher is better",
)
@dataclass
class PointingGame(Metric):
    tolerance: NonNeg = 15.0  # Euclidean distance in model-input pixels
    # image: the summary's mean is over images. class: TorchRay's protocol: a map explaining class c
    # is scored against the image's boxes labelled c (an image without one is not scored: nan),
    # and the summary's mean is the mean over classes of each class's accuracy
    average: Literal["image", "class"] = "image"

    needs: ClassVar[frozenset[str]] = frozenset({"boxes"})
    direction: ClassVar[str] = "higher"
    value_range: ClassVar[tuple[float, float]] = (0.0, 100.0)

    def compute(self, ctx, x, maps, target, *, boxes: list[Tensor], box_labels=None, **extras) -> MetricResult:
        b, h, w = maps.shape
        scored = torch.ones(b, dtype=torch.bool, device=maps.device)
        if self.average == "class" and box_labels is not None:
            boxes = list(boxes)
            for i, labs in enumerate(box_labels):
                if labs is None or all(c is None for c in labs):
                    continue  # unlabelled boxes: all of them are the explained class's
                keep = torch.tensor([c == int(target[i]) for c in labs], dtype=torch.bool)
                boxes[i] = boxes[i][keep.to(boxes[i].device)]
                scored[i] = bool(keep.any())
        idx = torch.nan_to_num(maps.float(), nan=-float("inf")).flatten(1).argmax(1)
        px = (idx % w).float() + 0.5
        py = torch.div(idx, w, rounding_mode="floor").float() + 0.5
        bx = pad_boxes(boxes, maps.device)
        dx = torch.maximum(bx[..., 0] - px[:, None], px[:, None] - bx[..., 2]).clamp(min=0)
        dy = torch.maximum(bx[..., 1] - py[:, None], py[:, None] - bx[..., 3]).clamp(min=0)
        dist = torch.nan_to_num(torch.sqrt(dx**2 + dy**2), nan=float("inf")).amin(1)
        hit = 100.0 * (dist <= self.tolerance).float()
        return MetricResult({self.name: torch.where(scored, hit, torch.full_like(hit, float("nan")))})


def class_mean(values: list[tuple[str, float]]) -> tuple[float, float, int]:
    """(mean over classes of each class's mean, sample std over the class means, number of classes)
    for (class, value) pairs; non-finite values are left out."""
    per: dict[str, list[float]] = {}
    for c, v in values:
        if math.isfinite(v):
            per.setdefault(c, []).append(v)
    means = [sum(v) / len(v) for v in per.values()]
    if not means:
        return float("nan"), float("nan"), 0
    m = sum(means) / len(means)
    std = math.sqrt(sum((v - m) ** 2 for v in means) / (len(means) - 1)) if len(means) > 1 else 0.0
    return m, std, len(means)


@register(
    "energy-pointing",
    "Energy-based pointing game (Score-CAM): share of the map's positive mass inside the boxes. Higher is better",
)
@dataclass
class EnergyPointing(Metric):
    needs: ClassVar[frozenset[str]] = frozenset({"boxes"})
    direction: ClassVar[str] = "higher"
    value_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    def compute(self, ctx, x, maps, target, *, boxes: list[Tensor], **extras) -> MetricResult:
        m = torch.nan_to_num(maps.float(), nan=0.0).clamp(min=0)
        inside = box_mask(pad_boxes(boxes, maps.device), tuple(maps.shape[-2:]))
        total = m.flatten(1).sum(1)
        energy = (m * inside).flatten(1).sum(1) / total.clamp_min(1e-12)
        return MetricResult({self.name: torch.where(total > 0, energy, torch.zeros_like(energy))})


@register(
    "box-loc",
    "Box localization: map >= threshold*max, box of the largest connected component; 100 if IoU >= 0.5 "
    "(also writes box-iou). Higher is better",
)
@dataclass
class BoxLocalization(Metric):
    threshold: Annotated[float, Field(gt=0, le=1)] = 0.15  # fraction of the max (Grad-CAM 0.15, CAM 0.2)
    iou: Annotated[float, Field(gt=0, le=1)] = 0.5  # IoU that counts as a correct box

    needs: ClassVar[frozenset[str]] = frozenset({"boxes"})
    direction: ClassVar[str] = "higher"
    outputs: ClassVar[dict[str, str]] = {"box-iou": "higher"}
    value_range: ClassVar[tuple[float, float]] = (0.0, 100.0)

    def compute(self, ctx, x, maps, target, *, boxes: list[Tensor], **extras) -> MetricResult:
        m = torch.nan_to_num(maps.float(), nan=0.0).clamp(min=0)
        mx = m.flatten(1).amax(1)
        mask = (m >= self.threshold * mx[:, None, None]) & (mx[:, None, None] > 0)
        pred = largest_component_box(mask)
        iou = box_iou(pred, pad_boxes(boxes, maps.device)).amax(1)
        return MetricResult({self.name: 100.0 * (iou >= self.iou).float(), "box-iou": iou})
