"""Your own model: `model: path/to/file.py:build` or `my_pkg.module:build`, with num_classes,
class_names and preprocessing overrides (issue 15)."""

import csv

import pytest
import torch

from conftest import SAMPLES, run_xai
from xaicli.config import build_config
from xaicli.errors import ConfigError, ModelError
from xaicli.models import load_model
from xaicli.models.preprocess import Preprocess

NET = """
import torchvision

def build(num_classes=1000):
    # a ResNet-18 of the user's own, with the head sized for their classes
    return torchvision.models.resnet18(num_classes=num_classes)

def not_a_model():
    return 42
"""


@pytest.fixture
def project(tmp_path):
    """A user's folder: mynet.py, a random-init 3-class checkpoint (safetensors and a state dict .pt),
    a class-names file and a config that names them relative to itself."""
    from safetensors.torch import save_file

    p = tmp_path / "proj"
    p.mkdir()
    (p / "mynet.py").write_text(NET)
    torch.manual_seed(0)
    import torchvision

    sd = {k: v.contiguous() for k, v in torchvision.models.resnet18(num_classes=3).state_dict().items()}
    save_file(sd, p / "w3.safetensors")
    torch.save(sd, p / "w3.pt")
    (p / "classes.txt").write_text("cat\ndog\nbird\n")
    (p / "cfg.yaml").write_text(
        "model:\n  name: mynet.py:build\n  weights: w3.safetensors\n  num_classes: 3\n"
        "  class_names: classes.txt\n  input_size: 64\n"
        f"input: {SAMPLES}\noutput: out\nmethods: gradcam,saliency\nworkers: 0\n"
    )
    return p


def test_own_resnet18_file_runs_from_the_cli(project, tmp_path):
    r = run_xai("explain", "-c", project / "cfg.yaml", "-q", cwd=tmp_path)  # another cwd: paths are the config's
    assert r.returncode == 0, r.stderr
    with open(project / "out" / "explanations.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(list(SAMPLES.glob("*.[pj][np]g")))
    assert {r["top1_label"] for r in rows} <= {"cat", "dog", "bird"}
    for r in rows:
        assert r["target_label"] == ["cat", "dog", "bird"][int(r["target_class"])]
        assert (project / "out" / r["method"] / f"{r['image']}.npy").is_file()
    import numpy as np

    assert np.load(project / "out" / "gradcam" / "chelsea.npy").shape == (64, 64)  # the input_size override


def test_head_mismatch_names_the_key_to_set(project):
    cfg = (
        (project / "cfg.yaml").read_text().replace("  num_classes: 3\n", "").replace("  class_names: classes.txt\n", "")
    )
    (project / "no_nc.yaml").write_text(cfg)
    r = run_xai("explain", "-c", project / "no_nc.yaml", "-q")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "`num_classes: 3`" in lines[0] and "fc.weight" in lines[0], r.stderr
    # the .pt state dict, with the flag instead of the key
    r = run_xai("explain", "-c", project / "no_nc.yaml", "-q", "--weights", project / "w3.pt", "--num-classes", "3")
    assert r.returncode == 0, r.stderr


def test_module_spec_and_flags(project, monkeypatch):
    monkeypatch.syspath_prepend(str(project))
    pre = {"input_size": "48x64", "crop": "none", "mean": "0.5,0.5,0.5", "std": "0.25,0.25,0.25"}
    cfg = build_config(None, {"input": str(SAMPLES), **{f"model.{k}": v for k, v in pre.items()}})
    assert cfg.model.input_size == [48, 64] and cfg.model.mean == [0.5, 0.5, 0.5]
    lm = load_model("mynet:build", num_classes=4, preprocess=cfg.model.preprocess_overrides())
    assert lm.class_names == ["class_0", "class_1", "class_2", "class_3"]
    assert lm.preprocess.input_size == (48, 64) and lm.preprocess.std == (0.25, 0.25, 0.25)
    with pytest.raises(ModelError, match="not a torch.nn.Module"):
        load_model("mynet:not_a_model")
    with pytest.raises(ModelError, match="cannot import 'no_such_pkg"):
        load_model("no_such_pkg.models:build")
    with pytest.raises(ModelError, match="has no function 'nope'"):
        load_model("mynet:nope")
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(project / "missing.py") + ":build")


def test_config_rebases_the_model_file_and_hashes_it(project):
    from xaicli.state import config_hash

    cfg = build_config(project / "cfg.yaml")
    assert cfg.model.name == f"{project / 'mynet.py'}:build"
    h = config_hash(cfg)
    (project / "mynet.py").write_text(NET + "\n# retrained\n")
    assert config_hash(build_config(project / "cfg.yaml")) != h  # an edited model file makes the run stale


def test_bad_preprocessing_keys_are_config_errors():
    for key, val, msg in [
        ("model.mean", "0.5,0.5", "three numbers"),
        ("model.std", "0.5,0,0.5", "> 0"),
        ("model.crop", "left", "center"),
        ("model.input_size", "3", "between 8"),
        ("model.interpolation", "cubic", "bicubic"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            build_config(None, {"input": str(SAMPLES), key: val})


def test_preprocess_overrides_and_no_crop():
    pre = Preprocess((224, 224), 256)
    p2 = pre.with_overrides(input_size=112)
    assert p2.input_size == (112, 112) and p2.resize == 128  # the 256/224 ratio is kept
    nc = pre.with_overrides(crop="none", input_size=(32, 48))
    from PIL import Image

    img = Image.new("RGB", (300, 100), (255, 0, 0))
    assert nc(img).shape == (3, 32, 48)
    assert nc.crop_box(300, 100) == (0.0, 0.0, 300.0, 100.0)  # the whole photo is the model's input
    assert pre.crop_box(300, 100)[0] > 0


def test_binary_head_class_names(tmp_path):
    from xaicli.models.registry import _class_names

    f = tmp_path / "names.txt"
    f.write_text("healthy\ndisease\n")
    assert _class_names(1, f) == ["disease"]  # one logit: named by its positive class
