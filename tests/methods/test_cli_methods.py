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
