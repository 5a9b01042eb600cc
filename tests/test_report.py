"""Issue #12: readable overlays (scaling by map kind), comparison sheets, per-class summaries,
`xai report` and `--json`."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import SAMPLE_FILES, run_xai
from xaicli.ops import display01, normalize01
from xaicli.outputs import caption_strip, colormap_lut, overlay, write_csv


def _rows(p: Path) -> list[dict]:
    with open(p, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------
# overlay scaling
# --------------------------------------------------------------------------------------------
def _sparse_saliency(n: int = 224, hot: int = 30, seed: int = 0) -> np.ndarray:
    """A gradient-magnitude-like map: small values everywhere, its mass in `hot` pixels."""
    g = np.random.default_rng(seed)
    m = np.abs(g.normal(0.0, 0.01, (n, n))).astype(np.float32)
    idx = g.choice(n * n, hot, replace=False)
    m.flat[idx] = 5.0
    return m


def test_gradient_magnitudes_are_clipped_so_the_overlay_shows_more_than_specks():
    m = _sparse_saliency()
    orig = np.zeros((224, 224, 3), dtype=np.uint8)
    lut = colormap_lut("jet").astype(np.int32)

    def share_above_mid(img):
        # at alpha 1 each pixel's colour is a LUT entry: find it, count those above the midpoint
        flat = img.reshape(-1, 3).astype(np.int32)
        idx = np.array([((lut - c) ** 2).sum(1).argmin() for c in np.unique(flat, axis=0)])
        colours = {tuple(c): i for c, i in zip(np.unique(flat, axis=0), idx, strict=True)}
        return float(np.mean([colours[tuple(c)] > 127 for c in flat]))

    clipped = share_above_mid(overlay(orig, m, (0, 0, 224, 224), "jet", 1.0, "magnitude", 99.5))
    minmax = share_above_mid(overlay(orig, m, (0, 0, 224, 224), "jet", 1.0, "positive"))
    assert clipped >= 0.05, clipped
    assert minmax < 0.01, minmax  # what min-max scaling showed before: specks on a dark sheet


def test_signed_map_with_equal_mass_renders_zero_at_the_colormaps_centre():
    m = np.zeros((16, 16), dtype=np.float32)
    m[:6, :5] = 1.0  # 30 pixels at +1
    m[12:14, :5] = -3.0  # 10 pixels at -3: the same mass (30) as the positive part, in fewer pixels
    assert m[m > 0].sum() == -m[m < 0].sum()
    v = display01(torch.from_numpy(m)[None], "signed", 100.0)[0]
    assert torch.all(v[m == 0] == 0.5)
    assert torch.all(v[m == -3.0] == 0.0) and torch.allclose(v[m == 1.0], torch.tensor(0.5 + 0.5 / 3))
    lut = colormap_lut("bwr")
    photo = np.full((16, 16, 3), 77, np.uint8)
    img = overlay(photo, m, (0, 0, 16, 16), "bwr", 1.0, "signed", 100.0)
    assert (img[m == 0] == 77).all()  # zero attribution: the photo, not the colormap's white washed over it
    assert (img[m == -3.0] == lut[0]).all()  # full strength: the colour itself
    assert (img[m == 1.0] == lut[170]).all()  # a third of the clip scale: opaque already (from a quarter)
    w = np.where(m == 1.0, 0.25, m).astype(np.float32)  # the clip scale stays 3: 0.25 is 1/12 of it
    weak = overlay(photo, w, (0, 0, 16, 16), "bwr", 1.0, "signed", 100.0)
    want = 77 * (2 / 3) + lut[round(255 * (0.5 + 0.5 / 12))].astype(np.float32) / 3 + 0.5  # 1/12 -> 1/3 opaque
    assert (np.abs(weak[m == 1.0].astype(int) - want.astype(np.uint8).astype(int)) <= 1).all()
    # min-max would have put zero at 0.75 of the colormap, not at its centre
    assert torch.allclose(normalize01(torch.from_numpy(m)[None])[0][m == 0], torch.tensor(0.75))


def test_signed_clipping_is_symmetric_and_an_all_zero_map_is_the_centre():
    m = torch.linspace(-1, 1, 201)[None].repeat(2, 1)
    m[1] = 0
    v = display01(m, "signed", 90.0)
    # |m| 90th percentile = 0.9: values beyond +/-0.9 saturate, 0 stays at the centre
    assert v[0, 0] == 0.0 and v[0, -1] == 1.0 and v[0, 100] == 0.5
    assert torch.all(v[1] == 0.5)
    c = display01(torch.full((1, 4, 4), 0.7), "magnitude")
    assert torch.all(c == 1.0)  # a constant positive map: everything matters, as with min-max


def test_methods_declare_their_map_kind():
    from xaicli.methods import build_method

    kinds = {
        "gradcam": "positive",
        "scorecam": "positive",
        "saliency": "magnitude",
        "guided_backprop": "magnitude",
        "guided_gradcam": "magnitude",
        "inputxgrad": "signed",
        "integrated_gradients": "signed",
    }
    for name, kind in kinds.items():
        assert build_method(name).map_kind == kind, name
    assert build_method("smoothgrad").map_kind == "magnitude"
    assert build_method("smoothgrad", base="inputxgrad").map_kind == "signed"
    assert build_method("smoothgrad", base="inputxgrad", squared=True).map_kind == "magnitude"


def test_caption_strip_adds_a_strip_below_and_keeps_the_image():
    img = np.full((60, 100, 3), 200, np.uint8)
    out = caption_strip(img, "gradcam: tiger cat (p 0.39)", "jet")
    assert out.shape[1] == 100 and out.shape[0] > 60
    assert (out[:60] == img).all()
    strip = out[60:]
    assert (strip != strip[0, 0]).any(axis=-1).sum() > 50  # text and colorbar drawn


def test_overlay_config_section_and_top_level_keys(tmp_path):
    from xaicli.config import build_config
    from xaicli.errors import ConfigError
    from xaicli.state import config_hash

    base = build_config(overrides={"input": str(tmp_path)})
    old = build_config(overrides={"input": str(tmp_path), "colormap": "viridis", "alpha": 0.3})
    st = old.overlay_style()
    assert (st.colormap, st.alpha, st.clip_percentile, st.caption) == ("viridis", 0.3, 99.5, False)
    new = build_config(overrides={"input": str(tmp_path), "overlay": {"colormap": "magma", "caption": True}})
    assert new.overlay_style().colormap == "magma" and new.overlay_style().alpha == 0.5
    # the overlay section counts in the hash only when set (an old config keeps its hash)
    d = {k: v for k, v in base.model_dump().items() if k != "overlay"}
    assert config_hash(base) == config_hash(type(base).model_validate(d))
    assert config_hash(new) != config_hash(base)
    sheet = build_config(overrides={"input": str(tmp_path), "sheet": True})
    assert config_hash(sheet) == config_hash(base)
    with pytest.raises(ConfigError, match="overlay.clip_percentile"):
        build_config(overrides={"input": str(tmp_path), "overlay": {"clip_percentile": 10}})
    with pytest.raises(ConfigError, match="overlay.diverging"):
        build_config(overrides={"input": str(tmp_path), "overlay": {"diverging": "nope"}})


# --------------------------------------------------------------------------------------------
# a real run: explain with metrics, --sheet, --report, --json
# --------------------------------------------------------------------------------------------
class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.tags, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href") and v is not None:
                self.refs.append(v)

    def handle_data(self, data):
        self.text.append(data)


def _data_js(rdir: Path) -> dict:
    js = (rdir / "data.js").read_text()
    return json.loads(js[js.index("=") + 1 :].strip().rstrip(";"))


def _check_local(ref: str) -> None:
    assert not re.match(r"^(?:[a-z][a-z0-9+.-]*:|//)", ref, re.I), f"off-machine or absolute URL: {ref}"


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    imgs = tmp / "imgs"
    shutil.copytree(Path(__file__).resolve().parents[1] / "sample_images", imgs)
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    labels = tmp / "labels.csv"
    labels.write_text(
        "image,class\nchelsea,tiger cat\ncoffee,espresso\nastronaut,0\nchina,palace\nflower,daisy\nrocket,missile\n"
    )
    cfg = tmp / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "methods": ["gradcam", "saliency"],
                "input": str(imgs),
                "output": str(tmp / "out"),
                "target": str(labels),
                "workers": 0,
                "metrics": [{"name": "deletion", "step": 0.2}, {"name": "insertion", "step": 0.2}],
                "overlay": {"caption": True, "colorbar": True},
            }
        )
    )
    r = run_xai("explain", "--config", cfg, "--sheet", "--report", "--json")
    return tmp / "out", r


@pytest.mark.slow
def test_explain_json_matches_the_files_written(reported):
    out, r = reported
    assert r.returncode == 1, r.stderr  # broken.jpg failed
    doc = json.loads(r.stdout)  # stdout is exactly one JSON object
    images = [n.rsplit(".", 1)[0] for n in SAMPLE_FILES]
    expl = _rows(out / "explanations.csv")
    assert doc["command"] == "explain" and doc["exit_code"] == 1 and doc["status"] == "done"
    assert doc["images"] == len(images) + 1 and doc["done"] == len(images) and doc["failed"] == 1
    assert len(expl) == 2 * doc["done"]  # one row per (image, method)
    assert doc["failed"] == len(_rows(out / "errors.csv"))
    for key in ("explanations.csv", "errors.csv", "manifest.json", "metrics_summary.csv", "report", "sheets"):
        assert Path(doc["files"][key]).exists(), key
    summary = {(s["method"], s["metric"]): s for s in _rows(out / "metrics_summary.csv")}
    assert {(m["method"], m["metric"]) for m in doc["metrics"]} == set(summary)
    for m in doc["metrics"]:
        assert m["mean"] == pytest.approx(float(summary[(m["method"], m["metric"])]["mean"]))
    # overlays with the caption strip; sheets: one per image, original + 2 methods
    with Image.open(out / "saliency" / "chelsea.png") as ov, Image.open(out.parent / "imgs" / "chelsea.png") as o:
        assert ov.width == o.width and ov.height > o.height
    for name in images:
        with Image.open(out / "sheets" / f"{name}.png") as sh:
            assert sh.width > 3 * 200


@pytest.mark.slow
def test_per_class_summary_by_predicted_and_true_class(reported):
    out, _ = reported
    rows = _rows(out / "metrics_summary_by_class.csv")
    expl = {r["image"]: r for r in _rows(out / "explanations.csv")}
    metrics = _rows(out / "metrics.csv")
    assert {r["by"] for r in rows} == {"predicted", "true"}
    # recompute one group by hand: predicted class of chelsea, gradcam deletion
    k = expl["chelsea"]["top1_class"]
    members = [
        float(m["value"])
        for m in metrics
        if m["method"] == "gradcam" and m["metric"] == "deletion" and expl[m["image"]]["top1_class"] == k
    ]
    row = next(
        r
        for r in rows
        if r["by"] == "predicted" and r["class"] == k and r["method"] == "gradcam" and r["metric"] == "deletion"
    )
    assert int(row["n"]) == len(members) and float(row["mean"]) == pytest.approx(np.mean(members))
    true = [r for r in rows if r["by"] == "true" and r["method"] == "gradcam" and r["metric"] == "deletion"]
    assert sum(int(r["n"]) for r in true) == len(expl)
    assert {r["label"] for r in true} >= {"tiger cat", "espresso"}


@pytest.mark.slow
def test_report_references_exist_parse_and_stay_on_the_machine(reported):
    out, _ = reported
    rdir = out / "report"
    page = (rdir / "index.html").read_text()
    p = _Refs()
    p.feed(page)
    p.close()
    assert "table" in p.tags and "script" in p.tags
    assert not re.search(r"https?://", page), "the page must not name any URL"
    for ref in p.refs:
        _check_local(ref)
        if ref.startswith("#"):
            continue
        assert (rdir / unquote(ref)).resolve().is_file(), ref
    data = _data_js(rdir)
    names = sorted(n.rsplit(".", 1)[0] for n in SAMPLE_FILES)
    assert sorted(r["i"] for r in data["rows"]) == names  # one row per image
    assert data["methods"] == ["gradcam", "saliency"] and set(data["metrics"]) == {"deletion", "insertion"}
    refs = []
    for r in data["rows"]:
        refs += [r["th"], r["sh"]] + [v for m in r["m"].values() for v in (m["th"], m["ov"])]
        assert set(r["m"]["gradcam"]["v"]) == {"deletion", "insertion"}
    assert all(refs), "every image of a run without failures has thumbnails, a sheet and overlays"
    for ref in refs:
        _check_local(ref)
        assert (rdir / unquote(ref)).resolve().is_file(), ref
        assert (rdir / unquote(ref)).resolve().is_relative_to(out.resolve())
    # the metric plots and the error of broken.jpg are in the page
    assert "metrics_deletion.png" in page and "metrics_insertion.png" in page
    text = " ".join(p.text)
    assert "broken" in text and "errors (1)" in text
    assert "Means per class" in text


@pytest.mark.slow
def test_report_command_json_and_second_run_writes_nothing_new(reported):
    out, _ = reported
    r = run_xai("report", out, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["index"] == str(out / "report" / "index.html") and Path(doc["index"]).is_file()
    assert doc["images"] == len(SAMPLE_FILES) and doc["errors"] == 1 and doc["methods"] == ["gradcam", "saliency"]
    assert doc["sheets_written"] == 0 and doc["thumbs_written"] == 0  # generated once, by the first run


@pytest.mark.slow
def test_evaluate_json_matches_the_files_and_writes_the_report(reported):
    out, _ = reported
    r = run_xai("evaluate", out, "--config", out.parent / "run.yaml", "--metric", "deletion", "--json", "--report")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["command"] == "evaluate" and doc["exit_code"] == 0 and doc["images"] == len(SAMPLE_FILES)
    summary = {(s["method"], s["metric"]): s for s in _rows(out / "metrics_summary.csv")}
    # the JSON (like the printed table) lists the metrics this evaluate computed; metrics_summary.csv
    # covers every metric of the folder (insertion from the explain run stays)
    assert {(m["method"], m["metric"]) for m in doc["metrics"]} == {("gradcam", "deletion"), ("saliency", "deletion")}
    assert {("gradcam", "deletion"), ("saliency", "deletion"), ("gradcam", "insertion")} <= set(summary)
    for m in doc["metrics"]:
        assert m["n"] == int(summary[(m["method"], m["metric"])]["n"]) == len(SAMPLE_FILES)
        assert m["mean"] == pytest.approx(float(summary[(m["method"], m["metric"])]["mean"]))
        assert m["better"] == ("lower" if m["metric"] == "deletion" else "higher")
    assert Path(doc["files"]["report"]).is_file() and Path(doc["files"]["metrics_summary_by_class.csv"]).is_file()
    assert all(Path(p).is_file() for p in doc["plots"])


def test_report_of_a_missing_folder_is_a_usage_error(tmp_path):
    r = run_xai("report", tmp_path / "nope")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no such output folder" in r.stderr


# --------------------------------------------------------------------------------------------
# fabricated folders: no model
# --------------------------------------------------------------------------------------------
def _fabricate(out: Path, n: int, src: Path | None, methods=("gradcam", "saliency"), maps: bool = False) -> None:
    from xaicli.outputs import explanation_fields, map_paths, save_npy, save_png

    out.mkdir(parents=True)
    cfg = {"methods": [{"name": m} for m in methods], "input": {"path": str(out.parent)}, "target": "predicted"}
    (out / "run.yaml").write_text(yaml.safe_dump({"config": cfg, "resolved": {}, "versions": {}}))
    rows, mrows = [], []
    for i in range(n):
        image = f"d{i // 1000}/img{i:05d}"
        for j, m in enumerate(methods):
            rows.append(
                {
                    "image": image,
                    "method": m,
                    "target_class": i % 7,
                    "target_label": f"class {i % 7}",
                    "target_prob": "0.5",
                    "top1_class": i % 7,
                    "top1_label": f"class {i % 7}",
                    "top1_prob": f"{(i % 100) / 100:.2f}",
                    "seconds": "0.01",
                    "map_min": "0",
                    "map_max": "1",
                    "status": "ok",
                    "path": str(src or out / "gone.png"),
                }
            )
            mrows.append({"image": image, "method": m, "metric": "deletion", "value": f"{((i * 37 + j) % 101) / 100}"})
            if maps:
                png, npy = map_paths(out, m, image)
                png.parent.mkdir(parents=True, exist_ok=True)
                save_npy(npy, np.zeros((8, 8), np.float32))
                save_png(png, np.full((12, 16, 3), 40 * j, np.uint8))
    write_csv(out / "explanations.csv", explanation_fields(), rows)
    write_csv(out / "metrics.csv", ["image", "method", "metric", "value"], mrows)
    write_csv(out / "errors.csv", ["image", "path", "reason"], [{"image": "bad", "path": "x", "reason": "oops"}])


def test_report_of_ten_thousand_images_stays_bounded(tmp_path):
    from xaicli.report import PAGE_SIZE, write_report

    out = tmp_path / "big"
    _fabricate(out, 10_000, None)
    t0 = time.perf_counter()
    rep = write_report(out)
    seconds = time.perf_counter() - t0
    page = (out / "report" / "index.html").read_text()
    data = _data_js(out / "report")
    assert rep.images == 10_000 and len(data["rows"]) == 10_000 and data["page"] == PAGE_SIZE <= 100
    assert len(page) < 60_000  # the page itself does not grow with the images: rows are drawn per page
    assert page.count("<tr") < 50
    assert (out / "report" / "data.js").stat().st_size < 10_000 * 400
    assert seconds < 30, seconds
    assert "oops" in page


def test_thumbnails_and_sheets_are_written_once(tmp_path):
    from xaicli.report import write_report

    src = tmp_path / "src.png"
    Image.new("RGB", (20, 15), (200, 10, 10)).save(src)
    out = tmp_path / "small"
    _fabricate(out, 3, src, maps=True)
    for plot in ("metrics_deletion.png", "sanity_gradcam.png"):
        Image.new("RGB", (30, 20)).save(out / plot)
    write_csv(
        out / "metrics_summary_by_class.csv",
        ["by", "class", "label", "method", "metric", "mean", "std", "n"],
        [{"by": "predicted", "class": 3, "label": "class 3", "method": "gradcam", "metric": "deletion", "mean": 0.25}],
    )
    first = write_report(out)
    assert first.sheets_written == 3 and first.thumbs_written == 3 + 3 * 2
    page = (out / "report" / "index.html").read_text()
    assert 'src="../metrics_deletion.png"' in page and 'src="../sanity_gradcam.png"' in page
    assert "Means per class" in page and "class 3 (3)" in page and "Sanity check" in page
    second = write_report(out)
    assert second.sheets_written == 0 and second.thumbs_written == 0
    ov = out / "saliency" / "d0" / "img00001.png"
    future = time.time() + 5
    os.utime(ov, (future, future))
    third = write_report(out)
    assert third.sheets_written == 1 and third.thumbs_written == 1


# --------------------------------------------------------------------------------------------
# the page in a browser (Debian's chromium; `make test-browser` installs it)
# --------------------------------------------------------------------------------------------
def _browser() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


ROW_RE = re.compile(r"<tr class=\"row[^\"]*\" data-image=\"([^\"'+]+)\"")  # drawn rows, not the script's text


def _dump_dom(browser: str, url: str) -> str:
    r = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_browser_renders_one_row_per_image_and_sorts_by_a_metric(tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser installed (Debian: apt-get install chromium; or `make test-browser`)")
    from xaicli.report import write_report

    src = tmp_path / "src.png"
    Image.new("RGB", (20, 15), (10, 100, 10)).save(src)
    out = tmp_path / "run"
    _fabricate(out, 12, src, maps=True)
    write_report(out)
    url = (out / "report" / "index.html").resolve().as_uri()
    dom = _dump_dom(browser, url)
    order = ROW_RE.findall(dom)
    assert sorted(order) == sorted(f"d0/img{i:05d}" for i in range(12))  # one row per image
    assert "12 of 12 images" in dom
    vals = {r["image"]: float(r["value"]) for r in _rows(out / "metrics.csv") if r["method"] == "saliency"}
    dom = _dump_dom(browser, url + "#sort=saliency%7Cdeletion&dir=desc")
    order = ROW_RE.findall(dom)
    assert order == sorted(vals, key=lambda k: -vals[k]) and order != sorted(order)
    # filters: a metric threshold, and a class
    dom = _dump_dom(browser, url + "#metric=saliency%7Cdeletion&op=ge&value=0.5")
    assert sorted(ROW_RE.findall(dom)) == sorted(k for k, v in vals.items() if v >= 0.5)
    dom = _dump_dom(browser, url + "#cls=class%203")
    assert ROW_RE.findall(dom) == ["d0/img00003", "d0/img00010"]


def test_summarize_by_class_groups_by_predicted_and_labelled_class(tmp_path):
    from xaicli.outputs import explanation_fields
    from xaicli.sinks import summarize_by_class

    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"config": {"target": str(tmp_path / "labels.csv")}}))
    expl = [
        {"image": "a", "method": "m", "top1_class": 1, "top1_label": "one", "target_class": 2, "target_label": "two"},
        {"image": "b", "method": "m", "top1_class": 1, "top1_label": "one", "target_class": 1, "target_label": "one"},
        {"image": "c", "method": "m", "top1_class": "", "top1_label": "", "target_class": "", "target_label": ""},
    ]
    write_csv(tmp_path / "explanations.csv", explanation_fields(), expl)
    rows = [
        {"image": i, "method": "m", "metric": "deletion", "value": v}
        for i, v in (("a", "0.2"), ("b", "0.4"), ("c", "9"))
    ]
    got = {(r["by"], r["class"]): (float(r["mean"]), int(r["n"])) for r in summarize_by_class(tmp_path, rows)}
    assert got == {("predicted", "1"): (pytest.approx(0.3), 2), ("true", "1"): (0.4, 1), ("true", "2"): (0.2, 1)}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"config": {"target": "predicted"}}))
    assert {r["by"] for r in summarize_by_class(tmp_path, rows)} == {"predicted"}


def test_references_are_relative_and_percent_encoded():
    from xaicli.report import _rel

    assert _rel(Path("/o/gradcam/a #1.png"), Path("/o/report")) == "../gradcam/a%20%231.png"
