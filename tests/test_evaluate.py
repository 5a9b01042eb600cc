"""`xai evaluate` and `xai explain --metrics`: same numbers, documented files, one-line errors."""

import csv
import math
import shutil

import pytest
import yaml
from PIL import Image

from conftest import SAMPLES, run_xai

METRICS_CFG = [
    {"name": "deletion", "step": 0.25},
    {"name": "insertion", "step": 0.25},
    "avg-drop",
    "increase",
    {"name": "aopc", "regions": 4},
    {"name": "win", "against": "saliency"},
]


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def values(path):
    return {(r["image"], r["method"], r["metric"]): float(r["value"]) for r in rows(path)}


@pytest.fixture
def two_images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for n in ("chelsea.png", "coffee.png"):
        shutil.copy(SAMPLES / n, d / n)
    return d


@pytest.mark.slow
def test_evaluate_matches_explain_metrics(two_images, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump({"input": "imgs", "output": "plain", "methods": ["gradcam", "saliency"], "metrics": METRICS_CFG})
    )
    # one run computes the metrics in the batch loop ...
    a = run_xai("explain", "--config", cfg, "--out", tmp_path / "with", "--workers", "0")
    assert a.returncode == 0, a.stderr
    assert "deletion" in a.stdout and "lower" in a.stdout  # the summary table
    # ... the other only explains (no metrics), then `xai evaluate --config` finds it via `output:`
    b = run_xai("explain", "--config", cfg, "--metrics", "", "--workers", "0", "--quiet")
    assert b.returncode == 0, b.stderr
    assert not (tmp_path / "plain" / "metrics.csv").exists()
    assert rows(tmp_path / "plain" / "explanations.csv")[0]["path"] == str(two_images / "chelsea.png")
    e = run_xai("evaluate", "--config", cfg)
    assert e.returncode == 0, e.stderr
    va, vb = values(tmp_path / "with" / "metrics.csv"), values(tmp_path / "plain" / "metrics.csv")
    expected = {
        (img, m, k)
        for img in ("chelsea", "coffee")
        for m in ("gradcam", "saliency")
        for k in ("deletion", "insertion", "avg-drop", "increase", "aopc", "win")
        if not (k == "win" and m == "saliency")
    }
    assert set(va) == set(vb) == expected
    for k in va:
        assert abs(va[k] - vb[k]) <= 1e-6, (k, va[k], vb[k])
    assert all(0 <= va[(i, m, k)] <= 1 for (i, m, k) in va if k in ("deletion", "insertion"))
    assert all(va[k] in (0.0, 100.0) for k in va if k[2] in ("increase", "win"))

    # summary = mean/std/n of metrics.csv; one curve PNG per curve metric with both methods
    for out in ("with", "plain"):
        summ = {(r["method"], r["metric"]): r for r in rows(tmp_path / out / "metrics_summary.csv")}
        d = [va[("chelsea", "gradcam", "deletion")], va[("coffee", "gradcam", "deletion")]]
        assert math.isclose(float(summ[("gradcam", "deletion")]["mean"]), sum(d) / 2, abs_tol=1e-6)
        assert int(summ[("gradcam", "deletion")]["n"]) == 2
        for metric in ("deletion", "insertion", "aopc"):
            with Image.open(tmp_path / out / f"metrics_{metric}.png") as im:
                assert im.size[0] > 300 and im.size[1] > 200
        curves = rows(tmp_path / out / "metrics_curves.csv")
        assert {(r["metric"], r["method"]) for r in curves} == {
            (k, m) for k in ("deletion", "insertion", "aopc") for m in ("gradcam", "saliency")
        }
        dele = [float(r["x"]) for r in curves if r["metric"] == "deletion" and r["method"] == "gradcam"]
        assert dele == [0, 0.25, 0.5, 0.75, 1.0]

    # localization from original-pixel boxes; coffee has no box, so no rows for it
    (tmp_path / "boxes.csv").write_text("image,x1,y1,x2,y2\nchelsea.png,100,20,360,300\n")
    loc = run_xai(
        "evaluate",
        tmp_path / "plain",
        "--metric",
        "pointing-game,energy-pointing,box-loc",
        "--annotations",
        tmp_path / "boxes.csv",
        "--quiet",
    )
    assert loc.returncode == 0, loc.stderr
    vl = values(tmp_path / "plain" / "metrics.csv")
    for k in ("pointing-game", "energy-pointing", "box-loc", "box-iou"):
        assert ("chelsea", "gradcam", k) in vl and ("coffee", "gradcam", k) not in vl, k
    assert 0 < vl[("chelsea", "gradcam", "energy-pointing")] <= 1
    assert vl[("chelsea", "gradcam", "pointing-game")] in (0.0, 100.0)
    noann = run_xai("evaluate", tmp_path / "plain", "--metric", "pointing-game")
    assert noann.returncode == 2 and "--annotations" in noann.stderr

    # evaluating another metric later keeps the earlier rows
    w = run_xai("evaluate", tmp_path / "plain", "--metric", "win", "--against", "gradcam", "--quiet")
    assert w.returncode == 0, w.stderr
    vw = values(tmp_path / "plain" / "metrics.csv")
    assert ("chelsea", "saliency", "win") in vw and ("chelsea", "gradcam", "deletion") in vw
    assert ("chelsea", "gradcam", "win") not in vw  # replaced: gradcam is now the reference
    assert vw[("chelsea", "saliency", "win")] + va[("chelsea", "gradcam", "win")] <= 100.0


@pytest.fixture
def fake_run(tmp_path):
    """A folder with run.yaml and explanations.csv but no model work: enough to test the checks."""
    out = tmp_path / "run"
    out.mkdir()
    cfg = {"model": {"name": "default"}, "methods": [{"name": "gradcam"}, {"name": "saliency"}], "output": str(out)}
    (out / "run.yaml").write_text(yaml.safe_dump({"config": cfg, "resolved": {"input_root": str(tmp_path)}}))
    (out / "explanations.csv").write_text("image,method,target_class,status\na,gradcam,1,ok\n")
    return out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--metric", "nope"], "unknown metric 'nope'"),
        (["--metric", "win"], "needs --against"),
        (["--metric", "win", "--against", "gradcam++"], "'gradcam++' is not a method of this run"),
        (["--metric", "deletion", "--bogus"], "No such option"),
    ],
)
def test_evaluate_bad_input_is_one_line_exit_2(fake_run, args, message):
    r = run_xai("evaluate", fake_run, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr


def test_evaluate_without_run_yaml(tmp_path):
    (tmp_path / "xai-out").mkdir()
    r = run_xai("evaluate", cwd=tmp_path)  # no argument: the default output folder
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "xai-out: no run.yaml" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_xai("evaluate", tmp_path / "missing")
    assert r.returncode == 2 and "no such output folder" in r.stderr


def test_config_metrics_are_validated(tmp_path):
    from xaicli.config import build_config
    from xaicli.errors import ConfigError

    (tmp_path / "a.png").write_bytes(b"")
    cfg = build_config(None, {"input": str(tmp_path), "metrics": "deletion,avg-drop"})
    assert [m.name for m in cfg.metrics] == ["deletion", "avg-drop"]
    cfg = build_config(
        None, {"input": str(tmp_path), "methods": "gradcam,saliency", "metrics": "win", "against": "saliency"}
    )
    assert cfg.metrics[0].params == {"against": "saliency"}
    y = tmp_path / "c.yaml"
    y.write_text(yaml.safe_dump({"input": str(tmp_path), "metrics": [{"name": "deletion", "step": 0.5}, "insertion"]}))
    cfg = build_config(y, {"metrics": "avg-drop,deletion"})  # the flag picks names, the file keeps parameters
    assert [(m.name, m.params) for m in cfg.metrics] == [("avg-drop", {}), ("deletion", {"step": 0.5})]
    for over, msg in [
        ({"metrics": "nope"}, "unknown metric 'nope'"),
        ({"metrics": "win"}, "needs `against"),
        ({"metrics": "win", "against": "saliency"}, "not a method of this run"),
        ({"metrics": [{"name": "deletion", "step": -1}]}, "'step'"),
        ({"metrics": [{"name": "deletion", "stepz": 3}]}, "unknown parameter 'stepz'"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            build_config(None, {"input": str(tmp_path), **over})


def test_metrics_listing():
    r = run_xai("metrics")
    assert r.returncode == 0
    for name in ("deletion", "insertion", "aopc", "avg-drop", "increase", "win"):
        assert name in r.stdout


def test_evaluate_fabricated_folder_skips_missing_images(fake_run):
    import numpy as np

    (fake_run / "gradcam").mkdir()
    (fake_run / "saliency").mkdir()
    np.save(fake_run / "gradcam" / "chelsea.npy", np.ones((224, 224), np.float32))
    np.save(fake_run / "saliency" / "chelsea.npy", np.zeros((224, 224), np.float32))
    lines = ["image,method,target_class,status,path"]
    for m in ("gradcam", "saliency"):
        lines.append(f"chelsea,{m},282,ok,{SAMPLES / 'chelsea.png'}")
        lines.append(f"ghost,{m},1,ok,{fake_run / 'ghost.png'}")  # no map, no source: skipped
    (fake_run / "explanations.csv").write_text("\n".join(lines) + "\n")
    r = run_xai("evaluate", fake_run, "--metric", "avg-drop")
    assert r.returncode == 1, r.stderr  # done, one image skipped
    assert "1 image(s) skipped" in r.stderr and "Traceback" not in r.stderr
    v = values(fake_run / "metrics.csv")
    assert set(v) == {("chelsea", "gradcam", "avg-drop"), ("chelsea", "saliency", "avg-drop")}
    assert v[("chelsea", "gradcam", "avg-drop")] == 0.0  # a map of ones keeps the whole image
    assert v[("chelsea", "saliency", "avg-drop")] > 50.0  # a map of zeros removes it


def test_relative_paths_resolve_from_the_run_folder(tmp_path):
    from xaicli.evaluate import _locator

    (tmp_path / "proj" / "imgs").mkdir(parents=True)
    (tmp_path / "proj" / "imgs" / "a.png").write_bytes(b"x")
    out = tmp_path / "proj" / "runs" / "r1"
    out.mkdir(parents=True)
    locate = _locator(out, "runs/r1")  # the run was started in proj/ with --out runs/r1
    assert locate("imgs/a.png") == tmp_path / "proj" / "imgs" / "a.png"
    assert locate(str(tmp_path / "x.png")) == tmp_path / "x.png"  # absolute: unchanged
    assert _locator(out, "elsewhere")("imgs/a.png") == __import__("pathlib").Path("imgs/a.png")
