"""Shared fixtures: tiny deterministic models for analytic checks, the default model, sample images,
and a helper that runs the `xai` CLI in a subprocess (the code of this checkout)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_images"
SAMPLE_FILES = sorted(p.name for p in SAMPLES.iterdir() if p.suffix.lower() in (".png", ".jpg"))


class TinyCNN(nn.Module):
    """conv -> ReLU(inplace) -> conv -> ReLU(inplace) -> GAP -> linear: CAM is defined exactly."""

    def __init__(self, classes: int = 5, width: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, stride=2),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def bind(spec, model, input_size=None, **ctx):
    """A method spec bound to `model` (an nn.Module or a LoadedModel), as the engine binds it."""
    from xaicli.methods import make_context

    return spec.bind(make_context(model, input_size, **ctx))


@pytest.fixture
def tiny_cnn():
    return TinyCNN().eval()


@pytest.fixture(scope="session")
def default_model():
    from xaicli import load_model

    return load_model("default")


@pytest.fixture(scope="session")
def sample_batch(default_model):
    """Preprocessed chelsea + coffee, [2, 3, 224, 224]."""
    from xaicli.data import load_image

    xs = [default_model.preprocess(load_image(SAMPLES / n)) for n in ("chelsea.png", "coffee.png")]
    return torch.stack(xs)


@pytest.fixture
def samples_copy(tmp_path) -> Path:
    d = tmp_path / "imgs"
    shutil.copytree(SAMPLES, d)
    return d


def run_xai(*args, cwd=None, timeout=600, env=None) -> subprocess.CompletedProcess:
    """Run `python -m xaicli ARGS` with this checkout first on the path."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("COLUMNS", "160")
    if env:
        e.update(env)
    return subprocess.run(
        [sys.executable, "-m", "xaicli", *map(str, args)],
        cwd=cwd or ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
