"""The engine contract: declared outputs, K named maps, objectives, the reader and manifest, path
parameters, the chunker, and regression tests for the defects fixed with the engine (#9)."""

from __future__ import annotations

import ast
import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, SAMPLES, TinyCNN, bind
from xaicli.config import build_config
from xaicli.errors import LockedError
from xaicli.explain_run import run_explain
from xaicli.methods import METHODS, BoundMethod, MethodSpec, Result, build_method, register
from xaicli.ops import Chunker, normalize01


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def one_image(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    shutil.copy(SAMPLES / "coffee.png", d / "coffee.png")
    return d


# --------------------------------------------------------------------------------------------
# a method registered by a test: K named maps and a declared extra reach the files
# --------------------------------------------------------------------------------------------
class BoundSigned(BoundMethod):
    def compute(self, x, target):
        g = x.mean(1)
        with torch.no_grad():
            logits = self.model(x)
        return Result(
            torch.stack([g.clamp(min=0), (-g).clamp(min=0)], 1), logits, None, {"area": (g > 0).float().mean((1, 2))}
        )


@dataclass
class Signed(MethodSpec):
    bound = BoundSigned
    map_names = ("pos", "neg")
    extras = {"area": "share of pixels with a positive mean"}


@pytest.fixture
def signed_method():
    register("signed_test", "test only: positive and negative parts of the channel mean")(Signed)
    yield "signed_test"
    METHODS.pop("signed_test")


def test_named_maps_and_declared_extras_reach_the_output(signed_method, one_image, tmp_path):
    out = tmp_path / "o"
    cfg = build_config(
        None, {"input": str(one_image), "output": str(out), "methods": "signed_test,gradcam", "workers": 0}
    )
    s = run_explain(cfg)
    assert s.done == 1 and s.exit_code == 0
    table = rows(out / "explanations.csv")
    assert list(table[0])[12] == "area"  # declared extra, before path/size/mtime_ns
    by = {r["method"]: r for r in table}
    assert 0 < float(by["signed_test"]["area"]) < 1 and by["gradcam"]["area"] == ""
    assert "delta" not in table[0]  # only the run's methods' extras are columns
    for name in ("pos", "neg"):
        m = np.load(out / "signed_test" / "coffee" / f"{name}.npy")
        assert m.shape == (224, 224) and (out / "signed_test" / "coffee" / f"{name}.png").is_file()
    from xaicli.reader import RunFolder

    run = RunFolder(out)
    assert run.methods == {"signed_test": ("pos", "neg"), "gradcam": ()}
    assert run.load_map("signed_test", "coffee").shape == (2, 224, 224)
    assert run.load_map("gradcam", "coffee").shape == (224, 224)
    man = run.manifest()
    assert man["status"] == "done" and man["maps"]["signed_test"]["ok"] == 1 and "explanations.csv" in man["files"]
    # resume: nothing to redo; a missing named map makes the image stale again
    assert run_explain(cfg).skipped == 1
    (out / "signed_test" / "coffee" / "neg.npy").unlink()
    assert run_explain(cfg).done == 1


def test_undeclared_extras_are_refused(tiny_cnn):
    class Bad(BoundMethod):
        def compute(self, x, target):
            return Result(x.mean(1), extras={"surprise": x.mean((1, 2, 3))})

    @dataclass
    class BadSpec(MethodSpec):
        bound = Bad

    with pytest.raises(Exception, match="undeclared extras"):
        bind(BadSpec(), tiny_cnn)(torch.randn(1, 3, 16, 16))


# --------------------------------------------------------------------------------------------
# objectives
# --------------------------------------------------------------------------------------------
def test_counterfactual_gradcam_is_the_negated_objective(tiny_cnn):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([1, 2])
    cf = bind(build_method("gradcam", counterfactual=True), tiny_cnn)(x, t).maps
    neg = bind(build_method("gradcam", objective="neg_logit"), tiny_cnn)(x, t).maps
    plain = bind(build_method("gradcam"), tiny_cnn)(x, t).maps
    assert torch.allclose(cf, neg) and not torch.allclose(cf, plain)


def test_prob_objective_is_the_softmax_gradient(tiny_cnn):
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(4), requires_grad=True)
    t = torch.tensor([3])
    (g,) = torch.autograd.grad(torch.softmax(tiny_cnn(x), 1)[0, 3], x)
    got = bind(build_method("saliency", objective="prob"), tiny_cnn)(x.detach(), t).maps
    assert torch.allclose(got, g.abs().amax(1), atol=1e-7)


def test_unknown_objective_is_a_one_line_error():
    from xaicli.errors import MethodError

    with pytest.raises(MethodError, match="unknown objective 'nope' .*logit"):
        build_method("gradcam", objective="nope")


# --------------------------------------------------------------------------------------------
# chunker
# --------------------------------------------------------------------------------------------
def test_inner_loops_halve_on_oom_before_the_outer_batch(tiny_cnn):
    """IG's path points: an OOM above 3 points per chunk halves the inner chunk (64 -> ... -> 2);
    the outer batch is never split and the map equals an unconstrained run."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    ref = bind(build_method("integrated_gradients", baseline="mean", n_steps=8), tiny_cnn)(x).maps
    real = tiny_cnn.forward
    calls = []

    def tight(inp):
        calls.append(inp.shape[0])
        if inp.requires_grad and inp.shape[0] > 3:  # path points (the clean F(x), F(x') pass is no_grad)
            raise torch.OutOfMemoryError("simulated")
        return real(inp)

    tiny_cnn.forward = tight
    chunker = Chunker()
    got = bind(build_method("integrated_gradients", baseline="mean", n_steps=8), tiny_cnn, chunker=chunker)(x).maps
    parts = chunker.split("outer", 2, lambda s, e: e - s)
    assert torch.allclose(got, ref, atol=1e-6)
    assert [v for (name, _), v in chunker.sizes.items() if name == "integrated_gradients"] == [2]
    assert chunker.events == 3  # 16 points: 16 -> 8 -> 4 -> 2
    assert parts == [(2, 2)]  # the outer batch was never touched
    assert max(c for c in calls[1:]) <= 16


# --------------------------------------------------------------------------------------------
# path parameters: rebased like every config path and covered by the config hash
# --------------------------------------------------------------------------------------------
def test_ig_image_baseline_is_rebased_and_hashed(tmp_path):
    from xaicli.state import config_hash

    d = tmp_path / "cfgdir"
    d.mkdir()
    base = d / "gray.png"
    Image.new("RGB", (32, 32), (128, 128, 128)).save(base)
    cfg_file = d / "run.yaml"
    cfg_file.write_text(
        "input: ../imgs\nmethods:\n  - {name: integrated_gradients, baseline: gray.png, n_steps: 2}\n"
        "  - {name: smoothgrad, base: integrated_gradients, base_params: {baseline: gray.png}}\n"
    )
    (tmp_path / "imgs").mkdir()
    cfg = build_config(cfg_file)  # validated from another working directory: the path is the config's
    assert cfg.methods[0].params["baseline"] == str(d / "gray.png")
    assert cfg.methods[1].params["base_params"]["baseline"] == str(d / "gray.png")
    h1 = config_hash(cfg)
    Image.new("RGB", (32, 32), (0, 0, 0)).save(base)  # same path, new content
    import os

    os.utime(base, ns=(1, 1))
    assert config_hash(build_config(cfg_file)) != h1


# --------------------------------------------------------------------------------------------
# the output folder reader and the manifest
# --------------------------------------------------------------------------------------------
def test_reader_reads_what_explain_wrote(one_image, tmp_path):
    from xaicli.reader import RunFolder

    out = tmp_path / "o"
    methods = [{"name": "gradcam"}, {"name": "integrated_gradients", "n_steps": 2}]
    run_explain(build_config(None, {"input": str(one_image), "output": str(out), "methods": methods, "workers": 0}))
    run = RunFolder(out)
    assert [m.key for m in run.config.methods] == ["gradcam", "integrated_gradients"]
    assert run.resolved["layers"] == {"gradcam": "bn2"} and run.versions["torch"]
    latest = run.latest()
    assert set(latest["coffee"]) == {"gradcam", "integrated_gradients"}
    assert latest["coffee"]["integrated_gradients"]["delta"] != ""
    m = run.load_map("gradcam", "coffee")
    assert m.dtype == np.float32 and m.shape == (224, 224)
    assert float(latest["coffee"]["gradcam"]["map_max"]) == pytest.approx(float(m.max()), rel=1e-5)
    assert run.errors() == [] and run.metrics() == []
    with pytest.raises(Exception, match="no run.yaml"):
        RunFolder(one_image)


# --------------------------------------------------------------------------------------------
# defects fixed on the way (regression tests)
# --------------------------------------------------------------------------------------------
def test_load_image_leaves_pils_bomb_guard_alone(tmp_path):
    from xaicli.data import load_image

    before = Image.MAX_IMAGE_PIXELS
    assert before is not None
    p = tmp_path / "a.png"
    Image.new("RGB", (20, 10)).save(p)
    load_image(p)
    assert Image.MAX_IMAGE_PIXELS == before


def test_overlay_and_avg_drop_agree_on_a_constant_map():
    """A constant positive map means 'everything matters': all ones for the overlay (the top colour
    over the whole crop) and for avg-drop's mask (the image kept as is: no drop)."""
    from xaicli.metrics import build_metric
    from xaicli.outputs import colormap_lut, overlay

    cam = np.full((8, 8), 0.7, dtype=np.float32)
    assert torch.equal(normalize01(torch.from_numpy(cam)[None])[0], torch.ones(8, 8))
    orig = np.zeros((8, 8, 3), dtype=np.uint8)
    img = overlay(orig, cam, (0, 0, 8, 8), "jet", alpha=1.0)
    assert (img == colormap_lut("jet")[255]).all()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    res = build_metric("avg-drop")(TinyCNN().eval(), x, torch.full((2, 16, 16), 0.7), torch.tensor([0, 1]))
    assert torch.allclose(res["avg-drop"], torch.zeros(2), atol=1e-4)


def test_evaluate_beside_a_running_explain_is_refused_and_keeps_its_partial_metrics(one_image, tmp_path):
    from xaicli.evaluate import run_evaluate
    from xaicli.locks import OutputLock

    out = tmp_path / "o"
    run_explain(build_config(None, {"input": str(one_image), "output": str(out), "workers": 0}))
    partial = out / ".metrics-partial.csv"
    partial.write_text("image,method,metric,value\ncoffee,gradcam,deletion,0.25\n")
    with OutputLock(out):  # an `xai explain --metrics` holding the folder
        with pytest.raises(LockedError, match="in use by another xai run"):
            run_evaluate(out, "deletion")
    assert "0.25" in partial.read_text()
    # once free: the rows a dead run left behind are merged, not deleted
    res = run_evaluate(out, "avg-drop")
    assert not partial.exists() and res.images == 1
    got = {(r["metric"]): r["value"] for r in rows(out / "metrics.csv")}
    assert got["deletion"] == "0.25" and "avg-drop" in got


def test_ctrl_c_during_evaluate_exits_130(one_image, tmp_path, monkeypatch, capsys):
    from xaicli.cli import main
    from xaicli.metrics.faithfulness import AvgDrop

    out = tmp_path / "o"
    run_explain(build_config(None, {"input": str(one_image), "output": str(out), "workers": 0}))

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(AvgDrop, "compute", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(out), "--metric", "avg-drop", "--quiet"])
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Aborted" not in err
    assert not (out / ".xai.lock").read_text().strip()  # the lock was released


# --------------------------------------------------------------------------------------------
# structure: imports go downward only; the engine's functions stay short
# --------------------------------------------------------------------------------------------
LAYERS = [  # bottom to top, as drawn in docs/architecture.md
    {"_version", "errors", "ops", "hooks", "images", "objectives", "locks", "registry", "progress", "nmf"},
    {"models"},
    {"outputs", "data"},
    {"methods"},
    {"metrics"},
    {"config"},
    {"state"},
    {"engine", "reader"},
    {"sinks", "ray_engine"},
    {"explain_run", "evaluate", "report", "concepts", "preflight", "render"},
    {"cli", "__init__", "__main__", "catalog"},
]


def _layer(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, group in enumerate(LAYERS) if top in group)


def _imports(path: Path) -> set[str]:
    """xaicli modules a file imports (top level and inside functions)."""
    pkg = path.relative_to(ROOT / "xaicli").with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(pkg[:-1])[: len(pkg) - node.level]
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target or node.names[0].name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("xaicli."):
            found.add(node.module.removeprefix("xaicli."))
    return {f for f in found if f}


def test_imports_only_go_down_the_layers():
    bad = []
    for f in sorted((ROOT / "xaicli").rglob("*.py")):
        me = ".".join(f.relative_to(ROOT / "xaicli").with_suffix("").parts)
        for target in _imports(f):
            if _layer(target) > _layer(me):
                bad.append(f"{me} -> {target}")
    assert not bad, "imports that go up a layer (see docs/architecture.md): " + ", ".join(bad)


@pytest.mark.parametrize("module", ["engine.py", "sinks.py", "explain_run.py", "evaluate.py"])
def test_engine_functions_stay_short(module):
    tree = ast.parse((ROOT / "xaicli" / module).read_text())
    long = [
        f"{n.name}: {n.end_lineno - n.lineno + 1} lines"
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 50
    ]
    assert not long, long


def test_the_api_names_are_not_shadowed_by_modules():
    """`xaicli.explain` (the function) must survive the wiring modules being imported."""
    import xaicli
    import xaicli.evaluate  # noqa: F401
    import xaicli.explain_run  # noqa: F401
    from xaicli import explain, run

    assert callable(explain) and callable(run) and callable(xaicli.explain)
