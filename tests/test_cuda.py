"""CUDA: the same maps as on the CPU, and a CLI run on the device. Skipped without a GPU."""

import pytest
import torch

from xaicli import explain
from xaicli.methods import METHODS

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FAST = [m for m in ("gradcam", "saliency", "inputxgrad", "guided_backprop", "gradcampp", "cam") if m in METHODS]


@pytest.mark.parametrize("method", FAST)
def test_cuda_matches_cpu(default_model, sample_batch, method):
    cpu = explain(default_model, sample_batch, method)
    default_model.to("cuda")
    try:
        gpu = explain(default_model, sample_batch.cuda(), method)
    finally:
        default_model.to("cpu")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    c, g = cpu.flatten(1), gpu.cpu().flatten(1)
    scale = c.abs().amax(1, keepdim=True).clamp_min(1e-12)
    assert ((c - g).abs() / scale).max() < 1e-2


def test_cli_on_cuda(tmp_path):
    from conftest import SAMPLES, run_xai

    r = run_xai("explain", SAMPLES, "--out", tmp_path / "o", "--device", "cuda", "-q", "-m", ",".join(FAST))
    assert r.returncode == 0, r.stderr
    assert "device: cuda" in (tmp_path / "o" / "run.yaml").read_text()


SEEDED = {  # perturbation/Shapley methods with their seeded randomness, small settings
    "rise": {"n_masks": 64},
    "kernelshap": {"segments": "grid", "n_segments": 16, "n_samples": 50},
    "gradientshap": {"n_samples": 4},
    "occlusion": {"window": 4, "stride": 2},
    "meaningful_perturbation": {"iterations": 5},
    "extremal_perturbation": {"iterations": 5, "areas": [0.1, 0.3]},  # no random draw: no seed field
}


@pytest.mark.parametrize("method", [m for m in SEEDED if m in METHODS])
def test_seeded_methods_give_the_same_map_on_cuda(method):
    """Same seed, same map on CPU and CUDA: masks, coalitions, samples and jitter are drawn on the CPU."""
    from dataclasses import fields

    from conftest import TinyCNN

    model = TinyCNN(width=8).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    params = dict(SEEDED[method])
    if "seed" in {f.name for f in fields(METHODS[method])}:
        params["seed"] = 3
    cpu = explain(model, x, method, target=1, **params)
    gpu = explain(model.cuda(), x.cuda(), method, target=1, **params)
    assert gpu.device.type == "cuda"
    c, g = cpu.flatten(1), gpu.cpu().flatten(1)
    scale = c.abs().amax(1, keepdim=True).clamp_min(1e-12)
    assert ((c - g).abs() / scale).max() < 1e-3
