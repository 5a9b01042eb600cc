"""Cross-checks against peers (captum, pytorch-grad-cam) on the default model and sample images.

Conventions are matched before comparing (definitions.md pitfalls): Captum Saliency/IxG/GBP
return per-channel maps (we reduce them the way our method does); Captum LayerGradCam needs
relu_attributions=True and bilinear interpolation; pytorch-grad-cam upsamples with cv2 and
min-max normalises each map (Spearman is invariant to that). Peers get a deepcopy of the model
(they may swap modules or call model.eval()). Agreement: Spearman rho >= 0.99 on flattened maps.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from conftest import bind
from xaicli import explain

pytestmark = pytest.mark.slow

RHO = 0.99


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def per_image(ours, theirs) -> list[float]:
    return [spearman(ours[i], theirs[i]) for i in range(len(ours))]


@pytest.fixture(scope="module")
def setup(default_model, sample_batch):
    net = default_model.model
    with torch.no_grad():
        target = net(sample_batch).argmax(1)
    return default_model, sample_batch, target


def peer_copy(net: nn.Module) -> nn.Module:
    return copy.deepcopy(net).eval()


def test_saliency_vs_captum(setup):
    captum_attr = pytest.importorskip("captum.attr")
    lm, x, t = setup
    theirs = captum_attr.Saliency(peer_copy(lm.model)).attribute(x, target=t, abs=True).amax(1)
    rho = per_image(explain(lm, x, "saliency", target=t), theirs)
    print("saliency vs captum", rho)
    assert min(rho) >= RHO


def test_inputxgrad_vs_captum(setup):
    captum_attr = pytest.importorskip("captum.attr")
    lm, x, t = setup
    theirs = captum_attr.InputXGradient(peer_copy(lm.model)).attribute(x, target=t).sum(1)
    rho = per_image(explain(lm, x, "inputxgrad", target=t), theirs)
    print("inputxgrad vs captum", rho)
    assert min(rho) >= RHO


def _relu6_as_relu_then_clamp(net: nn.Module) -> nn.Module:
    """Peers only guide nn.ReLU; ReLU6 == ReLU followed by min(., 6), whose backward is 1[x<6].

    Guided ReLU then clamp gives 1[0<x<6] 1[R>0] R, our rule for ReLU6."""
    for name, child in net.named_children():
        if isinstance(child, nn.ReLU6):
            setattr(net, name, nn.Sequential(nn.ReLU(), nn.Hardtanh(-1.0, 6.0)))
        else:
            _relu6_as_relu_then_clamp(child)
    return net


def test_guided_backprop_vs_captum(setup):
    captum_attr = pytest.importorskip("captum.attr")
    lm, x, t = setup
    peer = _relu6_as_relu_then_clamp(peer_copy(lm.model))
    theirs = captum_attr.GuidedBackprop(peer).attribute(x, target=t).abs().amax(1)
    rho = per_image(explain(lm, x, "guided_backprop", target=t), theirs)
    print("guided_backprop vs captum", rho)
    assert min(rho) >= RHO
    # the check discriminates: the plain gradient is far from guided backprop (measured 0.23, 0.10)
    assert max(per_image(explain(lm, x, "saliency", target=t), theirs)) < 0.6


def test_gradcam_vs_captum(setup):
    captum_attr = pytest.importorskip("captum.attr")
    lm, x, t = setup
    peer = peer_copy(lm.model)
    lgc = captum_attr.LayerGradCam(peer, peer.bn2)
    a = lgc.attribute(x, target=t, relu_attributions=True)
    theirs = captum_attr.LayerAttribution.interpolate(a, x.shape[-2:], interpolate_mode="bilinear")[:, 0]
    rho = per_image(explain(lm, x, "gradcam", target=t, layer="bn2"), theirs)
    print("gradcam vs captum", rho)
    assert min(rho) >= RHO


def _grad_cam_peer(cls_name: str, net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> np.ndarray:
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    peer = peer_copy(net)
    with getattr(pgc, cls_name)(model=peer, target_layers=[peer.bn2]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])


@pytest.mark.parametrize("ours, theirs_cls", [("gradcam", "GradCAM"), ("gradcampp", "GradCAMPlusPlus")])
def test_cam_vs_pytorch_grad_cam(setup, ours, theirs_cls):
    lm, x, t = setup
    theirs = _grad_cam_peer(theirs_cls, lm.model, x, t)
    rho = per_image(explain(lm, x, ours, target=t, layer="bn2"), theirs)
    print(f"{ours} vs pytorch-grad-cam", rho)
    assert min(rho) >= RHO


def test_integrated_gradients_vs_captum(setup):
    captum_attr = pytest.importorskip("captum.attr")
    from xaicli.methods import build_method

    lm, x, t = setup
    x, t = x[:1], t[:1]
    ig = build_method("integrated_gradients", baseline="black", n_steps=16, internal_batch=16)
    bound = bind(ig, lm)
    base = bound.baseline(x)
    theirs, delta = captum_attr.IntegratedGradients(peer_copy(lm.model)).attribute(
        x, base, target=t, n_steps=16, method="gausslegendre", internal_batch_size=16, return_convergence_delta=True
    )
    out = bound(x, t)
    rho = per_image(out.maps, theirs.sum(1))
    print("integrated_gradients vs captum", rho, "delta", out.extras["delta"], delta)
    assert min(rho) >= RHO
    # same completeness gap (signed: sum IG - (F(x) - F(x')), Captum's convention)
    assert torch.allclose(out.extras["delta"], delta.float(), rtol=1e-2, atol=1e-3)


def test_gradcampp_alpha_eps_matches_pytorch_grad_cam(setup):
    """alpha_eps=1e-6 is pytorch-grad-cam's alpha (its eps in the denominator): the maps agree
    at least as well as with equation 19."""
    lm, x, t = setup
    theirs = _grad_cam_peer("GradCAMPlusPlus", lm.model, x, t)
    eps = per_image(explain(lm, x, "gradcampp", target=t, layer="bn2", alpha_eps=1e-6), theirs)
    eq19 = per_image(explain(lm, x, "gradcampp", target=t, layer="bn2"), theirs)
    print("gradcampp alpha_eps=1e-6 vs pytorch-grad-cam", eps, "eq. 19", eq19)
    assert min(eps) >= 0.99999 and min(eps) >= min(eq19)
