"""Targets: predicted class (default), a fixed class index, or a labels file."""

import csv

import pytest

from conftest import SAMPLES
from xaicli.config import build_config
from xaicli.errors import ConfigError
from xaicli.explain_run import run_explain


def rows(path):
    with open(path, newline="") as f:
        return {r["image"]: r for r in csv.DictReader(f)}


def cfg(tmp_path, **kw):
    return build_config(None, {"input": str(SAMPLES), "output": str(tmp_path / "o"), "workers": 0, **kw})


def test_fixed_class_index(tmp_path):
    run_explain(cfg(tmp_path, target=967, methods="saliency"))  # espresso for every image
    table = rows(tmp_path / "o" / "explanations.csv")
    assert {r["target_class"] for r in table.values()} == {"967"}
    assert table["chelsea"]["top1_label"] == "tiger cat" and table["chelsea"]["target_label"] == "espresso"
    assert float(table["chelsea"]["target_prob"]) < 0.01


def test_labels_file_by_index_and_name(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("image,class\nchelsea.png,285\ncoffee,cup\nrocket.jpg,657\n")
    s = run_explain(cfg(tmp_path, target=str(labels), methods="gradcam"))
    table = rows(tmp_path / "o" / "explanations.csv")
    assert table["chelsea"]["target_class"] == "285" and table["chelsea"]["target_label"] == "Egyptian cat"
    assert table["coffee"]["target_label"] == "cup"
    assert set(table) == {"chelsea", "coffee", "rocket"}
    assert s.failed == 3  # astronaut, china, flower have no label: errors.csv, not a crash
    errs = rows(tmp_path / "o" / "errors.csv")
    assert set(errs) == {"astronaut", "china", "flower"} and "labels file" in errs["china"]["reason"]


def test_bad_labels_file(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\nchelsea.png,285\n")
    with pytest.raises(ConfigError, match="image,class"):
        run_explain(cfg(tmp_path, target=str(labels)))
    labels.write_text("image,class\nchelsea.png,not_a_class\n")
    with pytest.raises(ConfigError, match="not_a_class"):
        run_explain(cfg(tmp_path, target=str(labels)))
    with pytest.raises(ConfigError, match="out of range"):
        run_explain(cfg(tmp_path, target=5000))
