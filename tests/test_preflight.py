"""`xai check` / `xai explain --dry-run`: the preflight (model, weights, layers, labels, annotations)
and its cost estimate (issue #15 "Preflight", issue #16 "give xai check an estimate of the cost")."""

from __future__ import annotations

import json
import time

import pytest

from conftest import SAMPLES, TinyCNN, run_xai
from xaicli.config import build_config
from xaicli.methods import build_method, make_context
from xaicli.preflight import cost_of, preflight


def test_cost_expressions_follow_the_parameters():
    assert cost_of(build_method("saliency")) == (1, 1)
    assert cost_of(build_method("gradcam")) == (1, 0)  # head-only backward: negligible
    assert cost_of(build_method("integrated_gradients", n_steps=32)) == (34, 32)
    sg = build_method("smoothgrad", base="integrated_gradients", base_params={"n_steps": 4}, n_samples=10)
    assert cost_of(sg) == (1 + 10 * 6, 10 * 4)
    assert cost_of(build_method("rise", n_masks=100)) == (101, 0)
    assert cost_of(build_method("scorecam"), {"K": 8}) == (9, 0)


def test_every_registered_method_has_an_evaluable_cost(tiny_cnn):
    import dataclasses

    from xaicli.methods import METHODS
    from xaicli.preflight import _model_symbols

    ctx = dataclasses.replace(make_context(tiny_cnn, (32, 32)), mean=(0.5,) * 3, std=(0.25,) * 3)
    for name, cls in METHODS.items():
        spec = cls(**cls.contract_params) if cls.contract_params else cls()
        bound = spec.bind(ctx)
        f, b = cost_of(spec, _model_symbols(spec, bound, ctx))
        assert f >= 1 and b >= 0, name


@pytest.mark.slow
def test_preflight_reports_plan_layers_and_estimate(tmp_path):
    cfg = build_config(
        None, {"input": str(SAMPLES), "output": str(tmp_path / "o"), "methods": "gradcam,integrated_gradients"}
    )
    rep = preflight(cfg)
    assert (rep.images, rep.todo, rep.up_to_date) == (6, 6, 0)
    assert rep.exit_code == 0 and not rep.warnings and not rep.errors
    by = {m.key: m for m in rep.methods}
    assert by["gradcam"].layer == "bn2"
    assert (by["integrated_gradients"].forwards, by["integrated_gradients"].backwards) == (52, 50)
    assert rep.forward_s > 0 and rep.backward_s >= rep.forward_s
    ig = by["integrated_gradients"].seconds_per_image
    assert ig == pytest.approx(52 * rep.forward_s + 50 * rep.backward_s)
    assert rep.estimate_seconds == pytest.approx(6 * (ig + by["gradcam"].seconds_per_image))
    assert not (tmp_path / "o").exists()  # writes nothing


@pytest.mark.slow
def test_huge_n_samples_is_caught_before_the_night(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text(
        f"input: {SAMPLES}\noutput: {tmp_path / 'o'}\nmethods:\n  - name: smoothgrad\n    n_samples: 100000\n"
    )
    # 6 images x 100,001 (F + B): over 0.1 h wherever one F + B takes over 0.6 ms (any CPU; the
    # default 8 h budget is only exceeded on a slow or loaded machine, so the test sets its own)
    rep = preflight(build_config(conf), budget_hours=0.1)
    assert rep.exit_code == 1
    assert rep.methods[0].forwards == 100_001 and rep.estimate_seconds > 0.1 * 3600
    assert "exceeds the budget of 0.1 h" in rep.warnings[0] and "smoothgrad" in rep.warnings[0]
    assert preflight(build_config(conf), budget_hours=1e4).exit_code == 0  # the same under a large budget
    r = run_xai("check", "-c", conf, "--json", "--budget", "0.1")
    doc = json.loads(r.stdout)
    assert r.returncode == 1 and doc["exit_code"] == 1 and doc["estimate_seconds"] > 0.1 * 3600
    conf.write_text(conf.read_text().replace("100000", "1000000"))  # above the bound: a config error
    r = run_xai("check", "-c", conf)
    assert r.returncode == 2 and "n_samples" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_check_collects_layer_and_labels_problems(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("image,class\nchelsea.png,285\n")
    cfg = build_config(
        None,
        {"input": str(SAMPLES), "output": str(tmp_path / "o"), "methods": "gradcam,saliency", "target": str(labels)},
    )
    cfg.model.layer = "classifier"
    rep = preflight(cfg)
    assert rep.exit_code == 2
    assert any("method gradcam" in e and "not spatial" in e for e in rep.errors)
    assert rep.labels == {"file": str(labels), "listed": 1, "missing": 5, "fallback": "error"}
    assert any("lists 1 of the 6" in w for w in rep.warnings)


@pytest.mark.slow
def test_cli_check_and_dry_run_print_the_same_plan(tmp_path):
    r = run_xai("check", SAMPLES, "-m", "gradcam,saliency", "-o", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    for text in ("6 to do", "gradcam", "layer bn2", "estimate", "s/img"):
        assert text in r.stdout, text
    r2 = run_xai("explain", SAMPLES, "-m", "gradcam,saliency", "-o", tmp_path / "o", "--dry-run")
    assert r2.returncode == 0 and "estimate" in r2.stdout and "chelsea.png" in r2.stdout
    assert not (tmp_path / "o").exists()
    r3 = run_xai("explain", SAMPLES, "-o", tmp_path / "o", "--dry-run", "--json")
    doc = json.loads(r3.stdout)
    assert doc["dry_run"] and len(doc["todo"]) == 6 and doc["methods"][0]["layer"] == "bn2"


@pytest.mark.slow
def test_cli_check_offline_uncached_fails_in_seconds(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "t")}
    t0 = time.perf_counter()
    r = run_xai("check", SAMPLES, "--model", "timm:resnet10t", env=env)
    assert r.returncode == 2 and "HF_HUB_OFFLINE" in r.stderr
    assert time.perf_counter() - t0 < 30


def test_tiny_model_symbols():
    from xaicli.preflight import _model_symbols

    ctx = make_context(TinyCNN().eval(), (32, 32))
    spec = build_method("scorecam")
    assert _model_symbols(spec, spec.bind(ctx), ctx)["K"] == 8
    occ = build_method("occlusion", window=16, stride=8)
    assert _model_symbols(occ, occ.bind(ctx), ctx)["P"] == 9  # 3 x 3 positions on 32 px


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_check_on_cuda_times_the_device(tmp_path):
    cfg = build_config(None, {"input": str(SAMPLES), "output": str(tmp_path / "o"), "device": "cuda"})
    rep = preflight(cfg)
    assert rep.device.startswith("cuda") and rep.exit_code == 0
    assert 0 < rep.forward_s < 1 and rep.methods[0].layer == "bn2"
