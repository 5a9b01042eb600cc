"""Hooks live in one module, are always removed, and work with in-place activations."""

import pytest
import torch
from torch import nn

from xaicli import explain
from xaicli.hooks import capture, count_hooks


def test_no_hooks_left_after_runs(default_model, sample_batch):
    assert count_hooks(default_model.model) == 0
    explain(default_model, sample_batch[:1], "gradcam")
    explain(default_model, sample_batch[:1], "saliency")
    assert count_hooks(default_model.model) == 0


def test_hooks_removed_after_exception(tiny_cnn):
    with pytest.raises(RuntimeError, match="boom"):
        with capture(tiny_cnn, "features.0"):
            assert count_hooks(tiny_cnn) == 1
            raise RuntimeError("boom")
    assert count_hooks(tiny_cnn) == 0

    # an error inside a method (bad target) also leaves no hook behind
    with pytest.raises(Exception, match="out of range"):
        explain(tiny_cnn, torch.randn(1, 3, 16, 16), "gradcam", target=99, layer="features.0")
    assert count_hooks(tiny_cnn) == 0


def test_inplace_activation_after_layer():
    # conv -> ReLU(inplace): capturing the conv output must give the pre-ReLU activation
    # and a valid gradient (no "modified by an inplace operation" error)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    with capture(net, "0") as cap:
        out = net(x)
    assert (cap.activation < 0).any()  # not overwritten by the in-place ReLU
    assert torch.allclose(cap.activation, net[0](x))
    maps = explain(net, x, "gradcam", layer="0")
    assert torch.isfinite(maps).all() and maps.shape == (2, 8, 8)
    assert out.shape == (2, 2)
