"""Incremental runs: a new method or metric computes only what is new, display settings redraw the
PNGs from the stored maps (`xai render`), a refused config change names the keys that differ."""

import csv
import json
import shutil
import time

import numpy as np
import pytest
import yaml

from conftest import SAMPLES, run_xai
from xaicli.config import build_config
from xaicli.errors import ConfigError
from xaicli.explain_run import RunOptions, run_explain


def cfg(imgs, out, **kw):
    return build_config(None, {"input": str(imgs), "output": str(out), "workers": 0, **kw})


@pytest.fixture
def two(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for n in ("chelsea.png", "coffee.png"):
        shutil.copy(SAMPLES / n, d / n)
    return d


def stamps(out, method):
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / method).iterdir())}


def rows(out, name="explanations.csv"):
    with open(out / name, newline="") as f:
        return list(csv.DictReader(f))


def events(out, kind):
    return [e for e in map(json.loads, (out / "xai-log.jsonl").read_text().splitlines()) if e["event"] == kind]


def test_adding_a_method_computes_only_that_method(two, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_explain(cfg(two, out, methods="gradcam"))
    before = stamps(out, "gradcam")
    calls = []
    import xaicli.engine as engine

    real = engine.run_method

    def counting(key, bound, x, target, chunker):
        calls.append((key, x.shape[0]))
        return real(key, bound, x, target, chunker)

    monkeypatch.setattr(engine, "run_method", counting)
    time.sleep(0.01)
    s = run_explain(cfg(two, out, methods="gradcam,saliency"))
    assert calls == [("saliency", 2)]  # gradcam was not run again
    assert s.added == ["saliency"] and set(s.method_seconds) == {"saliency"}
    assert stamps(out, "gradcam") == before  # its files untouched
    table = rows(out)
    assert sorted((r["image"], r["method"]) for r in table) == [
        ("chelsea", "gradcam"),
        ("chelsea", "saliency"),
        ("coffee", "gradcam"),
        ("coffee", "saliency"),
    ]
    assert (out / "saliency" / "coffee.npy").is_file() and events(out, "methods_added")[-1]["methods"] == ["saliency"]
    # and the next run has nothing to do
    calls.clear()
    assert run_explain(cfg(two, out, methods="gradcam,saliency")).done == 0 and calls == []
    # one image changed: only it is redone, with both methods
    import os

    os.utime(two / "coffee.png", ns=(1, 1))
    run_explain(cfg(two, out, methods="gradcam,saliency"))
    assert calls == [("gradcam", 1), ("saliency", 1)]


def test_refused_changes_name_the_keys(two, tmp_path):
    out = tmp_path / "out"
    run_explain(cfg(two, out, methods="gradcam,saliency"))
    for kw, key in [
        ({"methods": [{"name": "gradcam", "counterfactual": True}, "saliency"]}, "methods[gradcam]"),
        ({"methods": "gradcam"}, "methods[saliency] (removed)"),
        ({"methods": "gradcam,saliency", "target": 285}, "target"),
        ({"methods": "gradcam,saliency", "model.weights": "none", "model.name": "timm:resnet18"}, "model.name"),
    ]:
        with pytest.raises(
            ConfigError,
            match=r"different config.*changed: .*"
            + key.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)"),
        ):
            run_explain(cfg(two, out, **kw))
    run_explain(cfg(two, out, methods="gradcam", target=285), options=RunOptions(force=True))  # --force replaces
    assert {r["target_class"] for r in rows(out)} == {"285"}


def test_old_run_yaml_without_parts_is_refused_with_names(two, tmp_path):
    out = tmp_path / "out"
    run_explain(cfg(two, out, methods="saliency"))
    doc = yaml.safe_load((out / "run.yaml").read_text())
    del doc["hashes"]  # as an earlier version wrote it
    (out / "run.yaml").write_text(yaml.safe_dump(doc))
    assert run_explain(cfg(two, out, methods="saliency")).done == 0  # same config: resumes
    doc = yaml.safe_load((out / "run.yaml").read_text())
    assert "hashes" in doc  # and gains the parts
    del doc["hashes"]
    (out / "run.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="changed: target"):
        run_explain(cfg(two, out, methods="saliency", target=1))


def test_display_change_redraws_without_recomputing(two, tmp_path):
    out = tmp_path / "out"
    run_explain(cfg(two, out, methods="gradcam"))
    npy = (out / "gradcam" / "chelsea.npy").stat().st_mtime_ns
    png = (out / "gradcam" / "chelsea.png").read_bytes()
    s = run_explain(cfg(two, out, methods="gradcam", colormap="viridis"))
    assert s.done == 0 and s.redrawn == 2 and not s.method_seconds
    assert (out / "gradcam" / "chelsea.npy").stat().st_mtime_ns == npy
    assert (out / "gradcam" / "chelsea.png").read_bytes() != png
    from PIL import Image

    from xaicli.outputs import overlay
    from xaicli.reader import RunFolder

    run = RunFolder(out)
    img = np.asarray(Image.open(two / "chelsea.png").convert("RGB"))
    from xaicli import load_model

    box = load_model("default").preprocess.crop_box(img.shape[1], img.shape[0])
    want = overlay(img, run.load_map("gradcam", "chelsea"), box, "viridis", 0.5)
    assert np.array_equal(
        np.asarray(Image.open(out / "gradcam" / "chelsea.png")), want
    )  # the same as a fresh run draws
    assert run_explain(cfg(two, out, methods="gradcam", colormap="viridis")).redrawn == 0  # recorded in run.yaml


def test_xai_render_changes_the_colormap_in_seconds(two, tmp_path):
    out = tmp_path / "out"
    run_explain(cfg(two, out, methods="gradcam,saliency"))
    npys = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    pngs = {p: p.read_bytes() for p in out.rglob("*.png")}
    t0 = time.perf_counter()
    r = run_xai("render", out, "--colormap", "magma", "--caption")
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert "redrew 4 map(s) of 2 image(s)" in r.stdout
    assert wall < 30  # the whole command incl. Python start-up; the redraw itself is well under a second
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")} == npys  # nothing recomputed
    assert all(p.read_bytes() != b for p, b in pngs.items())
    doc = yaml.safe_load((out / "run.yaml").read_text())
    assert doc["config"]["colormap"] == "magma" and doc["config"]["overlay"]["caption"] is True
    # a config with the new settings resumes the folder: nothing to do, nothing to redraw
    s = run_explain(cfg(two, out, methods="gradcam,saliency", colormap="magma", overlay={"caption": True}))
    assert s.done == 0 and s.redrawn == 0
    bad = run_xai("render", out, "--colormap", "not_a_map")
    assert bad.returncode == 2 and "colormap" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_adding_a_metric_scores_only_the_new_metric(two, tmp_path):
    out = tmp_path / "out"
    run_explain(cfg(two, out, methods="gradcam", metrics="deletion"))
    first = {(r["image"], r["metric"]): r["value"] for r in rows(out, "metrics.csv")}
    s = run_explain(cfg(two, out, methods="gradcam", metrics="deletion,insertion"))
    assert s.done == 0 and s.backfilled == {"insertion": 2}
    now = {(r["image"], r["metric"]): r["value"] for r in rows(out, "metrics.csv")}
    assert {k: v for k, v in now.items() if k[1] == "deletion"} == first
    assert {k for k in now if k[1] == "insertion"} == {("chelsea", "insertion"), ("coffee", "insertion")}
    assert run_explain(cfg(two, out, methods="gradcam", metrics="deletion,insertion")).backfilled == {}


def test_render_display_settings_from_a_config_or_flags(tmp_path):
    from xaicli.render import display_overrides

    c = tmp_path / "c.yaml"
    c.write_text("alpha: 0.3\noverlay: {caption: true}\ninput: x\n")
    # a config gives all display settings (defaults for those it leaves out); flags go on top
    assert display_overrides(c, {"colorbar": True}) == {
        "colormap": "jet",
        "alpha": 0.3,
        "overlay": {"caption": True, "colorbar": True},
    }
    # without a config the run's overlay section is kept and the flags change it
    run = {"colormap": "magma", "overlay": {"caption": True, "clip_percentile": 99.0}}
    assert display_overrides(None, {"alpha": 0.7, "caption": None}, run) == {
        "alpha": 0.7,
        "overlay": {"caption": True, "clip_percentile": 99.0},
    }
