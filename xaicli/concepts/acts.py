"""Image sets and what the concept commands read from a layer, streamed batch by batch.

`ImageSets` discovers each named folder (data.discover), decodes it in DataLoader workers
(data.ImageDataset: a file that cannot be read becomes a row of OUT/concepts/errors.csv, never
a traceback) and hands the caller preprocessed batches on the device; only what the caller
keeps per batch (a flattened activation, a dot product, a crop's mean) stays in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import Tensor

from ..data import ImageDataset, ImageItem, discover, make_loader
from ..errors import ConfigError, InputError, MethodError
from ..hooks import capture
from ..locks import OutputLock
from ..models.adapter import ModelAdapter
from ..models.registry import load_model_cfg, resolve_device
from ..objectives import get_objective
from ..outputs import ERROR_FIELDS, CsvAppender

ERRORS = "errors.csv"


@contextmanager
def concept_session(cfg, wait: bool, lm=None):
    """OUT/concepts/ made and locked for the command; yields (device, the LoadedModel in eval mode
    (`lm`, or cfg.model loaded), its ModelAdapter)."""
    out = cfg.concepts_dir
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out, wait=wait):
        device = resolve_device(cfg.device)
        lm = lm or load_model_cfg(cfg.model, device)
        lm.model.eval()
        yield device, lm, ModelAdapter(lm.model, lm.preprocess.input_size)


def set_items(what: str, folder: str) -> list[ImageItem]:
    """The images of one named set; a missing or empty folder is a ConfigError naming the set."""
    try:
        return discover(folder).items
    except InputError as e:
        raise ConfigError(f"{what}: {e}".replace("input: ", "")) from None


class Loader:
    """Decoding for one command: the model's preprocessing, batch size, workers, device, and the
    errors.csv that every unreadable image goes to (image = '<set>/<key>')."""

    def __init__(self, lm, device: torch.device, batch_size: int, workers: int, max_pixels: int, out: Path):
        self.lm = lm
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self.max_pixels = max_pixels
        self.errors = CsvAppender(out / ERRORS, ERROR_FIELDS)
        self._failed: set[str] = set()  # a file read twice (extract: crops, then importance) counts once

    @property
    def failed(self) -> int:
        return len(self._failed)

    def batches(self, name: str, items: list[ImageItem], progress=None) -> Iterator[tuple[list[int], Tensor]]:
        """(indices into `items`, x [B, 3, H, W] on the device) for the readable images."""
        ds = ImageDataset(items, self.lm.preprocess, self.max_pixels)
        loader = make_loader(ds, self.batch_size, self.workers, pin_memory=self.device.type == "cuda")
        for batch in loader:
            new = [(f"{name}/{items[i].rel}", i, r) for i, r in batch.failures]
            new = [(key, i, r) for key, i, r in new if key not in self._failed]
            self._failed.update(key for key, _, _ in new)
            self.errors.append([{"image": key, "path": str(items[i].path), "reason": r} for key, i, r in new])
            if progress is not None:
                progress.advance(len(batch.indices) + len(batch.failures))
            if batch.x is not None:
                yield batch.indices, batch.x.to(self.device, non_blocking=True)


def check_layers(adapter, layers: list[str]) -> list[str]:
    """Every named layer exists (else one line listing the candidates, exit 2)."""
    for name in layers:
        try:
            adapter.module(name)
        except MethodError as e:
            raise ConfigError(f"layers: {e}") from None
    return layers


def flat_activations(model, x: Tensor, layers: list[str]) -> dict[str, Tensor]:
    """{layer: [B, D]} float32 on the CPU, from one forward pass without autograd."""
    with ExitStack() as stack, torch.no_grad():
        caps = {name: stack.enter_context(capture(model, name)) for name in layers}
        model(x)
    out = {}
    for name, cap in caps.items():
        if cap.activation is None:
            raise ConfigError(f"layers: '{name}' is not called in the model's forward pass; name another layer")
        out[name] = cap.activation.detach().float().flatten(1).cpu()
    return out


def layer_gradients(
    model, x: Tensor, layer: str, target: int, objective: str = "logit"
) -> tuple[Tensor, Tensor, Tensor]:
    """(activation [B, ...], d objective(logits, target) / d activation [B, ...], logits), detached;
    autograd starts at the layer (hooks.capture(start_graph=True)): a head-only backward."""
    score: Callable = get_objective(objective)
    with capture(model, layer, start_graph=True) as cap:
        with torch.no_grad():
            logits = model(x)
        if cap.activation is None:
            raise ConfigError(f"layers: '{layer}' is not called in the model's forward pass; name another layer")
        tgt = torch.full((x.shape[0],), target, dtype=torch.long, device=logits.device)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(score(logits, tgt).sum(), cap.activation)
    return cap.activation.detach(), grad.detach(), logits.detach()


def resolve_class(lm, cls: str) -> int:
    """A class index or an exact class name -> index (else one line with a hint)."""
    names = list(lm.class_names)
    if cls.strip().isdigit():
        idx = int(cls)
        if idx >= len(names):
            raise ConfigError(f"class {idx} is out of range (the model has {len(names)} classes)")
        return idx
    if cls in names:
        return names.index(cls)
    low = cls.lower()
    hits = [i for i, n in enumerate(names) if low in n.lower()]
    hint = ", ".join(f"{i} ({names[i]})" for i in hits[:5])
    raise ConfigError(f"class '{cls}' is not a class name of this model" + (f"; did you mean: {hint}" if hint else ""))
