"""Gradient family: analytic cases."""

import torch
from torch import nn

from xaicli import explain


def test_saliency_of_linear_model_is_its_weight_row():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    x = torch.randn(3, 3, 8, 8)
    target = torch.tensor([0, 2, 3])
    maps = explain(lin, x, "saliency", target=target)
    w = lin[1].weight.detach().view(4, 3, 8, 8)
    expected = w[target].abs().amax(dim=1)  # Simonyan: max over channels of |dy_c/dx|
    assert maps.shape == (3, 8, 8)
    assert torch.allclose(maps, expected, atol=1e-6)


def test_saliency_default_target_is_prediction():
    torch.manual_seed(1)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6))
    x = torch.randn(5, 3, 4, 4)
    pred = lin(x).argmax(1)
    w = lin[1].weight.detach().view(6, 3, 4, 4)
    assert torch.allclose(explain(lin, x, "saliency"), w[pred].abs().amax(1), atol=1e-6)


def test_batch_is_independent(default_model, sample_batch):
    # batched maps equal per-image maps (eval mode, no cross-talk through BatchNorm)
    both = explain(default_model, sample_batch, "saliency")
    one = explain(default_model, sample_batch[1:], "saliency")
    assert torch.allclose(both[1:], one, atol=1e-5, rtol=1e-4)
