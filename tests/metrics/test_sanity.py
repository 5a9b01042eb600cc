"""Cascading randomization: correlation falls for Grad-CAM, stays 1 for a model-independent map."""

from dataclasses import dataclass

import pytest
import torch
from scipy.stats import spearmanr

from conftest import TinyCNN, bind
from xaicli.hooks import count_hooks
from xaicli.methods import build_method
from xaicli.methods.base import BoundMethod, MethodSpec, Result
from xaicli.metrics import build_metric
from xaicli.metrics.sanity import average_ranks, layer_groups, spearman


def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 200), generator=g).float()  # many ties
    b = a + torch.randint(0, 3, (3, 200), generator=g).float()
    got = spearman(a, b)
    for i in range(3):
        assert got[i].item() == pytest.approx(spearmanr(a[i], b[i]).statistic, abs=1e-5)
    assert average_ranks(torch.tensor([[3.0, 1.0, 3.0, 2.0]])).tolist() == [[3.5, 1.0, 3.5, 2.0]]
    assert spearman(torch.ones(1, 10), torch.arange(10.0)[None]).item() == 0.0  # constant: no information


def test_groups_run_from_the_logits_down():
    m = TinyCNN()
    groups = layer_groups(m, torch.zeros(1, 3, 8, 8), depth=2)
    assert [g for g, _ in groups] == ["fc", "features.2", "features.0"]


class BoundBrightness(BoundMethod):
    def compute(self, x, target):
        return Result(x.sum(1))


@dataclass
class Brightness(MethodSpec):
    """A 'method' that ignores the model: the map is the image's brightness."""

    bound = BoundBrightness


def run_sanity(method):
    model = TinyCNN(width=16, seed=1).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 32, 32, generator=g)
    bound = bind(method, model, (32, 32))
    maps = bound(x).maps
    target = model(x).argmax(1)
    metric = build_metric("sanity")
    res = metric(model, x, maps, target, method=bound)
    table = res.table
    # the user's model is untouched and carries no hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert count_hooks(model) == 0
    by_step = {}
    for r in table:
        by_step.setdefault(r["step"], []).append(float(r["spearman_abs"]))
    return res, {s: sum(v) / len(v) for s, v in sorted(by_step.items())}


def test_gradcam_correlation_falls_as_layers_are_randomized():
    res, curve = run_sanity(build_method("gradcam"))
    assert list(curve) == [0, 1, 2, 3]
    assert curve[0] == pytest.approx(1.0)  # the copy reproduces the map before randomization
    assert max(curve[s] for s in (1, 2, 3)) < 0.9
    assert curve[3] < 0.5
    assert res["sanity"].shape == (4,) and res["sanity"].mean() < 0.5


def test_model_independent_map_fails_the_check():
    res, curve = run_sanity(Brightness())
    assert all(v == pytest.approx(1.0) for v in curve.values())
    assert torch.allclose(res["sanity"], torch.ones(4))


@pytest.mark.slow
def test_gradcam_on_the_default_model(default_model, sample_batch):
    meth = bind(build_method("gradcam"), default_model)
    x = sample_batch[:1]
    maps = meth(x).maps
    metric = build_metric("sanity", depth=1)
    res = metric(default_model.model, x, maps, torch.tensor([282]), method=meth)
    rows = res.table
    assert [r["layer"] for r in rows][:3] == ["(none)", "classifier", "bn2"]
    assert float(rows[0]["spearman_abs"]) == pytest.approx(1.0)
    assert abs(res["sanity"].item()) < 0.5
