"""Deletion / insertion / AOPC / Average Drop on a model whose relevant region is known."""

import math

import pytest
import torch

from xaicli.metrics import build_metric
from xaicli.metrics.base import auc
from xaicli.ops import gaussian_blur, normalize01

from .conftest import SIZE, oracle_map


def three_maps():
    oracle = oracle_map()
    g = torch.Generator().manual_seed(1)
    random = torch.rand(3, SIZE, SIZE, generator=g)
    return oracle, random, 1.0 - oracle


def test_auc_is_normalised_trapezoid():
    c = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 1.0, 1.0]])
    assert torch.allclose(auc(c), torch.tensor([1.0, 1 / 6, (0.25 + 0.75 + 1.0) / 3]))


@pytest.mark.parametrize("name", ["deletion", "insertion"])
def test_oracle_random_inverted_order(square_model, square_batch, name):
    x, t = square_batch
    m = build_metric(name, step=16, substrate="mean")
    aucs = [m(square_model, x, maps, t)[name].mean().item() for maps in three_maps()]
    if name == "deletion":
        assert aucs[0] < aucs[1] < aucs[2], aucs  # lower is better
        assert aucs[0] < 0.2 and aucs[2] > 0.75
    else:
        assert aucs[0] > aucs[1] > aucs[2], aucs  # higher is better


def test_aopc_morf_and_lerf_order(square_model, square_batch):
    x, t = square_batch
    morf = build_metric("aopc", patch=4, regions=None, substrate="mean")
    lerf = build_metric("aopc-lerf", patch=4, regions=None, substrate="mean")
    a_morf = [morf(square_model, x, m, t)["aopc"].mean().item() for m in three_maps()]
    a_lerf = [lerf(square_model, x, m, t)["aopc-lerf"].mean().item() for m in three_maps()]
    assert a_morf[0] > a_morf[1] > a_morf[2], a_morf
    assert a_lerf[0] < a_lerf[1] < a_lerf[2], a_lerf


def reference_deletion_curve(model, x, maps, target, step, insert=False):
    """Slow, obvious per-image per-step loop: the oracle for the batched implementation."""
    b, _, h, w = x.shape
    n = math.ceil(h * w / step)
    out = torch.zeros(b, n + 1)
    for i in range(b):
        order = torch.argsort(maps[i].flatten(), descending=True, stable=True)
        for s in range(n + 1):
            img = (torch.zeros_like(x[i]) if insert else x[i].clone()).view(3, -1)
            idx = order[: min(s * step, h * w)]
            img[:, idx] = x[i].view(3, -1)[:, idx] if insert else 0.0
            with torch.no_grad():
                p = torch.softmax(model(img.view(1, 3, h, w)), 1)[0, target[i]]
            out[i, s] = p
    return out


@pytest.mark.parametrize("insert", [False, True])
def test_batched_curve_matches_per_step_loop(tiny_cnn, insert):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, 16, generator=g)
    maps = torch.rand(2, 16, 16, generator=g)
    t = torch.tensor([1, 3])
    name = "insertion" if insert else "deletion"
    ref = reference_deletion_curve(tiny_cnn, x, maps, t, 10, insert)
    for ib in (1, 7, 64):  # chunks that mix images and steps must not matter
        got = build_metric(name, step=10, substrate="mean", internal_batch=ib)(tiny_cnn, x, maps, t)
        assert got.curves[name].y.shape == (2, math.ceil(256 / 10) + 1)
        assert torch.allclose(got.curves[name].y, ref, atol=1e-6)
        assert torch.allclose(got[name], auc(ref), atol=1e-6)


def test_step_as_fraction(square_model, square_batch):
    x, t = square_batch
    got = build_metric("deletion", step=0.25)(square_model, x, oracle_map(), t)
    assert got.curves["deletion"].y.shape == (3, 5)


def test_average_drop_ones_zero_and_zeros_largest(square_model, square_batch):
    x, t = square_batch
    m = build_metric("avg-drop")
    ones = torch.ones(3, SIZE, SIZE)
    drops = {
        k: m(square_model, x, v, t)["avg-drop"]
        for k, v in zip(("oracle", "random", "inverted"), three_maps(), strict=True)
    }
    d_ones = m(square_model, x, ones, t)["avg-drop"]
    d_zeros = m(square_model, x, torch.zeros(3, SIZE, SIZE), t)["avg-drop"]
    assert torch.allclose(d_ones, torch.zeros(3))
    for k, d in drops.items():
        assert (d_zeros >= d - 1e-6).all(), k
    assert d_zeros.mean() > drops["random"].mean() > drops["oracle"].mean()
    assert (d_zeros > 50).all()  # everything masked: the logit falls from ~2 to -2


def test_increase_and_win(square_model, square_batch):
    x, t = square_batch
    # multiplying by a [0,1] map can only darken this positive image: never an increase
    inc = build_metric("increase")
    assert inc(square_model, x, oracle_map(), t)["increase"].sum() == 0
    win = build_metric("win", against="x")
    oracle, random, inverted = three_maps()
    w = win(square_model, x, oracle, t, reference=inverted)["win"]
    assert torch.equal(w, torch.full((3,), 100.0))
    w2 = win(square_model, x, inverted, t, reference=oracle)["win"]
    assert torch.equal(w2, torch.zeros(3))


def test_normalize01_constant_and_range():
    m = torch.stack([torch.ones(4, 4), torch.zeros(4, 4), torch.arange(16.0).view(4, 4)])
    e = normalize01(m)
    assert torch.equal(e[0], torch.ones(4, 4)) and torch.equal(e[1], torch.zeros(4, 4))
    assert e[2].min() == 0 and e[2].max() == 1 and torch.isfinite(e).all()


def test_blur_preserves_constants_and_smooths():
    x = torch.full((1, 3, 20, 20), 0.7)
    assert torch.allclose(gaussian_blur(x, 5.0, 5), x, atol=1e-6)
    y = torch.zeros(1, 1, 21, 21)
    y[0, 0, 10, 10] = 1
    b = gaussian_blur(y, 5.0, 5)
    assert abs(b.sum().item() - 1) < 1e-5 and b.max() < 0.05
