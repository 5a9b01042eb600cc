"""Gradient family: analytic cases."""

import pytest
import torch
from torch import nn

from conftest import SAMPLES, bind
from xaicli import explain
from xaicli.errors import MethodError
from xaicli.hooks import count_hooks
from xaicli.methods import build_method
from xaicli.methods.gradient import quadrature


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


# --- Input x Gradient ------------------------------------------------------------------------
def test_inputxgrad_of_linear_model_is_channel_sum_of_x_times_w():
    torch.manual_seed(2)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    x = torch.randn(2, 3, 6, 6)
    t = torch.tensor([1, 3])
    w = lin[1].weight.detach().view(4, 3, 6, 6)
    expected = (x * w[t]).sum(1)  # signed, channels summed
    assert torch.allclose(explain(lin, x, "inputxgrad", target=t), expected, atol=1e-6)


# --- Guided Backprop -------------------------------------------------------------------------
class TwoLayer(nn.Module):
    """y = V relu(W x): the guided gradient is W^T (1[Wx>0] 1[V_c>0] V_c), computable by hand."""

    def __init__(self, act: nn.Module):
        super().__init__()
        torch.manual_seed(3)
        self.w = nn.Linear(12, 10, bias=False)
        self.act = act
        self.v = nn.Linear(10, 3, bias=False)

    def forward(self, x):
        return self.v(self.act(self.w(x.flatten(1))))


@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU(inplace=True), nn.ReLU6(), nn.ReLU6(inplace=True)])
def test_guided_backprop_rule_by_hand(act):
    net = TwoLayer(act).eval()
    x = torch.randn(4, 3, 2, 2) * 3
    t = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        pre = net.w(x.flatten(1))
    hi = 6.0 if isinstance(act, nn.ReLU6) else float("inf")
    r_out = net.v.weight[t]  # [B, 10] gradient arriving at the rectifier's output
    r_in = ((pre > 0) & (pre < hi)).float() * (r_out > 0).float() * r_out
    gbp = (r_in @ net.w.weight).view(4, 3, 2, 2)
    expected = gbp.abs().amax(1)
    got = explain(net, x, "guided_backprop", target=t)
    assert torch.allclose(got, expected, atol=1e-6)
    # and it differs from the plain gradient (the gate matters)
    assert not torch.allclose(explain(net, x, "saliency", target=t), expected, atol=1e-3)
    assert count_hooks(net) == 0


def test_guided_backprop_leaves_model_unchanged(default_model, sample_batch):
    net = default_model.model
    x = sample_batch[:1]
    acts = [m for m in net.modules() if isinstance(m, nn.ReLU6)]
    inplace = [m.inplace for m in acts]
    with torch.no_grad():
        before = net(x)
    sal_before = explain(default_model, x, "saliency")
    explain(default_model, x, "guided_backprop")
    assert count_hooks(net) == 0
    with torch.no_grad():
        assert torch.equal(net(x), before)
    assert torch.allclose(explain(default_model, x, "saliency"), sal_before)  # backward is plain again
    assert [m.inplace for m in acts] == inplace and all(type(m) is nn.ReLU6 for m in acts)
    # an exception inside the guided pass (bad target) also leaves no hook and a plain backward
    with pytest.raises(MethodError, match="out of range"):
        explain(default_model, x, "guided_backprop", target=5000)
    assert count_hooks(net) == 0
    assert torch.allclose(explain(default_model, x, "saliency"), sal_before)


def test_guided_backprop_without_relu_modules_is_an_error():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.GELU(), nn.Linear(5, 2))
    with pytest.raises(MethodError, match="ReLU"):
        explain(net, torch.randn(1, 3, 2, 2), "guided_backprop")
    assert count_hooks(net) == 0


# --- Integrated Gradients --------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["gausslegendre", "trapezoid", "riemann"])
def test_quadrature_weights_sum_to_one(rule):
    a, w = quadrature(7, rule)
    assert torch.isclose(w.sum(), torch.tensor(1.0), atol=1e-6)
    assert (a >= 0).all() and (a <= 1).all()
    # exact for a quadratic integrand where the rule should be: int_0^1 a^2 da = 1/3
    if rule == "gausslegendre":
        assert torch.isclose((w * a**2).sum(), torch.tensor(1 / 3), atol=1e-6)


def test_ig_of_linear_model_is_exact():
    torch.manual_seed(4)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([2, 0])
    m = build_method("integrated_gradients", baseline="mean", n_steps=3, internal_batch=4)
    out = bind(m, lin, (4, 4))(x, t)
    w = lin[1].weight.detach().view(3, 3, 4, 4)
    assert torch.allclose(out.maps, (x * w[t]).sum(1), atol=1e-5)  # (x - 0) * w, channels summed
    assert out.extras["delta"].abs().max() < 1e-4


def smooth_net():
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.Softplus(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 4)
    ).eval()


@pytest.mark.parametrize("internal_batch", [1, 5, 1000])
def test_ig_chunking_does_not_change_the_result(internal_batch):
    net = smooth_net()
    x = torch.randn(3, 3, 8, 8)
    ref = bind(build_method("integrated_gradients", baseline="mean", n_steps=8, internal_batch=24), net)(x)
    got = bind(build_method("integrated_gradients", baseline="mean", n_steps=8, internal_batch=internal_batch), net)(x)
    assert torch.allclose(got.maps, ref.maps, atol=1e-5)
    # Gauss-Legendre on a smooth path: the completeness gap is tiny already at 8 steps
    assert got.extras["delta"].abs().max() < 1e-3


def test_ig_black_baseline_is_black_in_pixel_space(default_model, sample_batch):
    m = build_method("integrated_gradients", baseline="black")
    with pytest.raises(MethodError, match="mean"):  # a bare nn.Module: normalisation unknown
        bind(m, default_model.model)
    base = bind(m, default_model).baseline(sample_batch)
    assert torch.allclose(default_model.preprocess.denormalize(base), torch.zeros_like(base), atol=1e-6)
    assert not torch.allclose(base, torch.zeros_like(base))  # zero in normalised space is the mean colour
    img = build_method("integrated_gradients", baseline=str(SAMPLES / "coffee.png"))
    assert torch.allclose(bind(img, default_model).baseline(sample_batch)[0], sample_batch[1], atol=1e-6)


def test_ig_completeness_on_default_model(default_model, sample_batch):
    """|sum IG - (F(x) - F(x'))| <= 1% of |F(x) - F(x')|, 64 Gauss-Legendre steps, chelsea.

    Measured (logit score, 64 steps): uniform baseline 0.64%; black 18% (the path function
    jumps from -0.7 to 8.6 within the first 5% of the path; Captum gives the same gap; 256
    steps bring it to 0.8%). The test uses the uniform-noise baseline."""
    x = sample_batch[:1]
    m = build_method("integrated_gradients", baseline="uniform", n_steps=64, internal_batch=64)
    bound = bind(m, default_model)
    out = bound(x)
    base = bound.baseline(x)
    with torch.no_grad():
        t = default_model.model(x).argmax(1)
        gap = default_model.model(x)[0, t] - default_model.model(base)[0, t]
    total = out.maps.sum()
    assert torch.isclose(out.extras["delta"][0], total - gap[0], atol=1e-3)  # delta is signed, as documented
    assert abs(float(total - gap[0])) <= 0.01 * abs(float(gap[0]))


# --- SmoothGrad ------------------------------------------------------------------------------
def test_smoothgrad_without_noise_is_the_base_method():
    net = smooth_net()
    x = torch.randn(2, 3, 8, 8)
    for base in ("saliency", "inputxgrad"):
        sg = explain(net, x, "smoothgrad", base=base, noise_level=0.0, n_samples=3, internal_batch=4)
        assert torch.allclose(sg, explain(net, x, base), atol=1e-6)
    sq = explain(net, x, "smoothgrad", base="saliency", noise_level=0.0, n_samples=3, squared=True)
    assert torch.allclose(sq, explain(net, x, "saliency") ** 2, atol=1e-6)


def test_smoothgrad_averages_noisy_maps_and_is_chunk_independent():
    net = smooth_net()
    x = torch.randn(2, 3, 8, 8)
    a = explain(net, x, "smoothgrad", n_samples=6, internal_batch=12, noise_level=0.2)
    b = explain(net, x, "smoothgrad", n_samples=6, internal_batch=12, noise_level=0.2)
    assert torch.equal(a, b)  # seeded
    assert not torch.allclose(a, explain(net, x, "saliency"), atol=1e-4)  # noise changes the map
    # noise sigma = level * (max - min) of each image; one image alone gives its own map
    one = explain(net, x[:1], "smoothgrad", n_samples=6, internal_batch=12, noise_level=0.2)
    assert one.shape == (1, 8, 8) and torch.isfinite(one).all()


def test_smoothgrad_over_ig_runs_with_base_params(default_model, sample_batch):
    m = explain(
        default_model,
        sample_batch[:1],
        "smoothgrad",
        base="integrated_gradients",
        n_samples=2,
        base_params={"n_steps": 2, "baseline": "black"},
    )
    assert m.shape == (1, 224, 224) and torch.isfinite(m).all()


def test_bad_parameters_are_method_errors():
    with pytest.raises(MethodError, match="baseline"):
        build_method("integrated_gradients", baseline="nope")
    with pytest.raises(MethodError, match="method"):
        build_method("integrated_gradients", method="simpson")
    with pytest.raises(MethodError):
        build_method("smoothgrad", base="gradcam")
