"""End-to-end: `xai` in a subprocess on a copy of sample_images/, every file and CSV row checked."""

import csv

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import SAMPLE_FILES, run_xai
from conftest import SAMPLES as SAMPLES_DIR


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_explain_writes_the_documented_layout(samples_copy, tmp_path):
    (samples_copy / "nested").mkdir()
    (samples_copy / "coffee.png").rename(samples_copy / "nested" / "coffee.png")
    out = tmp_path / "out"
    r = run_xai("explain", "--method", "gradcam,saliency", samples_copy, "--out", out, "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "done" in r.stdout and str(out) in r.stdout.replace("\n", "")
    keys = sorted(n.rsplit(".", 1)[0] for n in SAMPLE_FILES if n != "coffee.png") + ["nested/coffee"]
    for method in ("gradcam", "saliency"):
        for k in keys:
            png, npy = out / method / f"{k}.png", out / method / f"{k}.npy"
            src = next(samples_copy.glob(f"{k}.*"))
            with Image.open(png) as im, Image.open(src) as orig:
                assert im.size == orig.size  # overlay at the original resolution
                assert im.mode == "RGB"
            m = np.load(npy)
            assert m.dtype == np.float32 and m.shape == (224, 224) and np.isfinite(m).all()
    table = rows(out / "explanations.csv")
    assert len(table) == 2 * len(keys)
    assert {(r["image"], r["method"]) for r in table} == {(k, m) for k in keys for m in ("gradcam", "saliency")}
    for col in ("target_class", "target_label", "target_prob", "top1_class", "top1_label", "top1_prob", "seconds"):
        assert all(r[col] != "" for r in table), col
    by = {(r["image"], r["method"]): r for r in table}
    assert by[("chelsea", "gradcam")]["top1_label"] == "tiger cat"
    assert abs(float(by[("chelsea", "gradcam")]["top1_prob"]) - 0.393) < 0.01
    assert by[("nested/coffee", "saliency")]["top1_label"] == "espresso"
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["config"]["methods"] == [{"name": "gradcam"}, {"name": "saliency"}]
    assert run["resolved"]["layers"] == {"gradcam": "bn2"}
    assert run["versions"]["torch"] and run["versions"]["xaicli"]
    assert not (out / "errors.csv").exists()


@pytest.mark.slow
def test_corrupt_file_goes_to_errors_csv_and_others_succeed(samples_copy, tmp_path):
    (samples_copy / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (samples_copy / "notes.txt").write_text("not an image, ignored")
    out = tmp_path / "out"
    r = run_xai("explain", samples_copy, "--out", out, "--quiet", "--workers", "2", "-b", "4")
    assert r.returncode == 1, r.stderr  # done, some failed
    assert "Traceback" not in r.stderr and "errors.csv" in r.stderr
    errs = rows(out / "errors.csv")
    assert [e["image"] for e in errs] == ["broken"] and errs[0]["reason"]
    done = rows(out / "explanations.csv")
    assert sorted(r["image"] for r in done) == sorted(n.rsplit(".", 1)[0] for n in SAMPLE_FILES)
    assert len(list((out / "gradcam").glob("*.png"))) == len(SAMPLE_FILES)


def test_list_commands_and_version():
    r = run_xai("methods")
    assert r.returncode == 0 and "gradcam" in r.stdout and "saliency" in r.stdout
    r = run_xai("--version")
    assert r.returncode == 0 and r.stdout.startswith("xai ")
    r = run_xai("models")
    assert r.returncode == 0 and "torchvision:NAME" in r.stdout
    r = run_xai("explain", "--help")
    assert r.returncode == 0 and "--method" in r.stdout and "Exit codes" in " ".join(r.stdout.split())


def test_missing_input_is_a_usage_error(tmp_path):
    r = run_xai("explain", tmp_path / "nothing_here", "--out", tmp_path / "o", "--quiet")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_python_api_run(tmp_path, capsys):
    import xaicli

    s = xaicli.run({"input": str(SAMPLES_DIR / "coffee.png"), "output": str(tmp_path / "o"), "workers": 0})
    assert s.done == 1 and s.exit_code == 0
    assert "1/1" in capsys.readouterr().err  # tqdm progress bar outside the CLI
    assert rows(tmp_path / "o" / "explanations.csv")[0]["top1_label"] == "espresso"
