"""Contract tests over the registries: every registered method and metric gets these by registering.

Methods (on a tiny CNN, and on a tiny ViT where they apply; default parameters except a method's
declared `contract_params`, which make costly loops short): shape, dtype, device, finite values;
image i's map does not depend on the other images of the batch; the chunk size of inner loops
does not change the result; no hook left behind; the model's parameters, buffers and module
types unchanged; the spec pickles; only declared extras come back.
Metrics (on a model whose relevant region is known): values within the declared range, and the
oracle map scores at least as well as an anti-oracle map in the metric's declared direction.
"""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from conftest import TinyCNN
from xaicli.errors import MethodError
from xaicli.hooks import count_hooks
from xaicli.methods import METHODS, build_method, make_context
from xaicli.metrics import METRICS, build_metric
from xaicli.ops import Chunker

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def context(model, size, chunker=None):
    ctx = make_context(model, size, chunker=chunker)
    ctx.mean, ctx.std = IMAGENET
    return ctx


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.named_parameters()},
        {k: v.detach().clone() for k, v in model.named_buffers()},
        [(n, type(m)) for n, m in model.named_modules()],
    )


def same(a, b) -> bool:
    (pa, ba, ta), (pb, bb, tb) = a, b
    return (
        pa.keys() == pb.keys()
        and all(torch.equal(pa[k], pb[k]) for k in pa)
        and all(torch.equal(ba[k], bb[k]) for k in ba)
        and ta == tb
    )


def tiny_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=5,
    ).eval()


MODELS = {"cnn": (lambda: TinyCNN(width=8).eval(), (16, 16)), "vit": (tiny_vit, (32, 32))}


def check_method(name: str, model_kind: str):
    make, size = MODELS[model_kind]
    model = make()
    before = snapshot(model)
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1))
    # default parameters, except the few a costly method declares in `contract_params` (e.g.
    # RISE's 4000 masks -> 48): the contract is about shapes, batching and chunking, not quality
    spec = build_method(name, **METHODS[name].contract_params)
    try:
        bound = spec.bind(context(model, size))
        res = bound(x)
    except MethodError:
        assert model_kind == "vit", f"{name} refused the CNN"  # a clear refusal, only where it does not apply
        assert count_hooks(model) == 0 and same(before, snapshot(model))
        return
    k = (len(spec.map_names),) if spec.map_names else ()
    assert res.maps.shape == (3, *k, *size)
    assert res.maps.dtype == torch.float32 and res.maps.device == x.device
    assert torch.isfinite(res.maps).all()
    assert set(res.extras) <= set(spec.extras)
    for v in res.extras.values():
        assert v.shape == (3,)
    # image i's map does not depend on the other images in the batch (a target given, so the
    # same class is explained both ways)
    t = res.target if res.target is not None else model(x).argmax(1)
    alone = torch.cat([bound(x[i : i + 1], t[i : i + 1]).maps for i in range(3)])
    assert torch.allclose(bound(x, t).maps, alone, rtol=1e-4, atol=1e-5), "the batch changes an image's map"
    # the chunk size of inner loops does not change the result
    fields = {f.name for f in dataclasses.fields(spec)}
    if "internal_batch" in fields:
        one = dataclasses.replace(spec, internal_batch=1).bind(context(model, size))(x, t).maps
        assert torch.allclose(one, res.maps, rtol=1e-4, atol=1e-5), "internal_batch changes the map"
    # an out-of-memory chunker that starts at 1 item changes nothing either
    small = Chunker(cap=1)
    assert torch.allclose(spec.bind(context(model, size, small))(x, t).maps, res.maps, rtol=1e-4, atol=1e-5)
    assert count_hooks(model) == 0
    assert same(before, snapshot(model)), "the method changed the model"
    assert pickle.loads(pickle.dumps(spec)) == spec


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract_on_a_cnn(name):
    check_method(name, "cnn")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract_on_a_vit(name):
    check_method(name, "vit")


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
N = 128  # big enough that every default step size gives several curve points
BOX = (32, 64, 64, 96)  # rows 32..63, cols 64..95: the only pixels the model reads


class BigSquare(torch.nn.Module):
    """logit_0 = 4 * mean(x inside BOX) - 2; logit_1 = 0 (like metrics/conftest.SquareModel, at 128 px)."""

    def forward(self, x):
        inside = x[:, :, BOX[0] : BOX[1], BOX[2] : BOX[3]].mean(dim=(1, 2, 3))
        return torch.stack([4 * inside - 2, torch.zeros_like(inside)], dim=1)


def square_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(2, 3, N, N)
    x[:, :, BOX[0] : BOX[1], BOX[2] : BOX[3]] = 1.5 + 0.2 * torch.rand(2, 3, 32, 32, generator=g)
    return x, torch.zeros(2, dtype=torch.long)


def oracle(b: int = 2):
    m = torch.zeros(b, N, N)
    m[:, BOX[0] : BOX[1], BOX[2] : BOX[3]] = 1.0
    return m


def anti_map(b: int = 2):
    """Relevance rising with the distance from the square's centre: peaks in a far corner."""
    r = torch.arange(N, dtype=torch.float32)[:, None] - (BOX[0] + BOX[1] - 1) / 2
    c = torch.arange(N, dtype=torch.float32)[None, :] - (BOX[2] + BOX[3] - 1) / 2
    return (r**2 + c**2).sqrt().expand(b, N, N).clone()


SQUARE_BOX = torch.tensor([[float(BOX[2]), float(BOX[0]), float(BOX[3]), float(BOX[1])]])


def score(metric, maps, reference=None):
    x, t = square_batch()
    extras = {}
    if "boxes" in metric.needs:
        extras["boxes"] = [SQUARE_BOX] * x.shape[0]
    if "reference" in metric.needs:
        extras["reference"] = reference
    return metric(BigSquare(), x, maps, t, **extras)


def params_for(name: str) -> dict:
    cls = METRICS[name]
    return {"against": "other"} if "reference" in cls.needs else {}


@pytest.mark.parametrize("name", sorted(n for n, c in METRICS.items() if "method" not in c.needs))
def test_metric_direction_and_range(name):
    metric = build_metric(name, **params_for(name))
    good = score(metric, oracle(), reference=anti_map())
    bad = score(metric, anti_map(), reference=oracle())
    lo, hi = metric.value_range
    for res in (good, bad):
        assert set(res) >= {name}
        for v in res.values():
            assert v.shape == (2,) and torch.isfinite(v).all()
            assert ((v >= lo - 1e-6) & (v <= hi + 1e-6)).all(), f"{name} left its range {metric.value_range}: {v}"
    g, b = float(good[name].mean()), float(bad[name].mean())
    if g == b:  # a tie says nothing about direction; allowed only at a bound of the range (increase: 0 and 0)
        assert g in (lo, hi), f"{name}: oracle and anti-oracle maps score the same ({g})"
    elif metric.direction == "higher":
        assert g >= b, f"{name}: the oracle map ({g}) should score at least the anti-oracle ({b})"
    else:
        assert g <= b, f"{name}: the oracle map ({g}) should score at most the anti-oracle ({b})"
    for curve in good.curves.values():
        assert curve.y.shape[0] == 2 and len(curve.x) == curve.y.shape[1]


@pytest.mark.parametrize("name", sorted(n for n, c in METRICS.items() if "method" in c.needs))
def test_method_metric_direction_and_range(name):
    """Metrics that recompute maps (sanity): a model-dependent method scores better than a map
    that ignores the model (whose maps never change: correlation 1)."""
    from metrics.test_sanity import Brightness

    model = TinyCNN(width=16, seed=1).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    t = model(x).argmax(1)
    metric = build_metric(name)
    lo, hi = metric.value_range
    out = {}
    for label, spec in (("model", build_method("gradcam")), ("blind", Brightness())):
        bound = spec.bind(context(model, (32, 32)))
        res = metric(model, x, bound(x, t).maps, t, method=bound)
        v = res[name]
        assert torch.isfinite(v).all() and ((v >= lo - 1e-6) & (v <= hi + 1e-6)).all()
        out[label] = float(v.mean())
    better = out["model"] < out["blind"] if metric.direction == "lower" else out["model"] > out["blind"]
    assert better, out


@pytest.mark.parametrize("name", sorted(n for n, c in METRICS.items() if "method" not in c.needs))
def test_metric_scores_do_not_depend_on_the_batch(name):
    """An image's scores are the same in a batch and alone (seeded substrates such as `uniform`
    are drawn per call, not per batch position)."""
    metric = build_metric(name, **params_for(name))
    x, t = square_batch()
    maps, ref = torch.stack([oracle(1)[0], anti_map(1)[0]]), torch.stack([anti_map(1)[0], oracle(1)[0]])

    def run(idx):
        extras = {}
        if "boxes" in metric.needs:
            extras["boxes"] = [SQUARE_BOX] * len(idx)
        if "reference" in metric.needs:
            extras["reference"] = ref[idx]
        return metric(BigSquare(), x[idx], maps[idx], t[idx], **extras)

    both = run([0, 1])
    alone = [run([i]) for i in (0, 1)]
    for key, v in both.scores.items():
        got = torch.cat([a.scores[key] for a in alone])
        assert torch.allclose(v.double(), got.double(), rtol=1e-5, atol=1e-6, equal_nan=True), (key, v, got)
