"""Synthetic models with a known relevant region, for metric oracles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

SIZE = 32
SQUARE = (slice(4, 12), slice(16, 24))  # rows 4..11, cols 16..23: the only pixels the model reads


class SquareModel(nn.Module):
    """logit_0 = 4 * mean(x inside SQUARE, all channels) - 2; logit_1 = 0."""

    def forward(self, x):
        inside = x[:, :, SQUARE[0], SQUARE[1]].mean(dim=(1, 2, 3))
        return torch.stack([4 * inside - 2, torch.zeros_like(inside)], dim=1)


def oracle_map(b: int = 3) -> torch.Tensor:
    m = torch.zeros(b, SIZE, SIZE)
    m[:, SQUARE[0], SQUARE[1]] = 1.0
    return m


@pytest.fixture
def square_model():
    return SquareModel().eval()


@pytest.fixture
def square_batch():
    g = torch.Generator().manual_seed(0)
    x = 0.5 + torch.rand(3, 3, SIZE, SIZE, generator=g)  # positive: removing pixels lowers the logit
    target = torch.zeros(3, dtype=torch.long)
    return x, target
