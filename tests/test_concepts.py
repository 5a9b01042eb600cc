"""Concept-based explanations (#14): NMF, TCAV on a model whose class logit is a known linear
function of a known layer, Captum's TCAV as an oracle, CRAFT-style extraction and concept maps
on two known textures, bad inputs, and the CLI end to end on folders cut from sample_images/."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import SAMPLES, run_xai
from xaicli.concepts.config import ConceptsConfig, build_concepts_config
from xaicli.concepts.extract import run_extract
from xaicli.concepts.tcav import positive_share, run_tcav, train_cav
from xaicli.errors import ConfigError
from xaicli.models.preprocess import Preprocess
from xaicli.models.registry import LoadedModel
from xaicli.nmf import load_factorisation, nmf, nmf_transform, relative_error


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------
# NMF
# --------------------------------------------------------------------------------------------
def test_nmf_error_decreases_with_k():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(200, 6, generator=g) @ torch.rand(6, 40, generator=g) + 0.05 * torch.rand(200, 40, generator=g)
    errs = []
    for k in range(1, 8):
        u, w = nmf(a, k, iters=400)
        assert (u >= 0).all() and (w >= 0).all() and u.shape == (200, k) and w.shape == (k, 40)
        errs.append(relative_error(a, u, w))
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:6], strict=False)), errs  # up to the true rank 6
    assert errs[5] < 0.05 < errs[0], errs


def test_nmf_transform_recovers_known_coefficients():
    g = torch.Generator().manual_seed(1)
    w = torch.rand(3, 20, generator=g)
    u = torch.rand(50, 3, generator=g)
    got = nmf_transform(u @ w, w, iters=2000)
    assert torch.allclose(got, u, atol=2e-2), (got - u).abs().max()


# --------------------------------------------------------------------------------------------
# a model whose class logits are known linear functions of the layer `feat` (the input itself)
# --------------------------------------------------------------------------------------------
class LinearOnFeat(nn.Module):
    """feat = the input [B, 3, 8, 8]; logit_0 = mean of channel 0 (red), logit_1 = mean of channel 1."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Identity()
        self.dummy = nn.Parameter(torch.zeros(()))  # a parameter, so the model has a device

    def forward(self, x):
        f = self.feat(x)
        return torch.stack([f[:, 0].mean((1, 2)), f[:, 1].mean((1, 2))], 1) + self.dummy


def tiny_lm(model, size=8) -> LoadedModel:
    pre = Preprocess((size, size), size, "bilinear", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return LoadedModel(model.eval(), pre, ["red", "green"], "synthetic")


def write_images(folder: Path, n: int, seed: int, red: tuple[float, float] | None = None, size: int = 8):
    """n random RGB images in [0.25, 0.75]; with `red`, the red channel uniform in that range."""
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    for i in range(n):
        img = g.uniform(0.25, 0.75, (size, size, 3))
        if red is not None:
            img[..., 0] = g.uniform(*red, (size, size))
        Image.fromarray((img * 255 + 0.5).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture
def synthetic_sets(tmp_path):
    d = tmp_path / "sets"
    write_images(d / "reddish", 16, 1, red=(0.9, 1.0))
    write_images(d / "noise", 16, 2)  # a concept with nothing to find: random images again
    write_images(d / "random", 40, 3)
    write_images(d / "test", 12, 4)
    return d


def tcav_cfg(d: Path, out: Path, **tcav) -> ConceptsConfig:
    t = {
        "concepts": {"reddish": str(d / "reddish"), "noise": str(d / "noise")},
        "random": {"folder": str(d / "random"), "sets": 20, "size": 16},
        "layers": ["feat"],
        "classes": {"0": str(d / "test")},
        "l2": 0.1,
        "steps": 30,
        **tcav,
    }
    return ConceptsConfig.model_validate({"output": str(out), "device": "cpu", "batch_size": 8, "tcav": t})


def test_tcav_on_a_known_linear_logit(synthetic_sets, tmp_path):
    out = tmp_path / "out"
    res = run_tcav(tcav_cfg(synthetic_sets, out), lm=tiny_lm(LinearOnFeat()))
    by = {r["concept"]: r for r in res.rows}
    # the CAV of the concept is the red channel's direction (the logit's gradient direction)
    from safetensors.torch import load_file

    cavs = load_file(out / "concepts" / "cavs.safetensors")
    red = torch.zeros(3, 8, 8)
    red[0] = 1.0
    red = red.flatten() / red.norm()
    cos = [float(cavs[f"reddish|feat|{i}"] @ red) for i in range(1, 21)]
    assert min(cos) >= 0.9, cos
    assert float(by["reddish"]["score_mean"]) == 1.0 and by["reddish"]["significant"] == "true"
    assert float(by["reddish"]["cav_accuracy"]) == 1.0
    # a random concept: about half, not significant, with a high p-value
    assert 0.25 <= float(by["noise"]["score_mean"]) <= 0.75, by["noise"]
    assert by["noise"]["significant"] == "false" and float(by["noise"]["p_value"]) > 0.2
    assert float(by["reddish"]["p_bonferroni"]) < 1e-3
    # the files
    table = rows(out / "concepts" / "tcav.csv")
    assert {r["concept"] for r in table} == {"reddish", "noise"} and table[0]["random_sets"] == "20"
    assert len(rows(out / "concepts" / "tcav_runs.csv")) == 3 * 20  # reddish, noise, random-vs-random
    assert (out / "concepts" / "tcav.png").stat().st_size > 5000
    assert not (out / "concepts" / "errors.csv").exists()


def test_train_cav_separates_and_reports_held_out_accuracy():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(100, 10, generator=g) + torch.tensor([3.0] + [0.0] * 9)
    neg = torch.randn(100, 10, generator=g)
    cav = train_cav(pos, neg, test_fraction=0.33)
    assert cav.vector[0] > 0.85 and abs(float(cav.vector.norm()) - 1) < 1e-5
    assert 0.8 <= cav.accuracy <= 1.0  # Bayes accuracy: Phi(1.5) = 0.93
    assert torch.equal(positive_share(torch.tensor([[1.0] + [0.0] * 9, [-1.0] + [0.0] * 9]), cav.vector[None]),
                       torch.tensor([0.5]))  # fmt: skip


# --------------------------------------------------------------------------------------------
# Captum's TCAV as an oracle (same layer, concept and random sets, the same classifier)
# --------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(8 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(self.relu2(self.conv2(self.relu1(self.conv1(x)))).flatten(1))


@pytest.mark.slow
def test_tcav_scores_match_captum(tmp_path):
    captum_tcav = pytest.importorskip("captum.concept")
    from captum.attr import LayerGradientXActivation
    from captum.concept._utils.classifier import Classifier

    from xaicli.concepts.acts import flat_activations, layer_gradients

    model = SmallCNN().eval()
    layer, target, settings = "relu1", 1, {"test_fraction": 0.33, "l2": 0.01, "steps": 100, "seed": 0}
    g = torch.Generator().manual_seed(0)
    concept_x = torch.rand(20, 3, 8, 8, generator=g)
    concept_x[:, 2] += 1.0  # a blue-ish concept
    randoms = [torch.rand(20, 3, 8, 8, generator=g) for _ in range(4)]
    inputs = torch.rand(40, 3, 8, 8, generator=g) * 1.5

    class Same(Classifier):  # xaicli's classifier, so only the TCAV computation is compared
        def __init__(self):
            self.v = None

        def train_and_eval(self, dataloader, **kw):
            xs, ys = zip(*dataloader, strict=True)
            x, y = torch.cat(xs), torch.cat(ys)
            ids = sorted(set(y.tolist()))
            self.ids = ids  # [concept id, random id]: the concept has the lower id below
            cav = train_cav(x[y == ids[0]], x[y == ids[1]], **settings)
            self.v = cav.vector
            return {"accs": torch.tensor(cav.accuracy)}

        def weights(self):
            return torch.stack([self.v, -self.v])

        def classes(self):
            return self.ids

    def it(t):
        return iter([t])  # one batch: Captum stores the activations in this order

    concept = captum_tcav.Concept(0, "blue", it(concept_x))
    rconcepts = [captum_tcav.Concept(i + 1, f"random_{i}", it(r)) for i, r in enumerate(randoms)]
    attr = LayerGradientXActivation(model, getattr(model, layer), multiply_by_inputs=False)
    tc = captum_tcav.TCAV(model, [layer], classifier=Same(), layer_attr_method=attr, save_path=str(tmp_path / "cav"))
    theirs = tc.interpret(inputs, [[concept, r] for r in rconcepts], target=target)
    ours = []
    acts_c = flat_activations(model, concept_x, [layer])[layer]
    _, grad, _ = layer_gradients(model, inputs, layer, target)
    for r in randoms:
        v = train_cav(acts_c, flat_activations(model, r, [layer])[layer], **settings).vector
        ours.append(float(positive_share(grad.flatten(1), v[None])[0]))
    captum_scores = [float(theirs[f"0-{i + 1}"][layer]["sign_count"][0]) for i in range(4)]
    assert 0.05 < np.mean(ours) < 0.95  # not a degenerate case where every image agrees
    assert np.allclose(ours, captum_scores, atol=0.05), (ours, captum_scores)


# --------------------------------------------------------------------------------------------
# extraction and concept maps on two known textures
# --------------------------------------------------------------------------------------------
class TextureNet(nn.Module):
    """feat = [|d/dx|, |d/dy|] of the grey image (vertical stripes -> channel 0, horizontal -> 1);
    logit_0 = mean of channel 0, logit_1 = mean of channel 1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        with torch.no_grad():
            dx = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
            self.conv.weight.copy_(torch.stack([dx, dx.T])[:, None])
        self.feat = nn.Identity()

    def forward(self, x):
        f = self.feat(self.conv(x.mean(1, keepdim=True)).abs())
        return f.mean((2, 3))


def two_textures(size=32, left="vertical") -> np.ndarray:
    """Left half one stripe orientation, right half the other (period 4 px)."""
    i = np.arange(size)
    vert = np.tile((i // 2 % 2)[None, :], (size, 1))  # varies along x: vertical stripes
    hori = vert.T
    img = np.where(
        np.arange(size)[None, :] < size // 2, vert if left == "vertical" else hori, hori if left == "vertical" else vert
    )
    return np.repeat((img * 255).astype(np.uint8)[..., None], 3, axis=2)


def test_extract_and_concept_maps_find_two_textures(tmp_path):
    imgs = tmp_path / "textures"
    imgs.mkdir()
    for i, left in enumerate(["vertical", "horizontal"] * 3):
        Image.fromarray(two_textures(left=left)).save(imgs / f"t{i}.png")
    (imgs / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    cfg = ConceptsConfig.model_validate({
        "output": str(out), "device": "cpu", "batch_size": 8,
        "extract": {"class": 0, "images": str(imgs), "layer": "feat", "concepts": 2, "scales": [0.5], "atlas_crops": 3},
    })  # fmt: skip
    lm = tiny_lm(TextureNet(), 32)
    res = run_extract(cfg, lm=lm, maps=False)
    assert res.failed == 1  # read twice (crops, importance), one errors.csv row
    assert [r["image"] for r in rows(out / "concepts" / "errors.csv")] == ["extract/broken"]
    w, meta = load_factorisation(out / "concepts")
    assert meta["layer"] == "feat" and w.shape == (2, 2)
    assert res.error < 0.05  # crops are pure textures: rank 2 explains them
    vertical = int(w[:, 0].argmax())  # the concept of |d/dx|, i.e. vertical stripes
    assert w[vertical, 0] > 0.95 and w[1 - vertical, 1] > 0.95
    # importance for class 0 (logit = mean |d/dx|): the vertical-stripe concept ranks first
    by_rank = {int(r["rank"]): r for r in res.rows}
    assert int(by_rank[1]["concept"]) == vertical and float(by_rank[2]["importance"]) < 0.1 * float(
        by_rank[1]["importance"]
    )
    assert (out / "concepts" / "atlas.png").is_file()
    # concept maps on a new image: each concept sits on its own texture
    from xaicli.methods import build_method, make_context

    spec = build_method("concept_maps", concepts=str(out / "concepts"))
    assert spec.map_names == ("concept_0", "concept_1")
    x = torch.from_numpy(two_textures(left="vertical")).permute(2, 0, 1)[None].float() / 255
    bound = spec.bind(make_context(lm))
    maps = bound(x).maps[0]  # [2, 32, 32]
    other = torch.from_numpy(two_textures(left="horizontal")).permute(2, 0, 1)[None].float() / 255
    assert torch.allclose(bound(torch.cat([x, 0.5 * other])).maps[0], maps, atol=1e-5)  # batch-independent
    inner = slice(2, 14), slice(18, 30)  # away from the border and the seam
    left_v, right_v = maps[vertical][:, inner[0]].mean(), maps[vertical][:, inner[1]].mean()
    left_h, right_h = maps[1 - vertical][:, inner[0]].mean(), maps[1 - vertical][:, inner[1]].mean()
    assert left_v > 5 * right_v and right_h > 5 * left_h, (left_v, right_v, left_h, right_h)
    # resume: the same settings reuse the fit
    again = run_extract(cfg, lm=lm, maps=False)
    assert again.reused and [r["concept"] for r in again.rows] == [str(r["concept"]) for r in res.rows]
    # CRAFT's Sobol total indices: logit_0 is linear in the vertical concept's mask alone
    cfg.output = str(tmp_path / "sobol")
    cfg.extract.importance, cfg.extract.sobol_designs = "sobol", 32
    sob = {int(r["concept"]): float(r["importance"]) for r in run_extract(cfg, lm=lm, maps=False).rows}
    assert sob[vertical] > 0.9 and sob[1 - vertical] < 0.02, sob  # estimates of 1 and 0


# --------------------------------------------------------------------------------------------
# bad inputs: clear errors or errors.csv rows
# --------------------------------------------------------------------------------------------
def test_unreadable_concept_images_become_error_rows(synthetic_sets, tmp_path):
    (synthetic_sets / "reddish" / "broken.png").write_bytes(b"not a png")
    (synthetic_sets / "random" / "zero.jpg").write_bytes(b"")
    out = tmp_path / "out"
    res = run_tcav(tcav_cfg(synthetic_sets, out, random={"folder": str(synthetic_sets / "random"), "sets": 3, "size": 8}),
                   lm=tiny_lm(LinearOnFeat()))  # fmt: skip
    errs = rows(out / "concepts" / "errors.csv")
    assert res.failed == 2 and {e["image"] for e in errs} == {"tcav:reddish/broken", "tcav:random/zero"}
    assert all(e["reason"] for e in errs)
    assert (out / "concepts" / "tcav.csv").is_file()


def test_too_few_readable_images_in_a_concept_folder(synthetic_sets, tmp_path):
    small = write_images(synthetic_sets / "small", 7, 5, red=(0.9, 1.0))
    cfg = tcav_cfg(synthetic_sets, tmp_path / "o")
    cfg.tcav.concepts = {"small": str(small)}
    with pytest.raises(ConfigError, match=r"concept 'small': 7 image\(s\) .* at least 10"):
        run_tcav(cfg, lm=tiny_lm(LinearOnFeat()))
    for i in range(4):  # 11 files, but 4 unreadable: 7 readable
        (small / f"bad{i}.png").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"concept 'small': 7 readable image\(s\)"):
        run_tcav(cfg, lm=tiny_lm(LinearOnFeat()))


def test_a_layer_that_does_not_exist(synthetic_sets, tmp_path):
    with pytest.raises(ConfigError, match=r"layers: layer 'nope' is not a module of this model; .*candidates"):
        run_tcav(tcav_cfg(synthetic_sets, tmp_path / "o", layers=["nope"]), lm=tiny_lm(LinearOnFeat()))


@pytest.mark.parametrize(
    "tcav, message",
    [
        ({"random": {"sets": 10}}, "give either `folder:`"),
        ({"random": {"folder": "r", "sets": 1}}, "tcav.random.sets"),
        ({"concepts": {}}, "tcav.concepts"),
        ({"alpha": 2}, "tcav.alpha"),
        ({"colour": 1}, "unknown key 'tcav.colour'"),
    ],
)
def test_config_mistakes_are_one_line(tmp_path, tcav, message):
    base = {"concepts": {"a": "a"}, "random": {"folder": "r"}, "layers": ["x"], "classes": {"0": "t"}}
    p = tmp_path / "c.yaml"
    import yaml

    p.write_text(yaml.safe_dump({"tcav": {**base, **tcav}}))
    with pytest.raises(ConfigError, match=message) as e:
        build_concepts_config(p, need="tcav")
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------
# the CLI end to end, on folders cut from sample_images/ with the default model
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_tcav_extract_explain_report(tmp_path):
    from xaicli.concepts.sample_data import make

    data = make(tmp_path / "data", SAMPLES)
    for f in sorted((data / "random").iterdir())[12:]:
        f.unlink()  # a smaller random pool keeps the test short
    for f in sorted((data / "cat").iterdir())[3:]:
        shutil.move(f, tmp_path / f.name)
    cfg = tmp_path / "concepts.yaml"
    cfg.write_text(
        "model: default\noutput: out\ndevice: cpu\nbatch_size: 16\n"
        "tcav:\n  concepts: {striped: data/striped}\n  random: {folder: data/random, sets: 3, size: 6}\n"
        "  layers: [blocks.5]\n  classes: {281: data/cat}\n"
        "extract:\n  class: 281\n  images: data/cat\n  layer: blocks.5\n  concepts: 3\n  scales: [0.5]\n  atlas_crops: 2\n"
    )
    r = run_xai("concepts", "tcav", "--config", cfg, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["rows"][0]["concept"] == "striped" and doc["rows"][0]["random_sets"] == 3
    out = tmp_path / "out"
    assert {p.name for p in (out / "concepts").iterdir()} >= {
        "tcav.csv",
        "tcav_runs.csv",
        "cavs.safetensors",
        "tcav.png",
    }
    r = run_xai("concepts", "extract", "--config", cfg, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "concept maps" in r.stdout
    assert len(rows(out / "concepts" / "concepts.csv")) == 3
    assert sorted(p.name for p in (out / "concept_maps" / "cat_00").iterdir()) == [
        f"concept_{k}.{e}" for k in range(3) for e in ("npy", "png")
    ]
    # again: the fit is reused, the maps are up to date
    r = run_xai("concepts", "extract", "--config", cfg, "--json", cwd=tmp_path)
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["reused"] and doc["maps"] == {"done": 0, "up_to_date": 3}
    # the fitted concepts on new images through `xai explain`
    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(tmp_path / "cat_03.png", new)
    r = run_xai("explain", new, "-m", "concept_maps", "--concepts", out / "concepts", "-o", tmp_path / "o2", "--quiet",
                "--device", "cpu", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    m = np.load(tmp_path / "o2" / "concept_maps" / "cat_03" / "concept_2.npy")
    assert m.shape == (224, 224) and np.isfinite(m).all() and m.max() > 0
    # the report shows the concept results
    r = run_xai("report", out, "--no-sheets", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    page = (out / "report" / "index.html").read_text()
    assert 'id="concepts-sec"' in page and "../concepts/tcav.png" in page and "../concepts/atlas.png" in page
    # a layer that does not exist: one line, exit 2, with candidates
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg.read_text().replace("layers: [blocks.5]", "layers: [blocks.55]"))
    r = run_xai("concepts", "tcav", "--config", bad, cwd=tmp_path)
    assert r.returncode == 2 and "blocks.55" in r.stderr and "candidates" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_concepts_help_explains_both_commands():
    r = run_xai("concepts", "--help")
    assert r.returncode == 0
    assert "tcav" in r.stdout and "extract" in r.stdout and "random-vs-random" in r.stdout
    assert "concept_maps" in r.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tcav_and_extract_on_cuda_match_cpu(synthetic_sets, tmp_path):
    cpu = run_tcav(tcav_cfg(synthetic_sets, tmp_path / "cpu"), lm=tiny_lm(LinearOnFeat()))
    cfg = tcav_cfg(synthetic_sets, tmp_path / "gpu")
    cfg.device = "cuda"
    gpu = run_tcav(cfg, lm=tiny_lm(LinearOnFeat().cuda()))
    for a, b in zip(cpu.rows, gpu.rows, strict=True):
        assert a["concept"] == b["concept"] and abs(float(a["score_mean"]) - float(b["score_mean"])) <= 0.05
    imgs = tmp_path / "textures"
    imgs.mkdir()
    for i, left in enumerate(["vertical", "horizontal"] * 2):
        Image.fromarray(two_textures(left=left)).save(imgs / f"t{i}.png")
    ext = ConceptsConfig.model_validate({
        "output": str(tmp_path / "ext"), "device": "cuda",
        "extract": {"class": 0, "images": str(imgs), "layer": "feat", "concepts": 2, "scales": [0.5]},
    })  # fmt: skip
    res = run_extract(ext, lm=tiny_lm(TextureNet().cuda(), 32), maps=False)
    assert res.error < 0.05 and len(res.rows) == 2


def test_concepts_flag_and_missing_factorisation_are_config_errors(tmp_path):
    from xaicli.config import build_config

    with pytest.raises(ConfigError, match="--concepts is for the concept_maps method"):
        build_config(None, {"input": str(SAMPLES), "methods": "gradcam", "concepts": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"no factorisation at .*concepts.safetensors; run `xai concepts extract"):
        build_config(None, {"input": str(SAMPLES), "methods": "concept_maps", "concepts": str(tmp_path / "nope")})
