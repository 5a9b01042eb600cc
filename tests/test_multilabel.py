"""Binary, sigmoid and multi-label heads: `score:`, `target: topk:K | positives`, labels files with
several classes per image; one row and one map file `<rel>__<class>` per (image, method, target)."""

import csv
import json

import numpy as np
import pytest
import torch

from conftest import run_xai
from xaicli.config import build_config

TINY = '''
import torch
from torch import nn


class ColorNet(nn.Module):
    """Logit c = 20 * (mean of channel c - 0.25) for c = red, green, blue; class 3 never fires.
    On [0, 1] inputs (mean 0, std 1) its positives (sigmoid > 0.5) are the colours covering more
    than a quarter of the image."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 3, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 4)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(3)[:, :, None, None])
            self.fc.weight.copy_(torch.cat([torch.eye(3) * 20, torch.zeros(1, 3)]))
            self.fc.bias.copy_(torch.tensor([-5.0, -5.0, -5.0, -10.0]))

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.features(x))).flatten(1))


class Binary(nn.Module):
    """One logit: 8 * (mean red - 0.5)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 1, 1)
        self.fc = nn.Linear(1, 1)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([1.0, 0.0, 0.0])[None, :, None, None])
            self.features.bias.zero_()
            self.fc.weight.fill_(8.0)
            self.fc.bias.fill_(-4.0)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def build():
    return ColorNet()


def binary():
    return Binary()
'''

POSITIVES = {"rg": {0, 1}, "blue": {2}, "white": {0, 1, 2}}  # red|green halves, all blue, white


@pytest.fixture
def proj(tmp_path):
    from PIL import Image

    (tmp_path / "tiny.py").write_text(TINY)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    a = np.zeros((64, 64, 3), np.uint8)
    a[:, :32, 0] = 255  # left half red
    a[:, 32:, 1] = 255  # right half green
    Image.fromarray(a).save(imgs / "rg.png")
    Image.new("RGB", (64, 64), (0, 0, 255)).save(imgs / "blue.png")
    Image.new("RGB", (64, 64), (255, 255, 255)).save(imgs / "white.png")
    (tmp_path / "names.txt").write_text("red\ngreen\nblue\nnever\n")
    return tmp_path


def config(proj, target, extra=""):
    p = proj / f"cfg_{abs(hash(target + extra))}.yaml"
    p.write_text(
        "model: {name: tiny.py:build, class_names: names.txt, input_size: 32, crop: none, "
        "mean: [0, 0, 0], std: [1, 1, 1]}\n"
        f"score: sigmoid\ntarget: '{target}'\nmethods: gradcam,saliency\ninput: imgs\noutput: out\nworkers: 0\n{extra}"
    )
    return p


def table(out):
    with open(out / "explanations.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_positives_write_one_map_per_positive_label(proj):
    cfg = config(proj, "positives")
    r = run_xai("explain", "-c", cfg, "-q")
    assert r.returncode == 0, r.stderr
    out = proj / "out"
    rows = table(out)
    for method in ("gradcam", "saliency"):
        got = {}
        for row in rows:
            if row["method"] == method:
                got.setdefault(row["image"], set()).add(int(row["target_class"]))
        assert got == POSITIVES
    for row in rows:  # one row and one map file per (image, method, target)
        assert float(row["target_prob"]) > 0.5  # sigmoid probabilities
        assert (out / row["method"] / f"{row['image']}__{row['target_class']}.npy").is_file()
        assert (out / row["method"] / f"{row['image']}__{row['target_class']}.png").is_file()
    assert len(list((out / "gradcam").glob("*.npy"))) == 6 and not (out / "gradcam" / "rg.npy").exists()
    # Grad-CAM of "red" lights the left half, of "green" the right half
    red, green = np.load(out / "gradcam" / "rg__0.npy"), np.load(out / "gradcam" / "rg__1.npy")
    assert red[:, :16].mean() > 10 * red[:, 16:].mean() and green[:, 16:].mean() > 10 * green[:, :16].mean()

    from xaicli.reader import RunFolder

    run = RunFolder(out)
    assert run.multi_target and set(run.latest()) == {f"{k}__{c}" for k, cs in POSITIVES.items() for c in cs}
    assert np.array_equal(run.load_map("gradcam", "rg__1"), green)

    again = run_xai("explain", "-c", cfg, "--json")  # resume: every (image, target) is up to date
    assert again.returncode == 0 and json.loads(again.stdout)["done"] == 0, again.stderr
    ev = run_xai("evaluate", out, "--metric", "deletion", "-q")  # metrics per row
    assert ev.returncode == 0, ev.stderr
    with open(out / "metrics.csv", newline="") as f:
        keys = {(m["image"], m["method"]) for m in csv.DictReader(f)}
    assert keys == {(f"{k}__{c}", m) for k, cs in POSITIVES.items() for c in cs for m in ("gradcam", "saliency")}


def test_topk_labels_and_single_target_layout(proj):
    import xaicli

    xaicli.run(config(proj, "topk:2"), progress=False)
    rows = table(proj / "out")
    assert len(rows) == 2 * 3 * 2
    white = {int(r["target_class"]) for r in rows if r["image"] == "white" and r["method"] == "saliency"}
    assert len(white) == 2 and white <= {0, 1, 2}
    blue = {int(r["target_class"]) for r in rows if r["image"] == "blue"}
    assert 2 in blue and len(blue) == 2

    labels = proj / "labels.csv"  # several classes per image: `a;b` or several rows
    labels.write_text("image,class\nrg,red;blue\nwhite.png,green\nwhite.png,never\nblue,2\n")
    xaicli.run(config(proj, str(labels)), progress=False, force=True)
    got = {(r["image"], int(r["target_class"])) for r in table(proj / "out") if r["method"] == "gradcam"}
    assert got == {("rg", 0), ("rg", 2), ("white", 1), ("white", 3), ("blue", 2)}
    assert (proj / "out" / "gradcam" / "white__3.npy").is_file()

    xaicli.run(config(proj, "topk:1"), progress=False, force=True)  # one target per image: no suffix
    assert (proj / "out" / "gradcam" / "rg.npy").is_file() and not list((proj / "out" / "gradcam").glob("*__*"))


def test_single_logit_head_explains_the_positive_class(proj):
    import xaicli

    cfg = config(proj, "predicted").read_text().replace("tiny.py:build", "tiny.py:binary")
    cfg = cfg.replace("class_names: names.txt", "class_names: binary.txt").replace("score: sigmoid\n", "")
    (proj / "binary.txt").write_text("not red\nred\n")
    (proj / "bin.yaml").write_text(cfg)
    xaicli.run(proj / "bin.yaml", progress=False)
    rows = {r["image"]: r for r in table(proj / "out") if r["method"] == "saliency"}
    assert {r["target_class"] for r in rows.values()} == {"0"} and rows["rg"]["target_label"] == "red"
    # probabilities are sigmoid(logit): white is all red (logit 4), blue has none (logit -4), rg half (0)
    expect = {"white": torch.sigmoid(torch.tensor(4.0)), "blue": torch.sigmoid(torch.tensor(-4.0)), "rg": 0.5}
    for k, p in expect.items():
        assert float(rows[k]["target_prob"]) == pytest.approx(float(p), abs=1e-4)


def test_score_picks_the_default_objective(proj):
    cfg = build_config(None, {"input": str(proj / "imgs"), "methods": "saliency,cam,occlusion", "score": "softmax"})
    specs = dict(cfg.specs())
    assert specs["saliency"].objective == "prob" and specs["occlusion"].objective == "prob"
    assert specs["cam"].objective == "logit"  # CAM is defined on the logit only
    cfg = build_config(
        None, {"input": str(proj / "imgs"), "score": "sigmoid", "methods": [{"name": "saliency", "objective": "logit"}]}
    )
    assert dict(cfg.specs())["saliency"].objective == "logit"  # an explicit objective wins
    from xaicli.errors import ConfigError

    for target in ("topk:0", "topk:x"):
        with pytest.raises(ConfigError, match="topk"):
            build_config(None, {"input": str(proj / "imgs"), "target": target})


def test_metrics_use_sigmoid_probabilities_with_score_sigmoid(tiny_cnn):
    from xaicli.methods.base import make_context
    from xaicli.metrics.base import target_probs

    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0, 2, 4])
    logits = tiny_cnn(x)
    ctx = make_context(tiny_cnn, (16, 16))
    soft = target_probs(ctx, x, t, 8)
    assert torch.allclose(soft, logits.softmax(1).gather(1, t[:, None])[:, 0], atol=1e-6)
    ctx.probability = "sigmoid"  # what explain/evaluate set for `score: sigmoid`
    sig = target_probs(ctx, x, t, 8, key="sig")
    assert torch.allclose(sig, torch.sigmoid(logits).gather(1, t[:, None])[:, 0], atol=1e-6)
