"""Issue #16 (outside red-team pass): workers die with the main process, CPU allocation failures
back off like CUDA OOM, malformed configs and absurd parameters are one line + exit 2, random
draws do not depend on the batch, and metric rows of a killed run are not lost."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, SAMPLES, run_xai
from xaicli.config import build_config
from xaicli.errors import ConfigError
from xaicli.ops import Chunker, is_oom


def _env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def corpus(d: Path, n: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    src = Image.open(SAMPLES / "chelsea.png").convert("RGB")
    for i in range(n):
        src.crop((i % 9, i % 7, 300 - i % 5, 250)).resize((96, 80)).save(d / f"img_{i:03d}.jpg", quality=90)
    return d


def rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


# ----------------------------------------------------------------------------------------------
# workers die with the main process
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux only")
def test_workers_die_within_a_second_of_a_sigkilled_main(tmp_path):
    imgs = corpus(tmp_path / "imgs", 200)
    args = ["explain", imgs, "-m", "saliency", "-b", "2", "--workers", "2", "-q", "--out", tmp_path / "out"]
    p = subprocess.Popen([sys.executable, "-m", "xaicli", *map(str, args)], env=_env(), cwd=ROOT)
    deadline, workers = time.time() + 120, []
    while time.time() < deadline and not rows(tmp_path / "out" / "explanations.csv"):
        time.sleep(0.05)
    workers = children(p.pid)
    assert len(workers) >= 2, "the run must have its decode workers when killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    t0 = time.time()
    while time.time() - t0 < 1.0 and any(alive(w) for w in workers):
        time.sleep(0.02)
    left = [w for w in workers if alive(w)]
    for w in left:  # do not leak them into the rest of the suite
        os.kill(w, signal.SIGKILL)
    assert not left, f"workers {left} outlived the main process by more than 1 s"


def test_die_with_parent_sets_the_parent_death_signal():
    """In a forked child: prctl(PR_GET_PDEATHSIG) reads back SIGKILL after die_with_parent."""
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    code = (
        "import ctypes, os, signal; from xaicli.data import die_with_parent\n"
        "assert die_with_parent(os.getppid())\n"
        "v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0)\n"
        "print(v.value)"
    )
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == int(signal.SIGKILL)


# ----------------------------------------------------------------------------------------------
# a CPU allocation failure backs off like CUDA OOM
# ----------------------------------------------------------------------------------------------
CPU_OOM = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 1236950581248 bytes. Error code 12 (Cannot allocate memory)"
)


def test_is_oom_knows_the_cpu_allocator_and_nothing_else():
    assert is_oom(RuntimeError(CPU_OOM))
    assert is_oom(MemoryError())
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not is_oom(ValueError("can't allocate memory"))  # only the allocator's RuntimeError


def test_chunker_halves_on_a_simulated_cpu_allocation_failure():
    events = []
    ch = Chunker(on_event=lambda kind, **kw: events.append((kind, kw)))
    seen = []

    def fn(idx):
        if len(idx) > 4:
            raise RuntimeError(CPU_OOM)
        seen.extend(idx.tolist())

    ch.map("ig", 20, 16, fn)
    assert sorted(seen) == list(range(20))
    assert [k for k, _ in events] and all(k == "oom_backoff" for k, _ in events)


# ----------------------------------------------------------------------------------------------
# malformed configs and absurd parameters: one line, exit 2
# ----------------------------------------------------------------------------------------------
BAD_CONFIGS = {
    "batch_size: 99999999999999999999\n": "'batch_size'",
    "batch_size: true\n": "'batch_size'",
    "workers: 100000\n": "'workers'",
    "max_pixels: 99999999999999999999\n": "'max_pixels'",
    "output: ''\n": "'output'",
    'output: "a\\0b"\n': "NUL",
    'methods: [{name: gradcam, id: "a\\0b"}]\n': "NUL",
    "methods: [{name: gradcam, id: explanations.csv}]\n": "layout",
    "methods: [{name: gradcam, id: run.yaml}]\n": "layout",
    "methods: [{name: gradcam, id: metrics_summary.csv}]\n": "layout",
    "methods: [{name: gradcam, id: sheets}]\n": "layout",
    "x: " + "[" * 1000 + "]" * 1000 + "\n": "nested too deeply",
    "methods: [{name: smoothgrad, base_params: " + "{a: " * 1000 + "1" + "}" * 1000 + "}]\n": "nested too deeply",
    "methods: [{name: integrated_gradients, internal_batch: 100000}]\n": "internal_batch",
    "methods: [{name: smoothgrad, internal_batch: 100000}]\n": "internal_batch",
    "methods: [{name: smoothgrad, n_samples: 1000000}]\n": "n_samples",
    "methods: [{name: integrated_gradients, n_steps: true}]\n": "n_steps",
    "methods: [{name: smoothgrad, noise_level: .nan}]\n": "finite",
    "methods: [{name: smoothgrad, noise_level: .inf}]\n": "finite",
    "methods: [{name: integrated_gradients, blur_sigma: .nan}]\n": "finite",
    "methods: [{name: integrated_gradients, baseline: /etc/passwd}]\n": "not an image",
    "methods: [{name: integrated_gradients, baseline: notimg.png}]\n": "not an image",
    "metrics: [{name: deletion, step: .nan}]\n": "finite",
    "metrics: [{name: aopc, internal_batch: 100000}]\n": "internal_batch",
}


@pytest.mark.parametrize("text", list(BAD_CONFIGS), ids=range(len(BAD_CONFIGS)))
def test_malformed_config_is_one_config_error(tmp_path, text):
    (tmp_path / "notimg.png").write_bytes(b"not an image at all")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"input: {SAMPLES / 'chelsea.png'}\n" + text)
    with pytest.raises(ConfigError, match=BAD_CONFIGS[text]) as e:
        build_config(cfg)
    assert "\n" not in str(e.value)


def test_malformed_configs_via_cli_exit_2_without_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f'input: {SAMPLES / "chelsea.png"}\nmethods: [{{name: gradcam, id: "a\\0b"}}]\n')
    r = run_xai("explain", "-c", cfg, "--dry-run")
    assert r.returncode == 2 and "NUL" in r.stderr and "Traceback" not in r.stderr
    r = run_xai("explain", SAMPLES / "chelsea.png", "-b", "99999999999999", "--dry-run")
    assert r.returncode == 2 and "batch_size" in r.stderr and "internal error" not in r.stderr


def test_duplicate_keys_warn_once_on_stderr(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"input: {SAMPLES / 'chelsea.png'}\nbatch_size: 2\nbatch_size: 3\n")
    assert build_config(cfg).batch_size == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "duplicate key" in err and "'batch_size' (line 3)" in err
    cfg.write_text(f"input: {SAMPLES / 'chelsea.png'}\nbatch_size: 2\n")
    build_config(cfg)
    assert capsys.readouterr().err == ""


def test_reasonable_values_still_pass(tmp_path):
    img = tmp_path / "base.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(img)
    cfg = build_config(
        None,
        {
            "input": str(SAMPLES),
            "batch_size": 4096,
            "workers": 0,
            "methods": [{"name": "integrated_gradients", "baseline": str(img), "internal_batch": 4096}],
        },
    )
    assert cfg.batch_size == 4096 and cfg.specs()[0][1].internal_batch == 4096


# ----------------------------------------------------------------------------------------------
# random draws do not depend on the batch (the red-team symptom, at the run level)
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_batch_size_does_not_change_seeded_maps_or_metrics(tmp_path):
    """Same config with -b 2 and -b 1: IG with the uniform baseline, SmoothGrad, and aopc /
    pixel-flipping with the uniform substrate give the same maps and values for every image."""
    from xaicli.explain_run import run_explain

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for n in ("chelsea.png", "coffee.png", "rocket.jpg"):
        Image.open(SAMPLES / n).convert("RGB").resize((128, 96)).save(imgs / (Path(n).stem + ".png"))
    methods = [
        {"name": "integrated_gradients", "id": "ig", "baseline": "uniform", "n_steps": 6},
        {"name": "smoothgrad", "n_samples": 3},
    ]
    metrics = [
        {"name": "aopc", "regions": 6, "substrate": "uniform"},
        {"name": "pixel-flipping", "per_step": 0.25, "substrate": "uniform"},
    ]
    outs = {}
    for b in (2, 1):
        out = tmp_path / f"b{b}"
        cfg = build_config(
            None,
            {
                "input": str(imgs),
                "output": str(out),
                "methods": methods,
                "metrics": metrics,
                "batch_size": b,
                "workers": 0,
            },
        )
        run_explain(cfg)
        outs[b] = out
    for m in ("ig", "smoothgrad"):
        for n in ("chelsea", "coffee", "rocket"):
            a, c = np.load(outs[2] / m / f"{n}.npy"), np.load(outs[1] / m / f"{n}.npy")
            np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-6 * float(np.abs(c).max()), err_msg=f"{m}/{n}")
    key = lambda r: (r["image"], r["method"], r["metric"])  # noqa: E731
    v2 = {key(r): float(r["value"]) for r in rows(outs[2] / "metrics.csv")}
    v1 = {key(r): float(r["value"]) for r in rows(outs[1] / "metrics.csv")}
    assert set(v2) == set(v1) and len(v1) == 3 * 2 * 2
    for k in v1:
        assert v2[k] == pytest.approx(v1[k], rel=1e-4, abs=1e-6), k


# ----------------------------------------------------------------------------------------------
# --metrics after a kill
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkilled_metrics_run_keeps_the_metrics_of_finished_images(tmp_path):
    """kill -9 during `xai explain --metrics`: every image with an explanations.csv row has its
    metric row on disk (OUT/.metrics-partial.csv, streamed per batch); the next run merges them
    into metrics.csv: one row per image, none lost, none twice."""
    imgs, out = corpus(tmp_path / "imgs", 30), tmp_path / "out"
    args = ["explain", imgs, "-m", "gradcam", "-b", "2", "--workers", "0", "-q", "--metrics", "avg-drop"]
    args += ["--out", out]
    p = subprocess.Popen([sys.executable, "-m", "xaicli", *map(str, args)], env=_env(), cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and len(rows(out / "explanations.csv")) < 6:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = {r["image"] for r in rows(out / "explanations.csv")}
    assert 0 < len(done) < 30, "the kill must land mid-run"
    partial = {r["image"] for r in rows(out / ".metrics-partial.csv")}
    assert done <= partial | {r["image"] for r in rows(out / "metrics.csv")}
    r = run_xai(*args)
    assert r.returncode == 0, r.stderr
    assert not (out / ".metrics-partial.csv").exists()
    got = [r["image"] for r in rows(out / "metrics.csv") if r["metric"] == "avg-drop"]
    assert sorted(got) == sorted(f"img_{i:03d}" for i in range(30))
