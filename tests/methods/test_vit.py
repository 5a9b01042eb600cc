"""Vision transformers (timm, random init, no download): CAM methods on a token layer, gradient
methods unchanged."""

import pytest
import torch

from conftest import bind
from xaicli import explain, load_model
from xaicli.errors import MethodError
from xaicli.hooks import count_hooks
from xaicli.methods import build_method


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return load_model("timm:vit_tiny_patch16_224", weights="none")


@pytest.mark.parametrize("method", ["gradcam", "saliency", "gradcampp", "layercam"])
def test_vit_maps_have_input_size_and_no_nan(vit, method):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    m = explain(vit, x, method)
    assert m.shape == (2, 224, 224)
    assert torch.isfinite(m).all()
    assert (m.flatten(1).amax(1) > m.flatten(1).amin(1)).all()  # a real map, not a constant
    assert count_hooks(vit.model) == 0


def test_vit_cam_layer_is_a_token_layer(vit):
    m = bind(build_method("gradcam"), vit)
    assert m.layer == f"blocks.{len(vit.model.blocks) - 1}.norm1"


def test_vit_cam_and_guided_backprop_are_clear_errors(vit):
    x = torch.randn(1, 3, 224, 224)
    with pytest.raises(MethodError, match="gradcam"):
        explain(vit, x, "cam")
    with pytest.raises(MethodError, match="ReLU"):
        explain(vit, x, "guided_backprop")  # GELU only: nothing to guide


def test_deit_with_distillation_token():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).eval()
    m = explain(net, torch.randn(1, 3, 224, 224), "gradcam")  # 2 leading tokens dropped: 14 x 14 grid
    assert m.shape == (1, 224, 224) and torch.isfinite(m).all()
