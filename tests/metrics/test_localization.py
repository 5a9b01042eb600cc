"""Pointing game (15 px tolerance, per-class protocol), energy pointing (x/y not swapped), box IoU,
annotation files (with class labels)."""

import json
import math

import pytest
import torch

from xaicli.errors import ConfigError
from xaicli.metrics import build_metric
from xaicli.metrics.localization import Annotations, largest_component_box, to_input_frame
from xaicli.models import Preprocess

H = W = 224


def peak_map(r, c):
    m = torch.zeros(1, H, W)
    m[0, r, c] = 1.0
    return m


@pytest.mark.parametrize("gap, hit", [(14.9, True), (15.0, True), (15.1, False)])
def test_pointing_tolerance_is_15px(gap, hit):
    # the maximum is pixel (row 100, col 100): its centre is (100.5, 100.5)
    pg = build_metric("pointing-game")
    right = torch.tensor([[100.5 + gap, 0.0, 200.0, 224.0]])  # a box `gap` px to the right
    assert pg(None, None, peak_map(100, 100), None, boxes=[right])["pointing-game"].item() == (100.0 if hit else 0.0)
    if gap == 15.0:
        return  # exactly on the circle: only exact along an axis in float32
    # diagonal: dx = dy = gap / sqrt(2) -> Euclidean distance = gap (not the L-inf or L1 distance)
    d = gap / 2**0.5
    diag = torch.tensor([[100.5 + d, 100.5 + d, 220.0, 220.0]])
    assert pg(None, None, peak_map(100, 100), None, boxes=[diag])["pointing-game"].item() == (100.0 if hit else 0.0)


def test_pointing_any_box_and_batch():
    pg = build_metric("pointing-game", tolerance=0)
    maps = torch.cat([peak_map(10, 200), peak_map(200, 10)])
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [190.0, 0.0, 224.0, 30.0]]), torch.tensor([[0.0, 0.0, 20.0, 20.0]])]
    assert pg(None, None, maps, None, boxes=boxes)["pointing-game"].tolist() == [100.0, 0.0]


def test_energy_pointing_wide_box_catches_swapped_axes():
    # a wide, short box: x 20..200, y 40..60; all the map's energy lies exactly inside it
    box = torch.tensor([[20.0, 40.0, 200.0, 60.0]])
    m = torch.zeros(1, H, W)
    m[0, 40:60, 20:200] = 1.0  # rows = y, cols = x
    e = build_metric("energy-pointing")(None, None, m, None, boxes=[box])["energy-pointing"].item()
    assert e == pytest.approx(1.0)
    # the same box read as [x1:x2, y1:y2] (rows 20..200, cols 40..60) would hold only 20*20/(180*20)
    swapped = torch.zeros(1, H, W)
    swapped[0, 20:200, 40:60] = 1.0
    e2 = build_metric("energy-pointing")(None, None, swapped, None, boxes=[box])["energy-pointing"].item()
    assert e2 == pytest.approx(20 * 20 / (180 * 20))
    # negative values carry no energy; an all-zero map scores 0, not NaN
    z = build_metric("energy-pointing")(None, None, -m, None, boxes=[box])["energy-pointing"]
    assert z.item() == 0.0


def test_largest_component_box_8_connected():
    mask = torch.zeros(1, 50, 60, dtype=torch.bool)
    mask[0, 5:8, 5:8] = True  # small blob: 9 px
    # a diagonal chain of 12 px: connected only through corners (8-connectivity)
    for i in range(12):
        mask[0, 20 + i, 30 + i] = True
    assert largest_component_box(mask).tolist() == [[30.0, 20.0, 42.0, 32.0]]
    assert largest_component_box(torch.zeros(1, 5, 5, dtype=torch.bool)).tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_box_localization_iou():
    m = torch.zeros(2, H, W)
    m[:, 50:100, 60:160] = 1.0  # the big blob: x 60..160, y 50..100
    m[:, 200:205, 200:205] = 5.0  # a small but stronger blob elsewhere
    # threshold 0.15 * 5 = 0.75: both blobs pass; the larger one gives the box
    gt = [torch.tensor([[60.0, 50.0, 160.0, 100.0]]), torch.tensor([[0.0, 0.0, 30.0, 30.0]])]
    res = build_metric("box-loc")(None, None, m, None, boxes=gt)
    assert res["box-iou"].tolist() == pytest.approx([1.0, 0.0])
    assert res["box-loc"].tolist() == [100.0, 0.0]
    # a high threshold keeps only the strong small blob
    res = build_metric("box-loc", threshold=0.5)(None, None, m, None, boxes=gt)
    assert res["box-loc"].tolist() == [0.0, 0.0]


def test_boxes_map_from_original_pixels_into_the_crop():
    pre = Preprocess((224, 224), 256)
    # 512 x 1024 (w x h, portrait): resize to 256 x 512, crop 224 at left 16, top 144 -> scale 0.5
    crop = pre.crop_box(512, 1024)
    assert crop == pytest.approx((32.0, 288.0, 480.0, 736.0))
    b = to_input_frame(torch.tensor([[132.0, 328.0, 152.0, 388.0], [0.0, 0.0, 10.0, 10.0]]), crop, (224, 224))
    assert b.tolist() == [[50.0, 20.0, 60.0, 50.0]]  # the second box lies outside the crop: dropped


def test_annotation_files(tmp_path):
    (tmp_path / "b.csv").write_text(
        "image,x1,y1,x2,y2,label\ncats/a,1,2,30,40,cat\ncats/a,5,5,9,9,cat\nb.jpg,0,0,1,1,x\n"
    )
    ann = Annotations.load(tmp_path / "b.csv")
    assert ann.lookup("cats/a", tmp_path / "cats" / "a.png") == [(1, 2, 30, 40), (5, 5, 9, 9)]
    assert ann.lookup("b", tmp_path / "b.jpg") == [(0, 0, 1, 1)]
    assert ann.lookup("zzz", tmp_path / "zzz.jpg") is None
    (tmp_path / "b.json").write_text(json.dumps({"a": [[1, 2, 3, 4]], "c.png": [1, 1, 2, 2]}))
    ann = Annotations.load(tmp_path / "b.json")
    assert ann.lookup("a", None) == [(1, 2, 3, 4)] and ann.lookup("c", tmp_path / "c.png") == [(1, 1, 2, 2)]
    (tmp_path / "v.xml").write_text(
        "<annotation><filename>dog.jpg</filename><object><name>dog</name>"
        "<bndbox><xmin>11</xmin><ymin>21</ymin><xmax>50</xmax><ymax>60</ymax></bndbox></object></annotation>"
    )
    assert Annotations.load(tmp_path / "v.xml").lookup("dog", tmp_path / "dog.jpg") == [(10, 20, 50, 60)]
    (tmp_path / "bad.csv").write_text("image,x,y\na,1,2\n")
    with pytest.raises(ConfigError, match="needs a header"):
        Annotations.load(tmp_path / "bad.csv")
    (tmp_path / "inv.csv").write_text("image,x1,y1,x2,y2\na,10,10,5,20\n")
    with pytest.raises(ConfigError, match="x2 > x1"):
        Annotations.load(tmp_path / "inv.csv")


# --------------------------------------------------------------------------------------------
# pointing game: TorchRay's per-class protocol (average: class)
# --------------------------------------------------------------------------------------------
def peaked_maps(points):
    maps = torch.zeros(len(points), 32, 32)
    for i, (r, c) in enumerate(points):
        maps[i, r, c] = 1.0
    return maps


def test_pointing_game_per_class_protocol_by_hand():
    """Four images; maps peak at (row, col) below; tolerance 0. Image 2 (class 1) has a box around
    its peak labelled 2 and a far box labelled 1: averaged over images it is a hit (any box), under
    the per-class protocol a miss (only class 1's box counts). Image 4 (class 3) has only a box of
    class 1: not scored (nan) per class.
        image average (any box):       (100 + 100 + 100 + 0) / 4 = 75
        per class:  class 1: (100 + 100 + 0) / 3 = 66.7;  class 2: 0 / 1 = 0;  mean = 33.3"""
    from xaicli.metrics.localization import PointingGame, class_mean

    maps = peaked_maps([(5, 5), (10, 10), (20, 20), (3, 3), (8, 8)])
    target = torch.tensor([1, 1, 1, 2, 3])
    around = lambda r, c: [c, r, c + 1, r + 1]  # noqa: E731  (x1, y1, x2, y2) of one pixel
    boxes = [
        torch.tensor([around(5, 5)], dtype=torch.float32),
        torch.tensor([around(10, 10)], dtype=torch.float32),
        torch.tensor([around(20, 20), around(0, 30)], dtype=torch.float32),
        torch.tensor([around(28, 28)], dtype=torch.float32),
        torch.tensor([around(8, 8)], dtype=torch.float32),
    ]
    labels = [[1], [None], [2, 1], [2], [1]]  # image 1's box is unlabelled: it counts for its class
    model = torch.nn.Identity()
    img = PointingGame(tolerance=0.0)(model, torch.zeros(5, 3, 32, 32), maps, target, boxes=boxes, box_labels=labels)
    assert img["pointing-game"].tolist() == [100.0, 100.0, 100.0, 0.0, 100.0]  # labels ignored
    per = PointingGame(tolerance=0.0, average="class")(
        model, torch.zeros(5, 3, 32, 32), maps, target, boxes=boxes, box_labels=labels
    )
    v = per["pointing-game"].tolist()
    assert v[:4] == [100.0, 100.0, 0.0, 0.0] and math.isnan(v[4])
    pairs = [(str(int(t)), x) for t, x in zip(target, v, strict=True)]
    mean, std, k = class_mean(pairs[:4] + pairs[4:])
    assert k == 2 and mean == pytest.approx((200 / 3 + 0) / 2) and std == pytest.approx(math.sqrt(2) * 100 / 3)
    assert sum(v[:4]) / 4 == 50.0 and sum(img["pointing-game"].tolist()[:4]) / 4 == 75.0  # the image means


def test_class_averaged_summary_uses_the_explained_class(tmp_path):
    from xaicli.sinks import class_averaged, summarize

    (tmp_path / "explanations.csv").write_text(
        "image,method,target_class,status\na,m,1,ok\nb,m,1,ok\nc,m,1,ok\nd,m,2,ok\ne,m,3,ok\n"
    )
    vals = {"a": "100", "b": "100", "c": "0", "d": "0", "e": "nan"}
    rows = [{"image": i, "method": "m", "metric": "pointing-game", "value": v} for i, v in vals.items()]
    rows.append({"image": "a", "method": "m", "metric": "energy-pointing", "value": "0.5"})
    summary = summarize(rows)
    out = {r["metric"]: r for r in class_averaged(tmp_path, rows, summary, {"pointing-game"})}
    assert float(out["pointing-game"]["mean"]) == pytest.approx(100 / 3) and out["pointing-game"]["n"] == 4
    assert float({r["metric"]: r for r in summary}["pointing-game"]["mean"]) == 50.0  # over images
    assert out["energy-pointing"] == {r["metric"]: r for r in summary}["energy-pointing"]  # untouched


def test_box_labels_are_read_and_checked_for_the_class_protocol(tmp_path):
    from xaicli.metrics import load_annotations

    (tmp_path / "b.csv").write_text("image,x1,y1,x2,y2,class\na,0,0,10,10,967\na,5,5,20,20,\n")
    (tmp_path / "b.json").write_text(json.dumps({"a": [{"box": [0, 0, 10, 10], "label": 285}, [1, 1, 5, 5]]}))
    (tmp_path / "n.csv").write_text("image,x1,y1,x2,y2,label\na,0,0,10,10,cat\n")
    per_class = [build_metric("pointing-game", average="class")]
    assert load_annotations(tmp_path / "b.csv", per_class).lookup_labels("a", None) == ["967", None]
    assert load_annotations(tmp_path / "b.json", per_class).lookup_labels("a", None) == ["285", None]
    assert load_annotations(tmp_path / "n.csv", [build_metric("pointing-game")]).lookup_labels("a", None) == ["cat"]
    with pytest.raises(ConfigError, match="'cat' is not a class index"):
        load_annotations(tmp_path / "n.csv", per_class)
    with pytest.raises(ConfigError):
        build_metric("pointing-game", average="classes")
    # labels follow their boxes through the crop: a box outside the model input goes with its label
    (tmp_path / "c.csv").write_text("image,x1,y1,x2,y2,label\np,132,328,152,388,7\np,0,0,10,10,8\n")
    ann = load_annotations(tmp_path / "c.csv", per_class)
    pre = Preprocess((224, 224), 256)
    assert ann.class_labels_in_input("p", None, (512, 1024), pre, (224, 224)) == [7]
    assert ann.boxes_in_input("p", None, (512, 1024), pre, (224, 224), "cpu").tolist() == [[50.0, 20.0, 60.0, 50.0]]


@pytest.mark.slow
def test_pointing_game_per_class_from_the_cli(samples_copy, tmp_path):
    """End to end: labels from the annotation file reach the metric, an image whose boxes are all of
    another class is not scored (nan), and metrics_summary.csv's mean is the mean over the classes
    (target_class of explanations.csv) of the per-class hit rates of metrics.csv."""
    import csv

    from conftest import run_xai
    from xaicli.metrics.localization import class_mean

    for p in samples_copy.iterdir():
        if p.name not in ("chelsea.png", "coffee.png", "astronaut.png"):
            p.unlink()
    (tmp_path / "labels.csv").write_text("image,class\nchelsea,281\ncoffee,281\nastronaut,967\n")
    whole = [0, 0, 4000, 4000]  # covers the whole photo: a hit wherever the maximum is
    ann = {
        "chelsea": [{"box": whole, "label": 281}],
        "coffee": [{"box": whole, "label": 5}],  # only another class's box: not scored per class
        "astronaut": [{"box": [0, 0, 2, 2], "label": 967}, {"box": whole, "label": 3}],
    }
    (tmp_path / "boxes.json").write_text(json.dumps(ann))
    for average in ("class", "image"):
        cfg = tmp_path / f"{average}.yaml"
        cfg.write_text(
            f"methods: [gradcam]\ntarget: {tmp_path / 'labels.csv'}\nannotations: {tmp_path / 'boxes.json'}\n"
            f"metrics:\n  - {{name: pointing-game, average: {average}}}\n"
        )
        out = tmp_path / average
        r = run_xai("explain", "--config", cfg, samples_copy, "--out", out, "--workers", "0", "--quiet")
        assert r.returncode == 0, r.stderr
        with open(out / "metrics.csv", newline="") as f:
            vals = {row["image"]: float(row["value"]) for row in csv.DictReader(f)}
        with open(out / "explanations.csv", newline="") as f:
            cls = {row["image"]: row["target_class"] for row in csv.DictReader(f)}
        with open(out / "metrics_summary.csv", newline="") as f:
            summ = next(row for row in csv.DictReader(f) if row["metric"] == "pointing-game")
        assert cls == {"chelsea": "281", "coffee": "281", "astronaut": "967"}
        assert vals["chelsea"] == 100.0
        if average == "class":
            assert math.isnan(vals["coffee"])  # its only box is class 5's
            # astronaut's class-967 box lies in a corner outside the model's crop: it is dropped
            # with its label, and the box left is class 3's
            assert math.isnan(vals["astronaut"])
            mean, _, _ = class_mean([(cls[i], v) for i, v in vals.items()])
            assert float(summ["mean"]) == pytest.approx(mean) and int(summ["n"]) == sum(
                math.isfinite(v) for v in vals.values()
            )
        else:
            assert vals["coffee"] == 100.0 and vals["astronaut"] == 100.0  # any box counts
            assert float(summ["mean"]) == pytest.approx(100.0)
