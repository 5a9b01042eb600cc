"""Config errors: each kind gives one line naming the key/file, exit code 2, no traceback."""

import textwrap

import pytest

from conftest import SAMPLES, run_xai
from xaicli.cli import main
from xaicli.config import build_config
from xaicli.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize(
    "body, needle",
    [
        ("input: {img}\nbatchsize: 4\n", "unknown key 'batchsize'"),
        ("input: {img}\nbatch_size: many\n", "'batch_size'"),
        ("input: {img}\nbatch_size: 0\n", "'batch_size'"),
        ("input: /no/such/folder\n", "does not exist"),
        ("input: {img}\nmethods: [nosuch]\n", "unknown method 'nosuch' (allowed:"),
        ("input: {img}\nmethods: [{{name: gradcam, bogus: 1}}]\n", "unknown parameter 'bogus'"),
        ("input: {img}\nmodel: {{name: default, colour: red}}\n", "unknown key 'model.colour'"),
        ("input: {img}\nmodel: resnet\n", "unknown spec 'resnet'"),
        ("input: {img}\ndevice: tpu\n", "'device'"),
        ("input: {img}\ntarget: labels_missing.csv\n", "'target'"),
        ("input: {img}\ncolormap: nocmap\n", "'colormap'"),
        ("input: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "top level must be a mapping"),
    ],
)
def test_config_errors_cli(tmp_path, capsys, body, needle):
    cfg = write(tmp_path, body.format(img=SAMPLES))
    with pytest.raises(SystemExit) as e:
        main(["explain", "--config", str(cfg), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert needle in " ".join(err.split()), err
    assert "Traceback" not in err


def test_config_error_in_subprocess_has_no_traceback(tmp_path):
    cfg = write(tmp_path, f"input: {SAMPLES}\nbatchsize: 4\n")
    r = run_xai("explain", "--config", cfg, "--out", tmp_path / "out", "--quiet")
    assert r.returncode == 2 and "unknown key 'batchsize'" in r.stderr and "Traceback" not in r.stderr


def test_missing_config_file(tmp_path):
    r = run_xai("explain", "--config", tmp_path / "nope.yaml")
    assert r.returncode == 2 and "config file not found" in r.stderr and "Traceback" not in r.stderr


def test_flags_override_config_and_paths_are_relative_to_file(tmp_path):
    (tmp_path / "sub").mkdir()
    cfg = tmp_path / "sub" / "c.yaml"
    cfg.write_text("input: imgs\noutput: out\nbatch_size: 4\nmethods: [saliency]\n")
    (tmp_path / "sub" / "imgs").mkdir()
    c = build_config(cfg, {"batch_size": 2, "methods": "gradcam,saliency"})
    assert c.batch_size == 2
    assert [m.name for m in c.methods] == ["gradcam", "saliency"]
    assert c.input.path == str(tmp_path / "sub" / "imgs")
    assert c.output == str(tmp_path / "sub" / "out")


def test_method_params_and_ids():
    c = build_config(
        None, {"input": str(SAMPLES), "methods": ["gradcam", {"name": "gradcam", "id": "cf", "counterfactual": True}]}
    )
    assert c.methods[1].params == {"counterfactual": True} and c.methods[1].key == "cf"
    with pytest.raises(ConfigError, match="appears twice"):
        build_config(None, {"input": str(SAMPLES), "methods": ["gradcam", "gradcam"]})
    with pytest.raises(ConfigError, match="counterfactual"):
        build_config(None, {"input": str(SAMPLES), "methods": [{"name": "gradcam", "counterfactual": "maybe"}]})


def test_example_configs_validate():
    from conftest import ROOT

    for p in sorted((ROOT / "configs").glob("*.yaml")):
        if "nightly" in p.name:  # points at /srv paths that do not exist here
            continue
        if p.name == "concepts.yaml":  # `xai concepts` (docs/concepts.md): its own schema
            from xaicli.concepts.config import build_concepts_config

            cfg = build_concepts_config(p)
            assert cfg.tcav is not None and cfg.extract is not None
            continue
        build_config(p)
