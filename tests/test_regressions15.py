"""Regression tests for the defects of issue #15 ("Defects seen"): each failed on main before the fix."""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, SAMPLES, TinyCNN, run_xai
from xaicli.config import build_config
from xaicli.errors import MethodError, ModelError
from xaicli.explain_run import run_explain
from xaicli.models import load_model


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --layer classifier: a real module whose output is not spatial -------------------------------
def test_non_spatial_layer_is_refused_at_bind_with_candidates():
    from xaicli.methods import build_method, make_context

    ctx = make_context(TinyCNN().eval(), (32, 32), layer="fc")
    with pytest.raises(MethodError, match=r"layer 'fc' is not spatial: its output is \[1, 5\].*features\.3"):
        build_method("gradcam").bind(ctx)
    ctx = make_context(TinyCNN().eval(), (32, 32), layer="features.3")  # a spatial one still binds
    assert build_method("gradcam").bind(ctx).resolved()["layer"] == "features.3"


@pytest.mark.slow
def test_cli_layer_classifier_exits_2_before_any_progress(tmp_path):
    r = run_xai("explain", SAMPLES / "coffee.png", "--layer", "classifier", "-o", tmp_path / "o")
    assert r.returncode == 2, r.stderr
    err = " ".join(r.stderr.split())
    assert "not spatial" in err and "bn2" in err and "internal error" not in err
    assert "explaining" not in r.stderr  # no progress bar was started
    assert len(r.stderr.strip().splitlines()) == 1


# a whole-model pickle: one plain sentence -----------------------------------------------------
def test_whole_model_pickle_refusal_is_plain_and_whole(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=3), tmp_path / "whole.pt")
    with pytest.raises(ModelError) as ei:
        load_model("torchvision:resnet18", weights=str(tmp_path / "whole.pt"), num_classes=3)
    msg = str(ei.value)
    assert "\x1b" not in msg and "[1m" not in msg
    assert "torchvision.models.resnet.ResNet" in msg and "state_dict()" in msg
    assert msg.endswith("'model.safetensors')")  # the sentence is whole, not cut at 160 characters


# torchvision offline: torch.hub's "Downloading:" line never reaches stdout -----------------------
def test_torch_hub_download_line_goes_to_stderr(monkeypatch, tmp_path, capsys):
    import torch.hub

    from xaicli.models import hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for k in hub.OFFLINE_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: True)  # as if online, then the download fails

    def no_net(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_net)
    with pytest.raises(ModelError):
        load_model("torchvision:resnet50")
    out, err = capsys.readouterr()
    assert out == ""
    assert "Downloading:" in err


def test_offline_uncached_weights_fail_in_seconds_with_advice(monkeypatch, tmp_path):
    import huggingface_hub.constants

    from xaicli.models import hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    for k in hub.OFFLINE_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: False)  # no route to the hub
    for spec in ("timm:resnet10t", "torchvision:resnet18"):
        t0 = time.perf_counter()
        with pytest.raises(ModelError, match="cannot be reached.*HF_HUB_OFFLINE=1"):
            load_model(spec)
        assert time.perf_counter() - t0 < 10


def test_reachable_gives_up_quickly():
    from xaicli.models.hub import reachable

    t0 = time.perf_counter()
    assert reachable("192.0.2.1", 9, timeout=0.5) is False  # TEST-NET-1: never routed
    assert time.perf_counter() - t0 < 2


@pytest.mark.slow
def test_cli_offline_timm_name_not_cached_exits_2_fast(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "t")}
    t0 = time.perf_counter()
    r = run_xai("explain", SAMPLES / "coffee.png", "--model", "timm:resnet10t", "-o", tmp_path / "o", env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert "HF_HUB_OFFLINE" in r.stderr and "local checkpoint" in r.stderr
    assert time.perf_counter() - t0 < 30  # python + torch import included; ~5 s on an idle machine


# explanations.csv `path` is normalised ----------------------------------------------------------
def test_paths_in_csvs_are_normalised(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "coffee.png").write_bytes((SAMPLES / "coffee.png").read_bytes())
    (imgs / "broken.png").write_bytes(b"not an image")
    conf = tmp_path / "configs"
    conf.mkdir()
    (conf / "run.yaml").write_text("input: ../imgs\noutput: ../out\nmethods: saliency\nworkers: 0\n")
    s = run_explain(build_config(conf / "run.yaml"))
    assert s.done == 1 and s.failed == 1
    ok = _rows(tmp_path / "out" / "explanations.csv")[0]["path"]
    bad = _rows(tmp_path / "out" / "errors.csv")[0]["path"]
    for p in (ok, bad):
        assert ".." not in Path(p).parts and Path(p).is_absolute(), p
    assert Path(ok) == (imgs / "coffee.png") and Path(bad) == (imgs / "broken.png")
    run = yaml.safe_load((tmp_path / "out" / "run.yaml").read_text())
    assert ".." not in Path(run["resolved"]["input_root"]).parts


# an internal error: the JSON log's run_end says why ---------------------------------------------
def test_run_end_error_logs_the_reason(tmp_path, monkeypatch):
    from xaicli import sinks

    def boom(self, result):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(sinks.MapSink, "consume", boom)
    cfg = build_config(None, {"input": str(SAMPLES / "coffee.png"), "output": str(tmp_path / "o"), "workers": 0})
    with pytest.raises(RuntimeError):
        run_explain(cfg)
    events = [json.loads(ln) for ln in (tmp_path / "o" / "xai-log.jsonl").read_text().splitlines()]
    end = [e for e in events if e["event"] == "run_end"][-1]
    assert end["status"] == "error" and end["reason"] == "RuntimeError: disk on fire"


# a Python-API model returning a tuple -----------------------------------------------------------
class TupleModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = TinyCNN()

    def forward(self, x):
        y = self.net(x)
        return y, y.softmax(1)


@pytest.mark.parametrize("method", ["gradcam", "saliency"])
def test_tuple_model_says_what_the_model_must_return(method):
    import xaicli

    m, x = TupleModel().eval(), torch.rand(2, 3, 32, 32)
    with pytest.raises(MethodError, match=r"returned a tuple of 2.*logits, a tensor \[B, classes\].*output_index=0"):
        xaicli.explain(m, x, method)
    maps = xaicli.explain(m, x, method, output_index=0)
    ref = xaicli.explain(m.net, x, method)
    assert maps.shape == (2, 32, 32) and torch.allclose(maps, ref)
    assert not m._forward_hooks  # the selecting hook is gone afterwards


def test_output_index_by_key():
    import xaicli

    class DictModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TinyCNN()

        def forward(self, x):
            return {"logits": self.net(x)}

    m, x = DictModel().eval(), torch.rand(1, 3, 32, 32)
    assert torch.allclose(xaicli.explain(m, x, "saliency", output_index="logits"), xaicli.explain(m.net, x, "saliency"))


# a labels file that covers 1 of 6 images ---------------------------------------------------------
def test_target_fallback_predicted(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("image,class\nchelsea.png,967\n")  # espresso for the cat; the others unlisted
    base = {"input": str(SAMPLES), "methods": "saliency", "workers": 0, "target": str(labels)}
    s = run_explain(build_config(None, {**base, "output": str(tmp_path / "a")}))
    assert s.done == 1 and s.failed == 5
    assert "target_fallback: predicted" in _rows(tmp_path / "a" / "errors.csv")[0]["reason"]
    s = run_explain(build_config(None, {**base, "output": str(tmp_path / "b"), "target_fallback": "predicted"}))
    assert s.done == 6 and s.failed == 0
    table = {r["image"]: r for r in _rows(tmp_path / "b" / "explanations.csv")}
    assert table["chelsea"]["target_class"] == "967"
    for k, r in table.items():
        if k != "chelsea":
            assert r["target_class"] == r["top1_class"], k


def test_target_fallback_is_validated(tmp_path):
    from xaicli.errors import ConfigError

    with pytest.raises(ConfigError, match="target_fallback"):
        build_config(None, {"input": str(SAMPLES), "target_fallback": "guess"})


# help and README ---------------------------------------------------------------------------------
def test_evaluate_help_lists_every_exit_code():
    r = run_xai("evaluate", "--help", env={"COLUMNS": "200"})
    text = " ".join(r.stdout.split())
    for code in ("0 all done", "1 done", "2 usage or config error", "3 output folder locked", "4 internal", "130"):
        assert code in text, code


def test_readme_and_docs_link_only_files_of_the_repository():
    for md in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        text = md.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if "://" in target:
                continue
            assert (md.parent / target).exists(), f"{md.name} links {target}"
        assert "DESIGN.md" not in text, md.name
