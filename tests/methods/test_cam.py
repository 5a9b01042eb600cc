"""CAM family: analytic cases and behaviour on the default model."""

import pytest
import torch
from torch import nn

from conftest import TinyCNN, bind
from xaicli import explain
from xaicli.errors import MethodError
from xaicli.hooks import count_hooks
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
    m = bind(build_method("gradcam"), tiny_cnn, (16, 16))
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


# --- CAM (Zhou 2016) ---------------------------------------------------------------------------
def test_cam_is_fc_weights_times_maps(tiny_cnn):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([4, 0, 2])
    got = explain(tiny_cnn, x, "cam", target=t)
    with torch.no_grad():
        ref = cam_reference(tiny_cnn, x, t)
    assert torch.allclose(got, ref, atol=1e-5)
    # CAM == Grad-CAM up to the positive scale Z (GAP + one Linear)
    g = explain(tiny_cnn, x, "gradcam", target=t, layer="features")
    assert torch.allclose(got, g * 64, atol=1e-4, rtol=1e-4)


def test_cam_on_default_model_equals_gradcam_up_to_scale(default_model, sample_batch):
    cam = explain(default_model, sample_batch, "cam")
    g = explain(default_model, sample_batch, "gradcam")
    assert cam.max() > 0
    assert torch.allclose(cam, g * 49, rtol=1e-3, atol=1e-3 * float(cam.max()))  # 7 x 7 positions at bn2


class MLPHead(nn.Module):
    """conv -> flatten -> Linear -> ReLU -> Linear (a VGG-style head): not a CAM network."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.classifier(self.features(x))


class GAPTwoLinear(TinyCNN):
    """conv -> GAP -> Linear -> Linear: the head reads GAP, but two layers deep."""

    def __init__(self):
        super().__init__(classes=8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(super().forward(x))


@pytest.mark.parametrize("net", [MLPHead(), GAPTwoLinear()])
def test_cam_on_non_gap_head_is_an_error_naming_gradcam(net):
    with pytest.raises(MethodError, match="gradcam"):
        explain(net.eval(), torch.randn(1, 3, 16, 16), "cam")
    assert count_hooks(net) == 0
    assert explain(net.eval(), torch.randn(1, 3, 16, 16), "gradcam").shape == (1, 16, 16)


# --- Grad-CAM++ by hand ------------------------------------------------------------------------
class Toy(nn.Module):
    """x [B,1,2,2] -> feat (A = x) -> per-position linear score S_c = sum_ij V_c,ij A_ij."""

    def __init__(self, v: torch.Tensor):
        super().__init__()
        self.feat = nn.Identity()
        self.fc = nn.Linear(4, v.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(v.reshape(v.shape[0], 4))

    def forward(self, x):
        return self.fc(self.feat(x).flatten(1))


def test_gradcampp_hand_computed():
    # A = [[1, 2], [0, 3]] (sum 6); g = dS/dA = V_c.
    # class 0: g = [[0.5, -0.25], [-1/3, 1]]
    #   alpha = g^2 / (2 g^2 + 6 g^3) = 1 / (2 + 6 g): 0.2, 2, (2 + 6(-1/3) = 0 -> guard: 0), 0.125
    #   w = sum alpha relu(g) = 0.2 * 0.5 + 0.125 * 1 = 0.225;  L = ReLU(w A) = 0.225 A
    # class 1: g = [[0, 0], [0, 2]] -> alpha = 0 where g = 0, 1 / (2 + 12) = 1/14 -> w = 2/14 = 1/7
    v = torch.tensor([[[0.5, -0.25], [-1 / 3, 1.0]], [[0.0, 0.0], [0.0, 2.0]]])
    net = Toy(v).eval()
    a = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    x = a.view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    got = explain(net, x, "gradcampp", target=torch.tensor([0, 1]), layer="feat")
    assert torch.isfinite(got).all()
    assert torch.allclose(got[0], 0.225 * a, atol=1e-6)
    assert torch.allclose(got[1], a / 7, atol=1e-6)
    # Grad-CAM on the same toy: w = mean(g) = (0.5 - 0.25 - 1/3 + 1) / 4
    gc = explain(net, x[:1], "gradcam", target=torch.tensor([0]), layer="feat")
    assert torch.allclose(gc[0], (0.5 - 0.25 - 1 / 3 + 1) / 4 * a, atol=1e-6)


def test_gradcampp_alpha_eps_hand_computed():
    # A = [[1, 2], [0, 3]] (sum 6); g = [[0.5, 1e-4], [0, 0]]: one tiny gradient
    # eq. 19 (alpha_eps 0): alpha = 1 / (2 + 6 g): 1/5 and 1/2.0006 -> w = 0.5/5 + 1e-4/2.0006
    # alpha_eps 1e-6 (pytorch-grad-cam): alpha = g^2 / (2 g^2 + 6 g^3 + 1e-6):
    #   0.25 / (0.5 + 0.75 + 1e-6) and 1e-8 / (2e-8 + 6e-12 + 1e-6) (~0.0098: the tiny gradient is dropped)
    v = torch.tensor([[[0.5, 1e-4], [0.0, 0.0]]])
    net = Toy(v).eval()
    a = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    x, t = a.view(1, 1, 2, 2), torch.tensor([0])
    w19 = 0.5 / 5 + 1e-4 / 2.0006
    weps = 0.5 * 0.25 / 1.250001 + 1e-4 * 1e-8 / (2e-8 + 6e-12 + 1e-6)
    got19 = explain(net, x, "gradcampp", target=t, layer="feat")
    goteps = explain(net, x, "gradcampp", target=t, layer="feat", alpha_eps=1e-6)
    assert torch.allclose(got19[0], w19 * a, rtol=1e-6, atol=0)
    assert torch.allclose(goteps[0], weps * a, rtol=1e-6, atol=0)
    assert abs(w19 - weps) / w19 > 4e-4  # the two settings differ by far more than the tolerance
    with pytest.raises(MethodError, match="alpha_eps"):
        explain(net, x, "gradcampp", target=t, layer="feat", alpha_eps=-1.0)


def test_xgradcam_and_layercam_by_hand():
    v = torch.tensor([[[0.5, -0.25], [-1.0, 1.0]]])
    net = Toy(v).eval()
    a = torch.tensor([[1.0, 2.0], [0.5, 3.0]])
    x = a.view(1, 1, 2, 2)
    t = torch.tensor([0])
    # XGrad-CAM: w = sum (A / sum A) g = (0.5 - 0.5 - 0.5 + 3) / 6.5
    xg = explain(net, x, "xgradcam", target=t, layer="feat")
    assert torch.allclose(xg[0], 2.5 / 6.5 * a, atol=1e-6)
    # Layer-CAM: per position ReLU(g) A
    lc = explain(net, x, "layercam", target=t, layer="feat")
    assert torch.allclose(lc[0], torch.relu(v[0]) * a, atol=1e-6)


def test_xgradcam_equals_gradcam_on_gap_head(tiny_cnn):
    x = torch.randn(2, 3, 16, 16)
    g = explain(tiny_cnn, x, "gradcam", layer="features")
    assert torch.allclose(explain(tiny_cnn, x, "xgradcam", layer="features"), g, atol=1e-5)


# --- Guided Grad-CAM ---------------------------------------------------------------------------
def test_guided_gradcam_is_gbp_times_gradcam(tiny_cnn):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([0, 3])
    gg = explain(tiny_cnn, x, "guided_gradcam", target=t, layer="features")
    cam = explain(tiny_cnn, x, "gradcam", target=t, layer="features")
    gbp = explain(tiny_cnn, x, "guided_backprop", target=t)  # max_c |GBP|; cam >= 0 factors out
    assert torch.allclose(gg, gbp * cam, atol=1e-6)
    assert count_hooks(tiny_cnn) == 0


# --- Score-CAM ---------------------------------------------------------------------------------
def scorecam_reference(net, x, t, layer_fn, paper=False):
    """Loop over channels. Official code's variant: softmax prob, no baseline, no channel softmax;
    `paper=True`: minus the zero image's prob, then softmax over the (non-constant) channels."""
    with torch.no_grad():
        acts = layer_fn(x)
        cams = []
        for b in range(x.shape[0]):
            w = torch.full((acts.shape[1],), float("-inf")) if paper else torch.zeros(acts.shape[1])
            base = net(torch.zeros_like(x[b : b + 1])).softmax(1)[0, t[b]] if paper else 0.0
            for k in range(acts.shape[1]):
                up = torch.nn.functional.interpolate(acts[b : b + 1, k : k + 1], size=x.shape[-2:], mode="bilinear")
                if up.max() == up.min():
                    continue
                m = (up - up.min()) / (up.max() - up.min())
                w[k] = net(x[b : b + 1] * m).softmax(1)[0, t[b]] - base
            if paper:
                w = torch.softmax(w, 0)
            cams.append(torch.relu(torch.einsum("k,khw->hw", w, acts[b])))
        cam = torch.stack(cams)
    return torch.nn.functional.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear")[:, 0]


@pytest.mark.parametrize("internal_batch", [3, 64])
def test_scorecam_matches_channel_loop(tiny_cnn, internal_batch):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([1, 2])
    got = explain(tiny_cnn, x, "scorecam", target=t, layer="features", internal_batch=internal_batch)
    ref = scorecam_reference(tiny_cnn, x, t, tiny_cnn.features)
    assert torch.allclose(got, ref, atol=1e-5)
    kw = {"baseline": True, "channel_softmax": True}
    paper = explain(tiny_cnn, x, "scorecam", target=t, layer="features", internal_batch=internal_batch, **kw)
    assert torch.allclose(paper, scorecam_reference(tiny_cnn, x, t, tiny_cnn.features, paper=True), atol=1e-5)


def test_scorecam_constant_channels_give_no_nan():
    net = TinyCNN(width=4).eval()
    with torch.no_grad():  # channels 0 and 1 of the last conv become constant (0 and 2 after ReLU)
        net.features[2].weight[:2] = 0
        net.features[2].bias[0] = -1.0
        net.features[2].bias[1] = 2.0
    x = torch.randn(2, 3, 16, 16)
    for kw in ({}, {"channel_softmax": True, "baseline": True}, {"score": "logit"}):
        m = explain(net, x, "scorecam", layer="features", **kw)
        assert torch.isfinite(m).all() and m.shape == (2, 16, 16)


class _Repeat(nn.Module):
    """[h, 2h, 4h] on the channels (copies=3): channels 4-11 repeat 0-3 up to a scale, so their
    min-max scaled maps are the same floats; copies=1: [h]."""

    def __init__(self, copies: int):
        super().__init__()
        self.copies = copies

    def forward(self, h):
        return torch.cat([h * 2.0**i for i in range(self.copies)], 1)


class DupChannels(nn.Module):
    def __init__(self, copies: int = 3):
        super().__init__()
        base = TinyCNN(width=4).eval()
        self.features, self.dup, self.fc = base.features, _Repeat(copies), nn.Linear(4 * copies, 5)
        torch.nn.init.normal_(self.fc.weight, std=0.5, generator=torch.Generator().manual_seed(3))

    def forward(self, x):
        return self.fc(self.dup(self.features(x)).mean((2, 3)))


def _scorecam_rows(net, x, t):
    rows = []
    handle = net.register_forward_pre_hook(lambda _m, inp: rows.append(inp[0].shape[0]))
    try:
        return explain(net, x, "scorecam", target=t, layer="dup", internal_batch=5), sum(rows)
    finally:
        handle.remove()


def test_scorecam_one_forward_per_distinct_mask():
    """Issue #13: channels equal after min-max scaling mask the image identically; each distinct
    (image, mask) costs one forward, and the map is still the per-channel loop's."""
    net = DupChannels(3).eval()
    torch.manual_seed(4)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([1, 3])
    got, rows = _scorecam_rows(net, x, t)
    _, rows_single = _scorecam_rows(DupChannels(1).eval(), x, t)  # the same 4 distinct channels, once each
    with torch.no_grad():
        h = net.features(x).flatten(2)
    assert int(((h.amax(2) - h.amin(2)) > 0).sum()) >= 4  # enough masks for the count to mean something
    assert rows == rows_single  # not 3x the masked forwards
    ref = scorecam_reference(net, x, t, lambda z: net.dup(net.features(z)))
    assert torch.allclose(got, ref, atol=1e-5)


# --- Counterfactual Grad-CAM on a two-object image ------------------------------------------------
def test_counterfactual_peak_lies_off_the_object(default_model, sample_batch):
    """chelsea (cat) left | coffee (espresso) right. Measured with the default model: plain
    Grad-CAM for espresso (967) peaks at (48, 144) on the cup half; the counterfactual map peaks
    at (47, 47) on the cat half, with all of its mass there."""
    halves = torch.nn.functional.interpolate(sample_batch, size=(224, 112), mode="bilinear", antialias=True)
    comp = torch.cat([halves[0], halves[1]], dim=2)[None]
    t = torch.tensor([967])
    plain = explain(default_model, comp, "gradcam", target=t)[0]
    cf = explain(default_model, comp, "gradcam", target=t, counterfactual=True)[0]
    assert int(plain.argmax()) % 224 >= 112  # cup half
    assert int(cf.argmax()) % 224 < 112  # cat half
    assert cf[:, :112].sum() > 0.9 * cf.sum()
