"""CLI ergonomics (issue #15): several inputs, method parameters on the command line, --target by
class name, `xai init`, shell completion, flags without <bool> metavars."""

from __future__ import annotations

import csv

import pytest
import yaml

from conftest import ROOT, SAMPLES, run_xai
from xaicli.config import build_config, parse_named_list
from xaicli.data import discover
from xaicli.errors import ConfigError


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_several_inputs_are_keyed_from_their_common_folder(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b" / "c"
    a.mkdir()
    b.mkdir(parents=True)
    for d in (a, b):
        (d / "x.png").write_bytes((SAMPLES / "coffee.png").read_bytes())
    lst = tmp_path / "list.txt"
    lst.write_text("a/x.png\nb/c/x.png\n")  # the same files again: each is done once
    d = discover([str(a / "x.png"), str(tmp_path / "b"), str(lst)])
    assert sorted(it.rel for it in d.items) == ["a/x", "b/c/x"]
    assert d.root == tmp_path


def test_one_input_in_a_list_keeps_the_config_of_one_input(tmp_path):
    from xaicli.state import config_hash

    one = build_config(None, {"input": str(SAMPLES), "output": str(tmp_path)})
    listed = build_config(None, {"input": [str(SAMPLES)], "output": str(tmp_path)})
    assert listed.input.path == str(SAMPLES) and config_hash(one) == config_hash(listed)


def test_method_parameters_on_the_command_line():
    assert parse_named_list("gradcam,integrated_gradients:n_steps=32,baseline=blur,saliency") == [
        "gradcam",
        {"name": "integrated_gradients", "n_steps": 32, "baseline": "blur"},
        "saliency",
    ]
    assert parse_named_list("smoothgrad:noise_level=0.2,base_params={n_steps: 4},id=sg") == [
        {"name": "smoothgrad", "noise_level": 0.2, "base_params": {"n_steps": 4}, "id": "sg"}
    ]
    assert parse_named_list("integrated_gradients:mean=[0.5,0.5,0.5]")[0]["mean"] == [0.5, 0.5, 0.5]
    cfg = build_config(None, {"input": str(SAMPLES), "methods": "integrated_gradients:n_steps=32,baseline=blur"})
    ((key, spec),) = cfg.specs()
    assert key == "integrated_gradients" and spec.n_steps == 32 and spec.baseline == "blur"


@pytest.mark.parametrize(
    "methods, message",
    [
        ("integrated_gradients:n_step=4", "unknown parameter 'n_step'"),
        ("integrated_gradients:n_steps=0", "n_steps"),
        ("integrated_gradients:n_steps=nope", "n_steps"),
        ("n_steps=3", "needs a method before it"),
        ("saliency:oops", "key=value"),
    ],
)
def test_bad_method_parameters_are_one_line_config_errors(methods, message):
    with pytest.raises(ConfigError, match=message) as ei:
        build_config(None, {"input": str(SAMPLES), "methods": methods})
    assert "\n" not in str(ei.value)


def test_metric_parameters_on_the_command_line():
    cfg = build_config(None, {"input": str(SAMPLES), "metrics": "deletion:step=0.05,avg-drop"})
    assert [(m.name, m.params) for m in cfg.metrics] == [("deletion", {"step": 0.05}), ("avg-drop", {})]


def test_target_by_class_name_in_a_config_is_not_rebased(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text(f"input: {SAMPLES}\ntarget: tiger cat\n")
    assert build_config(conf).target == "tiger cat"
    with pytest.raises(ConfigError, match="labels file"):
        build_config(None, {"input": str(SAMPLES), "target": "missing/labels.csv"})


@pytest.mark.slow
def test_cli_several_inputs_params_and_target_by_name(tmp_path):
    jpgs = sorted(str(p) for p in SAMPLES.glob("*.jpg"))  # what an unquoted glob gives
    out = tmp_path / "o"
    r = run_xai(
        "explain",
        *jpgs,
        SAMPLES / "coffee.png",
        "-m",
        "integrated_gradients:n_steps=4,baseline=blur,id=ig4",
        "--target",
        "Tiger Cat",
        "-o",
        out,
        "-q",
    )
    assert r.returncode == 0, r.stderr
    rows = _rows(out / "explanations.csv")
    assert sorted(r["image"] for r in rows) == ["china", "coffee", "flower", "rocket"]
    assert {r["method"] for r in rows} == {"ig4"} and {r["target_label"] for r in rows} == {"tiger cat"}
    conf = yaml.safe_load((out / "run.yaml").read_text())["config"]
    assert conf["methods"] == [{"name": "integrated_gradients", "id": "ig4", "n_steps": 4, "baseline": "blur"}]
    r = run_xai("explain", SAMPLES / "coffee.png", "--target", "tiger kat", "-o", tmp_path / "p")
    assert r.returncode == 2 and "did you mean: 'tiger cat'" in r.stderr and "Traceback" not in r.stderr


def test_init_prints_a_commented_config_that_validates(tmp_path):
    r = run_xai("init", "--input", str(SAMPLES), "--out", str(tmp_path / "o"))
    assert r.returncode == 0 and r.stdout.count("#") > 20
    (tmp_path / "xai.yaml").write_text(r.stdout)
    cfg = build_config(tmp_path / "xai.yaml")
    assert cfg.input.path == str(SAMPLES) and cfg.output == str(tmp_path / "o")
    for name in ("demo", "nightly", "lrp", "perturbation"):
        r = run_xai("init", name)
        doc = yaml.safe_load(r.stdout)
        inp = doc["input"]["path"] if isinstance(doc["input"], dict) else doc["input"]
        assert r.returncode == 0 and inp == "imgs/" and doc["output"] == "xai-out", name
    assert run_xai("init", "nope").returncode == 2


def test_shipped_configs_are_the_repository_configs():
    from xaicli.cli import EXAMPLES, example_config

    assert sorted(EXAMPLES) == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    for name in EXAMPLES:
        assert example_config(name) == (ROOT / "configs" / f"{name}.yaml").read_text()


def test_completion_and_flags_in_help():
    r = run_xai("--show-completion", "bash", env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert r.returncode == 0 and "complete" in r.stdout
    from xaicli.cli import _complete_names

    assert _complete_names("methods")("gradcam,integrated_g") == ["gradcam,integrated_gradients"]
    for cmd in ("explain", "evaluate", "report", "check"):
        r = run_xai(cmd, "--help")
        assert r.returncode == 0 and "<bool>" not in r.stdout, cmd
    assert "--install-completion" in run_xai("--help").stdout
