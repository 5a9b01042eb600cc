"""Issue #13: eval-mode BatchNorm folded into the conv that feeds it (models/fold.py), the run's
prepared model (methods.base.bind_methods / prepare_context).

The prepared copy gives the same logits and, for every registered method on the default model,
the same maps as the model as loaded; pairs come from the execution, not the registration order;
a graph where folding would be wrong falls back with one warning; a CAM layer that is a conv
stays unfolded; the sanity metric still randomises the model as loaded; `fold_bn: false` and
run.yaml's `resolved.fold_bn`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from conftest import SAMPLES
from xaicli.methods import METHODS, build_method, make_context
from xaicli.methods.base import bind_methods, prepare_context
from xaicli.models.fold import FoldedNorm, fold_batchnorm


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().double().argsort().argsort().double()
    rb = b.flatten().double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-30))


def _bn(c: int, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.2)
    return bn.eval()


class Reordered(nn.Module):
    """Registered bn before conv (the registration order lies); executed conv -> bn."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.bn = _bn(6, 1)
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class UsedTwice(nn.Module):
    """conv's output goes to bn AND, functionally, to a sum: folding the pair would be wrong and
    no module hook can see the second use."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = _bn(6, 2)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        c = self.conv(x)
        return self.fc((self.bn(c) + c).mean((2, 3)))


class TwoConsumers(nn.Module):
    """conv1's output feeds bn1 and conv2 (two modules: the trace sees it, the pair is skipped);
    conv2 -> bn2 folds."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = _bn(6, 3)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = _bn(6, 4)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        c = self.conv1(x)
        return self.fc((self.bn1(c) + self.bn2(self.conv2(c))).mean((2, 3)))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_default_model_folded_logits_equal(default_model, sample_batch):
    model = default_model.model
    before = _state(model)
    rep = fold_batchnorm(model, (224, 224))
    assert rep.applied and rep.note is None
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(rep.folded) == n_bn == 49  # every BatchNormAct2d of EfficientNet-Lite0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in rep.model.modules())
    assert sum(isinstance(m, FoldedNorm) for m in rep.model.modules()) == n_bn
    assert isinstance(rep.model.bn2.act, nn.ReLU6)  # the activation kept, under the same name
    with torch.no_grad():
        ref, got = model(sample_batch), rep.model(sample_batch)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert torch.equal(got.argmax(1), ref.argmax(1))
    after = _state(model)  # the loaded model itself is not touched
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in rep.model.parameters())


def folded_equal(m: nn.Module, pairs: list):
    """Fold m, check exactly `pairs` were folded and the copy computes what m does; the report."""
    rep = fold_batchnorm(m, (8, 8))
    assert rep.applied and rep.folded == pairs
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rep.model(x), m(x), rtol=1e-5, atol=1e-5)
    return rep


def test_pairs_follow_the_execution_not_the_registration_order():
    folded_equal(Reordered().eval(), [("conv", "bn")])


def test_two_module_consumers_skip_that_pair_only():
    rep = folded_equal(TwoConsumers().eval(), [("conv2", "bn2")])
    assert isinstance(rep.model.bn1, nn.BatchNorm2d)


def test_a_functional_second_use_falls_back_with_one_warning():
    m = UsedTwice().eval()
    rep = fold_batchnorm(m, (8, 8))
    assert not rep.applied and rep.model is m
    assert rep.max_diff > 1e-3 and "changed the logits" in rep.note
    warnings: list[str] = []
    bound = bind_methods([("saliency", build_method("saliency"))], make_context(m, (8, 8)), warn=warnings.append)
    assert len(warnings) == 1 and warnings[0].startswith("fold_bn:")
    assert bound.methods["saliency"].model is m and bound.ctx.unprepared is None
    assert bound.fold_bn["applied"] is False


def test_a_cam_layer_that_is_a_conv_stays_unfolded(default_model, sample_batch):
    x = sample_batch[:1]
    spec = build_method("gradcam", layer="conv_head")
    ref = spec.bind(make_context(default_model))(x).maps
    bound = bind_methods([("gradcam", spec)], make_context(default_model))
    assert bound.fold_bn["applied"] and bound.fold_bn["kept"] == ["conv_head"]
    b = bound.methods["gradcam"]
    assert b.model is not default_model.model and isinstance(b.model.bn1, FoldedNorm)
    assert bound.fold_bn["folded"] == 48 and isinstance(b.model.bn2, nn.BatchNorm2d)  # conv_head -> bn2 kept
    assert b.model.conv_head.bias is None  # not folded
    torch.testing.assert_close(b(x).maps, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))
    # had conv_head been folded, its activations (and so Grad-CAM) would have changed
    wrong = fold_batchnorm(default_model.model, (224, 224)).model
    bad = spec.bind(make_context(wrong, (224, 224)))(x).maps
    assert (bad - ref).abs().max() > 0.05 * ref.abs().max()


def test_default_layer_bn2_is_folded_into_and_maps_equal(default_model, sample_batch):
    x = sample_batch
    spec = build_method("gradcam")
    ref = spec.bind(make_context(default_model))(x).maps
    bound = bind_methods([("gradcam", spec)], make_context(default_model))
    assert bound.fold_bn["folded"] == 49 and bound.methods["gradcam"].resolved() == {"layer": "bn2"}
    got = bound.methods["gradcam"](x).maps
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.slow
def test_sanity_metric_unchanged_by_folding(default_model, sample_batch):
    from xaicli.metrics import build_metric

    x = sample_batch[:1]
    metric = build_metric("sanity", depth=1)
    ctx = make_context(default_model)
    m0 = build_method("gradcam").bind(ctx)
    ref = metric(ctx, x, m0(x).maps, m0(x).target, method=m0)
    bound = bind_methods([("gradcam", build_method("gradcam"))], make_context(default_model))
    m1, pctx = bound.methods["gradcam"], bound.ctx
    assert pctx.unprepared is default_model.model
    got = metric(pctx, x, m1(x).maps, m1(x).target, method=m1)
    rows = [(r["step"], r["layer"]) for r in ref.table]
    assert rows == [(r["step"], r["layer"]) for r in got.table] and len(rows) > 3
    for a, b in zip(ref.table, got.table, strict=True):
        assert abs(float(a["spearman_abs"]) - float(b["spearman_abs"])) < 2e-3
    # randomising the folded copy instead (BatchNorms gone) would give other layers / values
    wrong = metric(dataclasses.replace(pctx, unprepared=None), x, m1(x).maps, m1(x).target, method=m1)
    assert [(r["step"], r["layer"]) for r in wrong.table] != rows or any(
        abs(float(a["spearman_abs"]) - float(b["spearman_abs"])) > 0.01
        for a, b in zip(ref.table, wrong.table, strict=True)
    )


SMALL = (64, 64)  # EfficientNet runs at any size: the methods' equality does not need 224 px, time does


@pytest.fixture(scope="module")
def small_setup(default_model):
    from xaicli.data import load_image

    img = load_image(SAMPLES / "chelsea.png").resize(SMALL)
    t = torch.from_numpy(__import__("numpy").asarray(img).copy()).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(default_model.preprocess.mean), torch.tensor(default_model.preprocess.std)
    x = ((t - mean[:, None, None]) / std[:, None, None])[None]
    ctx = make_context(default_model, SMALL)
    pctx, rep = prepare_context(ctx)
    assert rep.applied
    return x, ctx, pctx


CHEAPER = {"integrated_gradients": {"n_steps": 8}, "kernelshap": {"n_samples": 16}, "smoothgrad": {"n_samples": 8}}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_same_maps_on_the_prepared_model(name, small_setup):
    """Every registered method (its contract_params) on the default model at 64 px: the run's
    binding (bind_methods: the folded copy, or the loaded model for LRP) gives the maps of the
    model as loaded: Spearman >= 0.999 and close values."""
    x, ctx, _ = small_setup
    if name == "concept_maps":
        pytest.skip("concept_maps needs a factorisation file (tests/test_concepts.py)")
    spec = build_method(name, **(METHODS[name].contract_params | CHEAPER.get(name, {})))
    bound = bind_methods([(name, spec)], ctx)
    assert bound.fold_bn["applied"] == spec.prepared_model
    assert (bound.methods[name].model is ctx.model) == (not spec.prepared_model)
    if not spec.prepared_model:  # LRP family: bound to the model as loaded, as before (its own canonized copy)
        return
    torch.manual_seed(0)
    ref = spec.bind(ctx)(x, torch.tensor([281])).maps.float()
    torch.manual_seed(0)
    got = bound.methods[name](x, torch.tensor([281])).maps.float()
    assert got.shape == ref.shape and torch.isfinite(got).all()
    scale = float(ref.abs().max())
    if scale == 0:
        assert float(got.abs().max()) == 0
        return
    assert spearman(got, ref) >= 0.999, name
    assert float((got - ref).abs().max()) <= 2e-2 * scale, name


def test_fold_bn_false_and_run_yaml(tmp_path, monkeypatch):
    """A run records what was folded; fold_bn: false runs the loaded model (same maps). Also the
    run's chunker on CPU: inner loops capped at cpu_chunk (16 by default; null: the methods' own)."""
    from xaicli import explain_run
    from xaicli.config import build_config
    from xaicli.explain_run import run_explain
    from xaicli.outputs import read_run_yaml

    caps, make = [], explain_run.Chunker
    monkeypatch.setattr(explain_run, "Chunker", lambda **kw: caps.append(kw.get("cap")) or make(**kw))
    img = SAMPLES / "chelsea.png"
    res = {}
    for fold in (True, False):
        out = tmp_path / f"fold{fold}"
        over = {"input": [str(img)], "methods": "gradcam", "output": str(out), "fold_bn": fold, "device": "cpu"}
        cfg = build_config(None, over | ({} if fold else {"cpu_chunk": 4}))
        run_explain(cfg)
        res[fold] = read_run_yaml(out)["resolved"]["fold_bn"]
        res[f"map{fold}"] = torch.from_numpy(__import__("numpy").load(out / "gradcam" / "chelsea.npy"))
    assert res[True]["applied"] is True and res[True]["folded"] == 49
    assert res[False] == {"applied": False, "note": "fold_bn: false"}
    assert caps == [16, 4]
    torch.testing.assert_close(res["mapTrue"], res["mapFalse"], rtol=1e-3, atol=1e-4 * float(res["mapFalse"].max()))
