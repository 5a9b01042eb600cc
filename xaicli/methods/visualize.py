"""Class model visualisation (Simonyan 2013): the image that maximises a class logit.

    I* = argmax_I  y_c(I) - lambda * ||I||^2

Plain gradient ascent on the class LOGIT (not the softmax), starting from the zero image of
the model's normalised input space (= the dataset's mean colour), with L2 regularisation.
Optional extras that make the picture more readable: random jitter (roll by up to `jitter`
pixels each step) and a light Gaussian blur every `blur_every` steps. After each step the
image is clipped to the range of valid pixels ([0, 1] before normalisation). The result is
de-normalised (the mean added back) for display.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import MethodError
from ..ops import gaussian_blur
from .base import eval_mode

CSV_FIELDS = ["class", "label", "steps", "l2", "lr", "initial_logit", "final_logit", "final_prob"]


@dataclass
class ClassVisualization:
    target: int
    image: Tensor  # [3, H, W] in [0, 1] (de-normalised)
    steps: int
    initial_logit: float
    final_logit: float
    final_prob: float


def visualize_class(
    model: nn.Module,
    target: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    input_size: tuple[int, int] = (224, 224),
    *,
    steps: int = 200,
    lr: float = 1.0,
    l2: float = 1e-3,
    jitter: int = 0,
    blur_sigma: float = 0.0,
    blur_every: int = 4,
    seed: int = 0,
) -> ClassVisualization:
    """Gradient ascent on logit `target`; the model is run in eval mode and left unchanged."""
    if steps < 0 or lr <= 0 or l2 < 0 or jitter < 0:
        raise MethodError("visualize: steps >= 0, lr > 0, l2 >= 0 and jitter >= 0 are required")
    p = next(model.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    m = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
    s = torch.tensor(std, device=dev).view(1, 3, 1, 1)
    lo, hi = (0.0 - m) / s, (1.0 - m) / s
    img = torch.zeros((1, 3, *input_size), device=dev)  # zero = mean colour in normalised space
    gen = torch.Generator().manual_seed(seed)
    with eval_mode(model):
        with torch.no_grad():
            logits = model(img)
        n_cls = logits.shape[1]
        if not 0 <= target < n_cls:
            raise MethodError(
                f"visualize: class {target} is out of range (the model has {n_cls} classes, 0..{n_cls - 1})"
            )
        initial = float(logits[0, target])
        for i in range(steps):
            img.requires_grad_(True)
            with torch.enable_grad():
                if jitter:
                    dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
                    inp = torch.roll(img, shifts=(dy, dx), dims=(2, 3))
                else:
                    inp = img
                objective = model(inp)[0, target] - l2 * (img * img).sum()
                (grad,) = torch.autograd.grad(objective, img)
            with torch.no_grad():
                img = img.detach() + lr * grad
                if blur_sigma > 0 and (i + 1) % blur_every == 0:
                    img = gaussian_blur(img, blur_sigma)
                img = torch.max(torch.min(img, hi), lo)
        with torch.no_grad():
            logits = model(img)
    prob = float(torch.softmax(logits.float(), dim=1)[0, target])
    shown = (img[0] * s[0] + m[0]).clamp(0, 1).detach().cpu()
    return ClassVisualization(target, shown, steps, initial, float(logits[0, target]), prob)


def write_visualization(out: Path, vis: ClassVisualization, label: str, l2: float, lr: float) -> Path:
    """OUT/visualize/class_<c>.png and one appended row of OUT/visualizations.csv; returns the PNG."""
    from ..outputs import CsvAppender, save_png

    out = Path(out)
    png = out / "visualize" / f"class_{vis.target}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    rgb = (vis.image.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    save_png(png, rgb)
    row = {
        "class": vis.target,
        "label": label,
        "steps": vis.steps,
        "l2": f"{l2:g}",
        "lr": f"{lr:g}",
        "initial_logit": f"{vis.initial_logit:.6g}",
        "final_logit": f"{vis.final_logit:.6g}",
        "final_prob": f"{vis.final_prob:.6g}",
    }
    CsvAppender(out / "visualizations.csv", CSV_FIELDS).append([row])
    return png


__all__ = ["CSV_FIELDS", "ClassVisualization", "visualize_class", "write_visualization"]
