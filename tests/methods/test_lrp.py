"""LRP family: conservation, agreement with Zennit used directly, canonized copies, contrastive
objectives, unsupported layers, Relevance-CAM on a collage, and LRP's perturbation curve."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SAMPLES, run_xai
from xaicli.errors import MethodError
from xaicli.hooks import count_hooks
from xaicli.methods import build_method, make_context
from xaicli.objectives import RELEVANCE

zennit = pytest.importorskip("zennit")
torchvision = pytest.importorskip("torchvision")

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def ctx_of(model, size):
    ctx = make_context(model, size)
    ctx.mean, ctx.std = IMAGENET
    return ctx


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(n, type(m), type(m).forward) for n, m in model.named_modules()],
        [(n, m.__dict__.get("forward")) for n, m in model.named_modules()],
    )


def unchanged(model, snap) -> bool:
    state, types, fwd = snapshot(model)
    return (
        state.keys() == snap[0].keys()
        and all(torch.equal(state[k], snap[0][k]) for k in state)
        and types == snap[1]
        and fwd == snap[2]
        and count_hooks(model) == 0
    )


def randomize_bn(model, seed=0):
    """Non-trivial BatchNorm statistics, so merging them is tested (fresh nets have mean 0, var 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
    return model.eval()


class BiasFreeNet(nn.Module):
    """conv -> BN (merged, bias 0 after merging) -> ReLU -> maxpool -> conv -> ReLU -> residual block
    (skip through a Sum module) -> ReLU -> avgpool -> GAP -> Linear; no biases anywhere."""

    def __init__(self):
        super().__init__()
        from zennit.layer import Sum

        g = torch.Generator().manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            nn.ReLU(),
        )
        self.res = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        )
        self.add = Sum()
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            bn = self.features[1]
            bn.weight.copy_(torch.rand(8, generator=g) + 0.5)
            bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)
            bn.running_mean.uniform_(-0.3, 0.3, generator=g)
            # merged bias = (0 - mean) * w / sqrt(var + eps) + beta = 0
            bn.bias.copy_(bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps))

    def forward(self, x):
        h = self.features(x)
        h = self.relu(self.add(torch.stack([h, self.res(h)], dim=-1)))
        return self.fc(self.gap(self.pool(h)).flatten(1))


@pytest.fixture
def net():
    return BiasFreeNet().eval()


def test_bias_free_net_has_no_bias_after_merge(net):
    copy_ = make_context(net, (16, 16)).adapter.canonized_copy()
    conv = copy_.features[0]
    assert conv.bias is not None and conv.bias.abs().max() < 1e-6  # merged, and zero by construction
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(copy_(x), net(x), atol=1e-5)


@pytest.mark.parametrize("epsilon", [0.0, 1e-9])
def test_conservation_lrp0_and_epsilon(net, epsilon):
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    bound = build_method("lrp", composite="epsilon", epsilon=epsilon, stabilizer=1e-12).bind(
        make_context(net, (16, 16))
    )
    res = bound(x)
    logit = res.logits.gather(1, res.target[:, None])[:, 0]
    total = res.maps.flatten(1).sum(1)
    assert torch.allclose(total, logit, rtol=1e-4, atol=1e-6)
    assert torch.allclose(res.extras["conservation_gap"], total - logit, atol=1e-6)
    assert count_hooks(net) == 0 and count_hooks(bound.net) == 0


def test_conservation_zplus_layer_by_layer(net):
    """z+ conserves at every cut of the network (the skip branch alone is not a cut), input included."""
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ctx = make_context(net, (16, 16))
    for layer in ["pool", "relu", "add", "features.5", "features.3", "features.2", None]:
        spec = build_method("lrp", composite="zplus", stabilizer=1e-12, layer=layer, first_rule="zplus")
        res = spec.bind(ctx)(x)
        logit = res.logits.gather(1, res.target[:, None])[:, 0]
        total = res.extras["conservation_gap"] + logit
        assert torch.allclose(total, logit, rtol=1e-4, atol=1e-6), layer
        if layer is not None:  # the map is that layer's relevance summed over channels (upsampled)
            assert res.maps.shape == (4, 16, 16)


def test_contrastive_initial_relevance():
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5], [0.0, 3.0, 1.0, 1.0]])
    tgt = torch.tensor([0, 2])
    c = RELEVANCE["clrp"](logits, tgt)
    assert torch.allclose(c[0], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    assert torch.allclose(c.sum(1), torch.zeros(2), atol=1e-7)
    s = RELEVANCE["sglrp"](logits, tgt)
    y = torch.softmax(logits, 1)
    yt = y[torch.arange(2), tgt]
    assert torch.allclose(s[1, 2], yt[1] * (1 - yt[1]))
    assert torch.allclose(s[1, 0], -yt[1] * y[1, 0])
    assert torch.allclose(s.sum(1), torch.zeros(2), atol=1e-7)
    l = RELEVANCE["logit"](logits, tgt)
    assert l[0, 0] == 2.0 and l[1, 2] == 1.0 and l.abs().sum() == 3.0


@pytest.mark.parametrize("method", ["clrp", "sglrp"])
def test_contrastive_maps_sum_to_zero_and_differ_from_lrp(net, method):
    # the net is bias-free ReLU, so logits scale with x: small inputs keep the softmax unsaturated
    x = 0.01 * torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    ctx = make_context(net, (16, 16))
    res = build_method(method, composite="epsilon", epsilon=1e-9, stabilizer=1e-12).bind(ctx)(x)
    assert res.maps.abs().amax() > 0
    assert res.maps.flatten(1).sum(1).abs().max() < 1e-4 * res.maps.abs().amax()
    assert res.extras["conservation_gap"].abs().max() < 1e-5
    plain = build_method("lrp", composite="epsilon").bind(ctx)(x).maps
    assert not torch.allclose(plain / plain.abs().amax(), res.maps / res.maps.abs().amax(), atol=1e-2)


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(MethodError, match=r"layer '1' \(GELU\)"):
        build_method("lrp").bind(make_context(model, (16, 16)))
    bn_first = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    randomize_bn(bn_first)
    with pytest.raises(MethodError, match=r"layer '0' \(BatchNorm2d"):
        build_method("relevance_cam", layer="1").bind(make_context(bn_first, (16, 16)))


def test_uncanonized_residual_block_is_refused():
    class Block(nn.Module):  # an unknown block: its forward may add tensors outside a Sum module
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), Block(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    with pytest.raises(MethodError, match=r"layer '1' \(Block\)"):
        build_method("lrp").bind(make_context(model, (16, 16)))


def zennit_reference(model, x, canonizer):
    """Zennit used directly (its own canonizer on the model itself, reverted afterwards)."""
    from zennit.composites import EpsilonGammaBox

    mean = torch.tensor(IMAGENET[0]).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)
    comp = EpsilonGammaBox(low=(0 - mean) / std, high=(1 - mean) / std, canonizers=[canonizer])
    xx = x.clone().requires_grad_(True)
    with comp.context(model) as m:
        out = m(xx)
        init = torch.zeros_like(out).scatter_(1, out.argmax(1)[:, None], 1.0) * out
        (g,) = torch.autograd.grad(out, xx, init)
    return g.sum(1)


def check_zennit_agreement(model, canonizer, size):
    from scipy.stats import spearmanr

    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    snap = snapshot(model)
    ours = build_method("lrp").bind(ctx_of(model, (size, size)))(x).maps
    assert unchanged(model, snap)
    ref = zennit_reference(model, x, canonizer)
    for i in range(x.shape[0]):
        rho = spearmanr(ours[i].flatten().numpy(), ref[i].flatten().numpy())[0]
        assert rho >= 0.99, (i, rho)


@pytest.mark.slow
def test_zennit_agreement_resnet18():
    from zennit.torchvision import ResNetCanonizer

    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10))
    check_zennit_agreement(model, ResNetCanonizer(), 64)


@pytest.mark.slow
def test_zennit_agreement_vgg16():
    from zennit.torchvision import VGGCanonizer

    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None, num_classes=10).eval()
    check_zennit_agreement(model, VGGCanonizer(), 64)


def check_canonized_copy(model, size):
    snap = snapshot(model)
    net = make_context(model, (size, size)).adapter.canonized_copy()
    assert net is not model
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a, b = model(x), net(x)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    assert unchanged(model, snap)
    return net


def test_canonized_copy_resnet18():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10))
    net = check_canonized_copy(model, 64)
    assert hasattr(net.layer1[0], "canonizer_sum") and not hasattr(model.layer1[0], "canonizer_sum")
    bn = net.layer1[0].bn1
    assert torch.all(bn.running_var == 1) and torch.all(bn.bias == 0)  # merged into conv1


@pytest.mark.slow
def test_resnet50_bottlenecks_canonized_and_zennit_agreement():
    """ResNet-50 (Bottleneck blocks): the canonized copy gives the model's logits, and lrp agrees with
    Zennit used directly."""
    from zennit.torchvision import ResNetCanonizer

    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet50(weights=None, num_classes=10))
    net = check_canonized_copy(model, 64)
    assert hasattr(net.layer1[0], "canonizer_sum")
    check_zennit_agreement(model, ResNetCanonizer(), 64)


@pytest.mark.slow
def test_canonized_copy_vgg16_bn():
    torch.manual_seed(0)
    check_canonized_copy(randomize_bn(torchvision.models.vgg16_bn(weights=None, num_classes=10)), 64)


@pytest.mark.slow
def test_canonized_copy_default_model(default_model):
    from timm.layers import BatchNormAct2d

    net = check_canonized_copy(default_model.model, 224)
    assert not any(isinstance(m, BatchNormAct2d) for m in net.modules())
    assert sum(hasattr(m, "canonizer_sum") for m in net.modules()) > 0
    assert make_context(default_model).adapter.lrp_unsupported(net) == []


@pytest.mark.slow
def test_default_model_conservation_without_biases(default_model):
    """The timm canonizers (BatchNormAct merged, skips as Sum) conserve relevance exactly once
    the biases are zero: what the real model loses goes to its biases (zennit #183)."""
    model = copy.deepcopy(default_model.model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.copy_(m.running_mean * m.weight / torch.sqrt(m.running_var + m.eps))
        model.get_classifier().bias.zero_()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(7))
    res = build_method("lrp", composite="epsilon", epsilon=1e-9, stabilizer=1e-12).bind(make_context(model, (96, 96)))(
        x
    )
    logit = res.logits.gather(1, res.target[:, None])[:, 0]
    assert torch.allclose(res.maps.flatten(1).sum(1), logit, rtol=1e-4, atol=1e-6)


def collage(pre):
    from xaicli.data import load_image

    a, b = (pre(load_image(SAMPLES / n)) for n in ("chelsea.png", "coffee.png"))
    h, w = a.shape[-2:]
    halves = [F.interpolate(t[None], size=(h, w // 2), mode="bilinear", align_corners=False)[0] for t in (a, b)]
    return torch.cat(halves, dim=2)[None], a, b


@pytest.mark.slow
def test_relevance_cam_beats_gradcam_on_a_collage_at_a_shallow_layer(default_model):
    x, cat, coffee = collage(default_model.preprocess)
    w = x.shape[-1]
    with torch.no_grad():
        classes = [int(default_model.model(t[None]).argmax()) for t in (cat, coffee)]
    ctx = make_context(default_model)
    layer = "blocks.3"  # the middle of EfficientNet-Lite0
    share = {}
    for method in ("relevance_cam", "gradcam"):
        bound = build_method(method, layer=layer).bind(ctx)
        for half, c in enumerate(classes):
            m = bound(x, torch.tensor([c])).maps[0].clamp_min(0)
            part = m[:, : w // 2] if half == 0 else m[:, w // 2 :]
            share[method, half] = float(part.sum() / m.sum().clamp_min(1e-12))
    for half in (0, 1):
        assert share["relevance_cam", half] > share["gradcam", half], share
        assert share["relevance_cam", half] > 0.6, share


def test_relevance_cam_layer_and_relu(net):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    ctx = make_context(net, (16, 16))
    bound = build_method("relevance_cam", layer="features.5", relu=False).bind(ctx)
    assert bound.resolved() == {"layer": "features.5"}
    res = bound(x)
    # by hand: relevance at the layer from the same propagation, weights = its spatial sum
    rel, acts, *_ = bound.propagate(x, res.target)
    cam = torch.einsum("bk,bkhw->bhw", rel.sum((2, 3)), acts)
    assert torch.allclose(res.maps, F.interpolate(cam[:, None], size=(16, 16), mode="bilinear")[:, 0], atol=1e-6)
    assert (res.maps < 0).any()  # relu=False keeps the sign
    relu = build_method("relevance_cam", layer="features.5").bind(ctx)(x).maps
    assert (relu >= 0).all()


@pytest.mark.slow
def test_lrp_morf_aopc_above_saliency(default_model):
    """The source write-up's claim: LRP's most-relevant-first perturbation curve falls faster than
    the vanilla gradient's (a higher AOPC), on the sample images with the default model."""
    from xaicli.data import load_image
    from xaicli.metrics import build_metric

    x = torch.stack([default_model.preprocess(load_image(p)) for p in sorted(SAMPLES.glob("*.png"))])
    ctx = make_context(default_model)
    target = build_method("saliency").bind(ctx)(x).target
    metric = build_metric("aopc", patch=16, regions=60, per_step=6)
    scores = {}
    for method in ("lrp", "saliency"):
        maps = build_method(method).bind(ctx)(x, target).maps
        scores[method] = metric(ctx, x, maps, target).scores["aopc"].mean().item()
    assert scores["lrp"] > scores["saliency"], scores


@pytest.mark.slow
def test_cli_lrp_methods_default_and_torchvision(tmp_path):
    import shutil

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for n in ("chelsea.png", "coffee.png"):
        shutil.copy(SAMPLES / n, imgs / n)
    for extra in ([], ["--model", "torchvision:resnet18", "--weights", "none"]):
        out = tmp_path / ("out" + str(len(extra)))
        r = run_xai("explain", "--method", "lrp,clrp,relevance_cam", imgs, "--out", out, "-q", *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        rows = (out / "explanations.csv").read_text().splitlines()
        assert "conservation_gap" in rows[0]
        assert len(rows) == 1 + 3 * 2
        assert all((out / m / "chelsea.npy").exists() for m in ("lrp", "clrp", "relevance_cam"))


def test_lrp_config_validates():
    from conftest import ROOT
    from xaicli.config import build_config

    specs = dict(build_config(ROOT / "configs" / "lrp.yaml").specs())
    assert {s.composite for s in specs.values()} >= {
        "epsilon_gamma_box",
        "epsilon_plus_flat",
        "epsilon_alpha2_beta1_flat",
    }
    assert specs["relevance_cam"].layer == "blocks.3" and specs["clrp"].objective == "clrp"


def test_bad_parameters_are_refused():
    with pytest.raises(MethodError, match="alpha - beta = 1"):
        build_method("lrp", alpha=3.0, beta=1.0)
    with pytest.raises(MethodError):
        build_method("lrp", composite="nope")
