"""Every registered method from the CLI and from a config (end to end, small inputs)."""

import csv

import numpy as np
import pytest

from conftest import run_xai
from xaicli.methods import METHODS


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_xai_methods_lists_every_method_with_a_description():
    r = run_xai("methods", env={"COLUMNS": "400"})
    assert r.returncode == 0, r.stderr
    for name, cls in METHODS.items():
        assert name in r.stdout
        assert cls.description and "\n" not in cls.description
    for name in ("inputxgrad", "guided_backprop", "cam", "guided_gradcam", "gradcampp", "xgradcam", "layercam"):
        assert name in METHODS
    for name in ("scorecam", "integrated_gradients", "smoothgrad"):
        assert name in METHODS


@pytest.mark.slow
def test_explain_with_new_methods_from_a_config(samples_copy, tmp_path):
    for p in samples_copy.iterdir():
        if p.name not in ("chelsea.png", "coffee.png"):
            p.unlink()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "methods:\n"
        "  - inputxgrad\n"
        "  - guided_backprop\n"
        "  - cam\n"
        "  - guided_gradcam\n"
        "  - gradcampp\n"
        "  - xgradcam\n"
        "  - layercam\n"
        "  - {name: integrated_gradients, n_steps: 4, internal_batch: 8}\n"
        "  - {name: smoothgrad, n_samples: 2}\n"
        "  - {name: scorecam, id: scorecam_b2, layer: 'blocks.2', internal_batch: 64}\n"
    )
    out = tmp_path / "out"
    r = run_xai("explain", "--config", cfg, samples_copy, "--out", out, "-b", "2", "--workers", "0", "--quiet")
    assert r.returncode == 0, r.stderr
    table = rows(out / "explanations.csv")
    keys = ["inputxgrad", "guided_backprop", "cam", "guided_gradcam", "gradcampp", "xgradcam", "layercam"]
    keys += ["integrated_gradients", "smoothgrad", "scorecam_b2"]
    assert {r["method"] for r in table} == set(keys)
    for r in table:
        assert r["status"] == "ok", r
        assert (r["delta"] != "") == (r["method"] == "integrated_gradients")
        m = np.load(out / r["method"] / f"{r['image']}.npy")
        assert m.shape == (224, 224) and np.isfinite(m).all() and m.max() > m.min()
        assert (out / r["method"] / f"{r['image']}.png").is_file()


@pytest.mark.slow
def test_perturbation_and_shapley_methods_from_the_cli(samples_copy, tmp_path):
    """Each perturbation/Shapley method runs from the CLI on sample images with small settings
    and writes its declared CSV extras."""
    for p in samples_copy.iterdir():
        if p.name not in ("chelsea.png", "coffee.png"):
            p.unlink()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "methods:\n"
        "  - {name: occlusion, window: 56, stride: 56}\n"
        "  - {name: rise, n_masks: 16, internal_batch: 16}\n"
        "  - {name: kernelshap, n_segments: 16, n_samples: 24, internal_batch: 24}\n"
        "  - {name: gradientshap, n_samples: 2}\n"
        "  - {name: meaningful_perturbation, iterations: 2}\n"
        "  - {name: extremal_perturbation, iterations: 2, areas: [0.1, 0.25]}\n"
    )
    out = tmp_path / "out"
    r = run_xai("explain", "--config", cfg, samples_copy, "--out", out, "-b", "2", "--workers", "0", "--quiet")
    assert r.returncode == 0, r.stderr
    table = rows(out / "explanations.csv")
    names = {"occlusion", "rise", "kernelshap", "gradientshap", "meaningful_perturbation", "extremal_perturbation"}
    assert {r["method"] for r in table} == names and len(table) == 12
    for r in table:
        assert r["status"] == "ok", r
        assert (r["efficiency_gap"] != "") == (r["method"] in ("kernelshap", "gradientshap"))
        assert (r["mp_area"] != "") == (r["method"] == "meaningful_perturbation")
        if r["method"] == "extremal_perturbation":  # one map per area, named by the config's areas
            assert 0 <= float(r["ep_prob_0.1"]) <= 1 and 0 <= float(r["ep_area_0.25"]) <= 1
            assert "ep_prob_0.05" not in r  # the columns follow the config's areas, not the defaults
            for name in ("area_0.1", "area_0.25"):
                m = np.load(out / r["method"] / r["image"] / f"{name}.npy")
                assert m.shape == (224, 224) and ((m >= 0) & (m <= 1)).all()
                assert (out / r["method"] / r["image"] / f"{name}.png").is_file()
            continue
        m = np.load(out / r["method"] / f"{r['image']}.npy")
        assert m.shape == (224, 224) and np.isfinite(m).all()
        assert (out / r["method"] / f"{r['image']}.png").is_file()
    assert all(abs(float(r["efficiency_gap"])) < 1e-3 for r in table if r["method"] == "kernelshap")


def test_perturbation_config_is_valid():
    from pathlib import Path

    from xaicli.config import build_config

    cfg = build_config(Path(__file__).resolve().parents[2] / "configs" / "perturbation.yaml")
    assert [spec.name for _, spec in cfg.specs()] == ["occlusion", "rise", "kernelshap", "gradientshap"]


@pytest.mark.parametrize(
    "entry,message",
    [
        ("{name: rise, p: 2}", "p must be in (0, 1]"),
        ("{name: occlusion, window: 0}", "window, stride and internal_batch must be >= 1"),
        ("{name: gradientshap, baseline: no_such_folder/}", "neither one of"),
    ],
)
def test_bad_perturbation_parameter_is_one_line_exit_2(tmp_path, entry, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"methods:\n  - {entry}\n")
    r = run_xai("explain", "--config", cfg, tmp_path, "--out", tmp_path / "o", "--quiet")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
