"""The embedded default model and the model registry."""

import pytest
import torch

from conftest import SAMPLES
from xaicli.data import load_image
from xaicli.errors import MethodError, ModelError
from xaicli.models import load_model
from xaicli.models.layers import find_target_layer, get_module


def top(lm, name, k=3):
    x = lm.preprocess(load_image(SAMPLES / name))[None]
    with torch.no_grad():
        p = lm.model(x).softmax(-1)[0]
    v, i = p.topk(k)
    return [(lm.label(int(j)), float(q)) for q, j in zip(v, i, strict=True)]


def test_default_model_chelsea_is_a_cat(default_model):
    t = top(default_model, "chelsea.png")
    assert t[0][0] == "tiger cat" and t[0][1] == pytest.approx(0.39, abs=0.01)
    assert t[1][0] == "Egyptian cat" and t[1][1] == pytest.approx(0.36, abs=0.01)
    assert t[2][0].startswith("tabby") and t[2][1] == pytest.approx(0.17, abs=0.01)


def test_default_model_coffee_is_espresso(default_model):
    t = top(default_model, "coffee.png", 1)
    assert t[0][0] == "espresso" and t[0][1] == pytest.approx(0.95, abs=0.01)


def test_default_preprocessing_matches_timm(default_model):
    import timm

    cfg = timm.data.resolve_data_config({}, model=default_model.model)
    tf = timm.data.create_transform(**cfg)
    img = load_image(SAMPLES / "rocket.jpg")
    assert torch.allclose(default_model.preprocess(img), tf(img), atol=1e-6)
    assert default_model.preprocess.interpolation == "bicubic"
    assert default_model.preprocess.mean == (0.5, 0.5, 0.5) and default_model.preprocess.resize == 256


def test_crop_box_geometry(default_model):
    pre = default_model.preprocess
    # 451x300 landscape: short side 300 -> 256, scale 256/300; crop 224 centred
    left, top_, right, bottom = pre.crop_box(451, 300)
    assert bottom - top_ == pytest.approx(224 * 300 / 256, rel=1e-3)
    assert right - left == pytest.approx(224 * 300 / 256, rel=1e-2)
    assert (left + right) / 2 == pytest.approx(451 / 2, abs=1.5)


def test_unknown_specs_are_model_errors():
    with pytest.raises(ModelError, match="torchvision has no model"):
        load_model("torchvision:not_a_net")
    with pytest.raises(ModelError, match="timm has no model"):
        load_model("timm:not_a_net")
    with pytest.raises(ModelError, match="IMAGENET1K_V1"):
        load_model("torchvision:resnet18", weights="BOGUS")


def test_offline_named_weights_give_a_clear_error(monkeypatch, tmp_path):
    # an empty cache and no network: the error must say how to provide weights
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch.hub

    def no_net(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_net)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="local checkpoint"):
        load_model("torchvision:resnet18")
    with pytest.raises(ModelError, match="local checkpoint"):
        load_model("timm:resnet18")


def test_random_and_checkpoint_weights(tmp_path):
    from safetensors.torch import save_file

    lm = load_model("torchvision:resnet18", weights="none")
    sd = {k: v.contiguous() for k, v in lm.model.state_dict().items()}
    save_file(sd, tmp_path / "r18.safetensors")
    torch.save(sd, tmp_path / "r18.pt")
    for f in ("r18.safetensors", "r18.pt"):
        lm2 = load_model("torchvision:resnet18", weights=str(tmp_path / f))
        assert torch.equal(lm2.model.fc.weight, lm.model.fc.weight)
    with pytest.raises(ModelError, match="does not fit"):
        load_model("torchvision:resnet34", weights=str(tmp_path / "r18.safetensors"))


def test_malicious_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="refused"):
        load_model("torchvision:resnet18", weights=str(tmp_path / "evil.pt"))
    assert not (tmp_path / "pwned").exists()


def test_target_layer_discovery():
    import timm
    import torchvision

    from xaicli.models.default import build_default

    assert find_target_layer(build_default()) == "bn2"
    assert find_target_layer(torchvision.models.resnet18()) == "layer4"
    # VGG: the last ReLU (relu5_3, 14x14), not the max-pool after it (definitions.md, Grad-CAM pitfalls)
    assert find_target_layer(torchvision.models.vgg11()) == "features.19"
    assert find_target_layer(timm.create_model("vit_tiny_patch16_224")) == "blocks.11.norm1"


def test_wrong_layer_lists_candidates(default_model):
    with pytest.raises(MethodError, match="conv_head"):
        get_module(default_model.model, "layer4")


def test_wrong_layer_on_a_timm_model_lists_its_feature_blocks():
    import timm

    from xaicli.models.adapter import ModelAdapter

    adapter = ModelAdapter(timm.create_model("resnet18", pretrained=False, num_classes=3).eval())
    with pytest.raises(MethodError, match="layer3, layer4"):
        adapter.module("features.9")
    assert adapter.default_layer() == "layer4" and adapter.head() == "fc"
