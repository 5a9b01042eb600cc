"""Automatic concept extraction for one class, CRAFT-style (Fel et al., CVPR 2023).

1. Crops: every image of the class (model input, after preprocessing) is cut into a grid of
   square crops at each scale (side = scale x image side, stride = side), each resized to the
   model's input size.
2. Activations: the crops' activations at the layer, clamped at 0 and averaged over the layer's
   grid -> A [crops, C]; streamed batch by batch (only A is kept: crops x channels floats).
3. NMF: A ~ U W with K concepts (W [K, C], rows = concept directions; nmf.nmf, torch).
4. Importance (`importance: gradient`, the default), gradient x coefficient: on the class's whole images,
   U = the NMF transform of the activations at every grid position with W fixed; importance_k =
   mean over images of sum over positions of u_k * d logit_class / d u_k, where
   d logit / d u = (d logit / d A) W^T (A ~ U W). A first-order estimate of how much of the class
   logit concept k carries (positive: evidence for the class). `importance: sobol` is CRAFT's:
   Sobol total indices of masks over the concept coefficients (`sobol_importance`), in [0, 1]
   per image, at N (K + 2) forward passes per image.
5. Outputs in OUT/concepts/: concepts.safetensors (W and the layer: reused by a resumed run and
   by `concept_maps`), concepts.csv, atlas.png (each concept's most activating crops); then the
   concept maps of every image through the engine (`xai explain` with `concept_maps`):
   OUT/concept_maps/<image>/concept_<k>.png|.npy and OUT/explanations.csv.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, MethodError
from ..hooks import capture, replace_output
from ..nmf import FACTORISATION, load_factorisation, nmf, nmf_transform, relative_error, save_factorisation
from ..outputs import atomic_write_bytes, read_csv, write_csv
from .acts import Loader, concept_session, layer_gradients, resolve_class, set_items
from .config import ConceptsConfig
from .tcav import reset_errors

CONCEPT_FIELDS = [
    "concept",
    "rank",
    "importance",
    "importance_share",
    "mean_coefficient",
    "dominant_crops",
    "top_crops",
]


@dataclass
class ExtractSummary:
    out: Path
    rows: list[dict] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    reused: bool = False  # the factorisation of an earlier run with the same settings was reused
    crops: int = 0
    error: float = float("nan")  # relative reconstruction error ||A - UW|| / ||A||
    failed: int = 0
    maps: object | None = None  # explain_run.RunSummary of the concept maps
    seconds: float = 0.0


def crop_boxes(size: tuple[int, int], scales: list[float]) -> list[tuple[float, int, int, int]]:
    """(scale, top, left, side) of the crops of an H x W input: a grid per scale, stride = side."""
    h, w = size
    out = []
    for s in scales:
        side = max(1, round(s * min(h, w)))
        for top in range(0, h - side + 1, side):
            for left in range(0, w - side + 1, side):
                out.append((s, top, left, side))
    return out


def crops_of(x: Tensor, boxes) -> Tensor:
    """[B, 3, H, W] -> [B * len(boxes), 3, H, W]: each box cut out and resized to the input size."""
    size = tuple(x.shape[-2:])
    parts = [
        F.interpolate(x[:, :, t : t + s, left : left + s], size=size, mode="bilinear", align_corners=False)
        for _, t, left, s in boxes
    ]
    return torch.stack(parts, dim=1).flatten(0, 1)


def pooled_activations(model, adapter, layer: str, x: Tensor) -> Tensor:
    """[B, C]: the layer's activations, clamped at 0, averaged over its grid."""
    with capture(model, layer) as cap, torch.no_grad():
        model(x)
    if cap.activation is None:
        raise ConfigError(f"extract.layer: '{layer}' is not called in the model's forward pass; name another layer")
    return adapter.to_grid(cap.activation.detach()).float().clamp(min=0).mean(dim=(2, 3))


def concept_importance(model, adapter, layer: str, x: Tensor, k: int, w: Tensor) -> Tensor:
    """[B, K] gradient x coefficient of each concept for class k (see the module docstring)."""
    act, grad, _ = layer_gradients(model, x, layer, k)
    a = adapter.to_grid(act).float().clamp(min=0).flatten(2).transpose(1, 2)  # [B, hw, C]
    g = adapter.to_grid(grad).float().flatten(2).transpose(1, 2)
    u = nmf_transform(a, w)  # [B, hw, K]
    return (u * (g @ w.to(g.device).T)).sum(dim=1)


def sobol_importance(
    model, adapter, layer: str, x: Tensor, k: int, w: Tensor, designs: int = 32, seed: int = 0, batch: int = 16
) -> Tensor:
    """[B, K] Sobol total indices of the concepts for class k's logit (CRAFT): per image, the
    concept coefficients U (at every grid position, W fixed) are scaled by per-concept masks
    m in [0, 1]^K from a scrambled Sobol sequence; the layer's output is replaced by (U * m) W
    and the rest of the network gives f(m) = logit_k. Jansen's estimator over N = `designs`
    base points (matrices A, B and A with column i from B: N (K + 2) forward passes per image):
    ST_i = mean((f(A) - f(A_B^i))^2) / (2 Var f)."""
    with capture(model, layer) as cap, torch.no_grad():
        model(x)
    act = cap.activation
    if act is None or act.dim() != 4:
        raise ConfigError(f"extract.importance: sobol needs a layer with [B, C, h, w] outputs; '{layer}' is not one")
    b, c, h, wd = act.shape
    kk = w.shape[0]
    w = w.to(act.device, torch.float32)
    eng = torch.quasirandom.SobolEngine(2 * kk, scramble=True, seed=seed)
    ab = eng.draw(designs).to(act.device)
    a_, b_ = ab[:, :kk], ab[:, kk:]
    cols = [torch.where(torch.arange(kk, device=ab.device) == i, b_, a_) for i in range(kk)]
    masks = torch.cat([a_, b_, *cols])  # [N (K + 2), K]
    out = torch.zeros(b, kk, device=act.device)
    for j in range(b):
        u = nmf_transform(act[j].float().clamp(min=0).flatten(1).T, w)  # [hw, K]
        f = []
        for s in range(0, masks.shape[0], batch):
            m = masks[s : s + batch]
            pert = ((u[None] * m[:, None, :]) @ w).transpose(1, 2).reshape(len(m), c, h, wd).to(act.dtype)
            with replace_output(model, layer, pert), torch.no_grad():
                f.append(model(x[j : j + 1].expand(len(m), -1, -1, -1))[:, k].float())
        f = torch.cat(f)
        fa, fb, fc = f[:designs], f[designs : 2 * designs], f[2 * designs :].reshape(kk, designs)
        var = torch.cat([fa, fb]).var()
        out[j] = ((fa[None] - fc) ** 2).mean(dim=1) / (2 * var) if var > 0 else 0.0
    return out


def fit_key(cfg: ConceptsConfig, layer: str, k: int, items) -> str:
    """What decides the factorisation: model, layer, class, K, crops, NMF settings, the images."""
    e = cfg.extract
    doc = {
        "model": cfg.model.model_dump(),
        "layer": layer,
        "class": k,
        "concepts": e.concepts,
        "scales": e.scales,
        "iters": e.iters,
        "seed": e.seed,
        "importance": [e.importance, e.sobol_designs if e.importance == "sobol" else None],
        "images": [(it.rel, *_stat(it.path)) for it in items],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stat(p: Path) -> tuple[int, int]:
    try:
        st = p.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def run_extract(cfg: ConceptsConfig, progress=None, wait: bool = False, force: bool = False, lm=None, maps=True):
    """`xai concepts extract`: OUT/concepts/concepts.safetensors, concepts.csv, atlas.png, then the
    concept maps of the class's images (OUT/concept_maps/, through `xai explain`)."""
    t0 = time.perf_counter()
    e = cfg.extract
    out = cfg.concepts_dir
    with concept_session(cfg, wait, lm) as (device, lm, adapter):
        model = lm.model
        try:
            layer = adapter.resolve_layer(e.layer)
        except MethodError as err:
            raise ConfigError(f"extract.layer: {err}") from None
        k = resolve_class(lm, e.class_)
        items = set_items("extract.images", e.images)
        if len(items) < e.min_images:
            raise ConfigError(f"extract.images: {len(items)} image(s) in {e.images}; at least {e.min_images} needed")
        key = fit_key(cfg, layer, k, items)
        summary = ExtractSummary(out)
        reset_errors(out, "extract/")
        loader = Loader(lm, device, cfg.batch_size, cfg.workers, cfg.max_pixels, out)
        if not force and _reusable(out, key):
            summary.reused = True
            summary.rows = read_csv(out / "concepts.csv")
        else:
            _fit(cfg, lm, model, adapter, layer, k, items, key, loader, progress, summary)
        summary.failed = loader.failed
        summary.files = {n: out / n for n in (FACTORISATION, "concepts.csv", "atlas.png") if (out / n).is_file()}
    if maps:
        # a new fit makes the earlier concept maps stale: redo them (only when OUT holds nothing else)
        redo = force or (not summary.reused and _only_concept_maps(Path(cfg.output)))
        summary.maps = _concept_maps(cfg, k, progress, wait, redo)
    summary.seconds = time.perf_counter() - t0
    return summary


def _reusable(out: Path, key: str) -> bool:
    if not (out / FACTORISATION).is_file() or not (out / "concepts.csv").is_file():
        return False
    try:
        _, meta = load_factorisation(out)
    except ConfigError:
        return False
    return meta.get("fit_key") == key


def _fit(cfg, lm, model, adapter, layer, k, items, key, loader, progress, summary) -> None:
    e = cfg.extract
    out = cfg.concepts_dir
    boxes = crop_boxes(lm.preprocess.input_size, e.scales)
    bar = progress("crops") if progress else None
    acts, where = [], []  # [n, C] per batch; (item index, box index) per crop
    if bar:
        bar.start(len(items))
    try:
        for idx, x in loader.batches("extract", items, bar):
            for j in range(x.shape[0]):  # one image's crops at a time: memory ~ crops per image
                crops = crops_of(x[j : j + 1], boxes)
                for s in range(0, crops.shape[0], cfg.batch_size):
                    acts.append(pooled_activations(model, adapter, layer, crops[s : s + cfg.batch_size]).cpu())
            where += [(i, b) for i in idx for b in range(len(boxes))]
    finally:
        if bar:
            bar.stop()
    if not acts:
        raise ConfigError(f"extract.images: none of the {len(items)} image(s) could be read (see {out / 'errors.csv'})")
    a = torch.cat(acts).to(lm_device(model))
    if a.shape[0] < e.concepts:
        raise ConfigError(f"extract: {a.shape[0]} crops for {e.concepts} concepts; add images or scales")
    u, w = nmf(a, e.concepts, e.iters, e.seed)
    summary.crops, summary.error = a.shape[0], relative_error(a, u, w)
    imp = torch.zeros(e.concepts, device=a.device)
    n = 0
    bar = progress("importance") if progress else None
    if bar:
        bar.start(len(items))
    try:
        for _, x in loader.batches("extract", items, bar):
            if e.importance == "sobol":
                imp += sobol_importance(model, adapter, layer, x, k, w, e.sobol_designs, e.seed, cfg.batch_size).sum(0)
            else:
                imp += concept_importance(model, adapter, layer, x, k, w).sum(dim=0)
            n += x.shape[0]
    finally:
        if bar:
            bar.stop()
    imp = (imp / max(n, 1)).cpu()
    u = u.cpu()
    order = imp.argsort(descending=True).tolist()
    total = float(imp.abs().sum()) or 1.0
    dominant = torch.bincount(u.argmax(dim=1), minlength=e.concepts)
    top = u.argsort(dim=0, descending=True)[: e.atlas_crops]  # [atlas_crops, K]
    rows = []
    for rank, c in enumerate(order, 1):
        crops = [f"{items[where[j][0]].rel}@{boxes[where[j][1]][0]:g}:{boxes[where[j][1]][1]},{boxes[where[j][1]][2]}"
                 for j in top[:, c].tolist()]  # fmt: skip
        rows.append(
            {
                "concept": c,
                "rank": rank,
                "importance": f"{float(imp[c]):.6g}",
                "importance_share": f"{abs(float(imp[c])) / total:.4f}",
                "mean_coefficient": f"{float(u[:, c].mean()):.6g}",
                "dominant_crops": int(dominant[c]),
                "top_crops": "; ".join(crops),
            }
        )
    meta = {
        "layer": layer,
        "class": k,
        "class_label": lm.label(k),
        "concepts": e.concepts,
        "fit_key": key,
        "model": cfg.model.name,
        "crops": int(a.shape[0]),
        "relative_error": summary.error,
        "importance": e.importance,
    }
    write_atlas(out / "atlas.png", lm, items, boxes, where, top, order, imp)
    write_csv(out / "concepts.csv", CONCEPT_FIELDS, rows)
    save_factorisation(out / FACTORISATION, w, meta)  # last: a complete fit, reused on resume
    summary.rows = rows


def lm_device(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def write_atlas(path: Path, lm, items, boxes, where, top: Tensor, order: list[int], imp: Tensor, thumb: int = 96):
    """One row per concept (most important first): its label, then its most activating crops."""
    from PIL import Image, ImageDraw

    from ..images import load_image
    from ..outputs import font_of

    pre = lm.preprocess
    cache: dict[int, np.ndarray] = {}

    def view(i: int) -> np.ndarray:  # the model's view of image i, [H, W, 3] uint8
        if i not in cache:
            x = pre.denormalize(pre(load_image(items[i].path)))
            cache[i] = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        return cache[i]

    n = top.shape[0]
    label_w, pad = 150, 4
    sheet = Image.new("RGB", (label_w + n * (thumb + pad) + pad, len(order) * (thumb + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = font_of(13)
    for r, c in enumerate(order):
        y = pad + r * (thumb + pad)
        draw.text((6, y + thumb // 2 - 16), f"concept {c}", fill=(0, 0, 0), font=font)
        draw.text((6, y + thumb // 2 + 2), f"importance {float(imp[c]):.3g}", fill=(80, 80, 80), font=font)
        for j, crop in enumerate(top[:, c].tolist()):
            i, b = where[crop]
            _, t, left, side = boxes[b]
            img = Image.fromarray(view(i)[t : t + side, left : left + side]).resize((thumb, thumb), Image.BILINEAR)
            sheet.paste(img, (label_w + pad + j * (thumb + pad), y))
    import io

    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _only_concept_maps(out: Path) -> bool:
    from ..outputs import method_keys, read_run_yaml

    if not (out / "run.yaml").is_file():
        return False
    try:
        return method_keys(read_run_yaml(out)) == ["concept_maps"]
    except Exception:
        return False


def _concept_maps(cfg: ConceptsConfig, k: int, progress, wait: bool, force: bool):
    """The class's images through `xai explain` with the fitted `concept_maps` (K maps each)."""
    from ..config import build_config
    from ..explain_run import RunOptions, run_explain

    e = cfg.extract
    overrides = {
        "input": e.images,
        "output": cfg.output,
        "methods": [{"name": "concept_maps", "concepts": str(cfg.concepts_dir)}],
        "model.name": cfg.model.name,
        "model.weights": cfg.model.weights,
        "model.num_classes": cfg.model.num_classes,
        "model.class_names": cfg.model.class_names,
        "target": k,
        "device": cfg.device,
        "batch_size": cfg.batch_size,
        "workers": cfg.workers,
        "max_pixels": cfg.max_pixels,
    }
    run_cfg = build_config(None, overrides)
    return run_explain(run_cfg, progress=progress("concept maps") if progress else None,
                       options=RunOptions(force=force, wait=wait))  # fmt: skip
