"""CAM family: analytic cases and behaviour on the default model."""

import torch

from conftest import TinyCNN
from xaicli import explain
from xaicli.methods import build_method


def cam_reference(model: TinyCNN, x, target):
    """Zhou 2016: M = sum_k w_k^c A^k (bias ignored), ReLU and bilinear upsampling for comparison."""
    a = model.features(x)
    w = model.fc.weight[target]  # [B, K]
    m = torch.relu(torch.einsum("bk,bkhw->bhw", w, a))
    return torch.nn.functional.interpolate(m[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def test_gradcam_equals_cam_up_to_positive_scale(tiny_cnn):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    target = torch.tensor([0, 1, 2, 3])
    g = explain(tiny_cnn, x, "gradcam", target=target, layer="features")
    with torch.no_grad():
        c = cam_reference(tiny_cnn, x, target)
    # GAP + FC: dy/dA_ij = w_k / Z, so Grad-CAM = CAM / Z exactly
    z = 8 * 8
    assert torch.allclose(g * z, c, atol=1e-5, rtol=1e-4)
    assert (c > 0).any()


def test_gradcam_auto_layer_on_tiny_cnn(tiny_cnn):
    m = build_method("gradcam")
    m.prepare(tiny_cnn, (16, 16))
    assert m.layer == "features"


def test_counterfactual_is_the_negative_gradient(tiny_cnn):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([1, 4])
    cf = explain(tiny_cnn, x, "gradcam", target=t, layer="features", counterfactual=True)
    with torch.no_grad():
        a = tiny_cnn.features(x)
        w = -tiny_cnn.fc.weight[t] / 64
        ref = torch.relu(torch.einsum("bk,bkhw->bhw", w, a))
        ref = torch.nn.functional.interpolate(ref[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(cf, ref, atol=1e-6)


def test_gradcam_on_default_model_peaks_on_cat_face(default_model, sample_batch):
    maps = explain(default_model, sample_batch[:1], "gradcam")
    assert maps.shape == (1, 224, 224) and torch.isfinite(maps).all() and maps.min() >= 0
    # the cat's face fills the middle of the crop; the peak must not be on the border
    iy, ix = divmod(int(maps[0].argmax()), 224)
    assert 40 < iy < 200 and 40 < ix < 200


def test_user_model_is_not_modified(default_model, sample_batch):
    net = default_model.model
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    try:
        explain(default_model, sample_batch[:1], "gradcam")
        assert net.training  # mode restored
    finally:
        net.eval()
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats untouched: ran in eval mode
