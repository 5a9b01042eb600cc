"""Progress inside long batches (issues #15, #16): inner loops move the bar; s/img when slow;
metric time and a single image's PNG path in the summary."""

from __future__ import annotations

import json

import pytest

from conftest import SAMPLES, run_xai
from xaicli.config import build_config
from xaicli.explain_run import run_explain
from xaicli.progress import InnerProgress, rate_text


class Recorder:
    def __init__(self):
        self.calls = []  # ("advance", n) | ("partial", images)

    def start(self, total):
        self.total = total

    def advance(self, n):
        self.calls.append(("advance", n))

    def partial(self, images):
        self.calls.append(("partial", images))

    def stop(self):
        pass


def test_rate_text_switches_to_seconds_per_image():
    assert rate_text(3.0) == "3.0 img/s"
    assert rate_text(0.25) == "4.0 s/img"
    assert rate_text(None) == "-- img/s"


def test_inner_progress_follows_the_outermost_loop(monkeypatch):
    monkeypatch.setattr(InnerProgress, "MIN_INTERVAL", 0.0)
    rec = Recorder()
    inner = InnerProgress(rec, images=4, methods=2)
    inner.method(0)
    inner.chunk("smoothgrad", 0, 10)  # outer loop announced first
    inner.chunk("ig", 0, 5)  # a loop nested in it: ignored
    inner.chunk("ig", 5, 5)
    inner.chunk("smoothgrad", 5, 10)
    inner.method(1)
    inner.chunk("scorecam", 2, 4)
    assert [v for k, v in rec.calls] == [0.0, 1.0, 3.0]  # 4 images x (0 | 0.5 | 1.5) / 2 methods


def test_a_long_method_reports_progress_inside_its_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(InnerProgress, "MIN_INTERVAL", 0.0)
    rec = Recorder()
    cfg = build_config(
        None,
        {
            "input": str(SAMPLES / "coffee.png"),
            "output": str(tmp_path / "o"),
            "workers": 0,
            "methods": [{"name": "integrated_gradients", "n_steps": 8, "internal_batch": 2}],
        },
    )
    s = run_explain(cfg, progress=rec)
    assert s.done == 1
    partial = [v for k, v in rec.calls if k == "partial"]
    assert rec.calls[-1] == ("advance", 1)  # the batch ends exactly at its image count
    assert len(partial) >= 4 and partial == sorted(partial)  # 8 path points in chunks of 2 (+ 0 at start)
    assert any(0 < v < 1 for v in partial) and max(partial) <= 1
    assert s.maps == [tmp_path / "o" / "integrated_gradients" / "coffee.png"]


@pytest.mark.slow
def test_summary_shows_metric_time_and_the_png_of_a_single_image(tmp_path):
    out = tmp_path / "o"
    r = run_xai("explain", SAMPLES / "coffee.png", "-m", "saliency", "--metrics", "avg-drop", "-o", out)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "metric avg-drop" in text and "s on the device" in text
    assert str(out / "saliency" / "coffee.png") in text.replace(" ", "") or str(out / "saliency" / "coffee.png") in text
    r = run_xai(
        "explain", SAMPLES / "coffee.png", "-m", "saliency", "--metrics", "avg-drop", "-o", out, "--json", "--force"
    )
    doc = json.loads(r.stdout)
    assert set(doc["metric_seconds"]) == {"avg-drop"} and doc["maps"] == [str(out / "saliency" / "coffee.png")]
