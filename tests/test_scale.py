"""Issue #13, one machine: reduced-size JPEG decoding, overlay formats, raw-map formats, the bounded
writer queue, bf16 autocast and channels_last."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SAMPLES, run_xai
from xaicli.config import build_config
from xaicli.data import ImageDataset, ImageItem
from xaicli.errors import ConfigError
from xaicli.explain_run import run_explain
from xaicli.images import draft_factor, draft_scale, load_for_run


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def big_jpegs(tmp_path_factory):
    """Two multi-megapixel JPEGs made from a sample photo, one stored sideways with EXIF orientation 6."""
    d = tmp_path_factory.mktemp("big")
    src = Image.open(SAMPLES / "chelsea.png").convert("RGB")
    src.resize((2400, 1800), Image.BICUBIC).save(d / "wide.jpg", quality=92)
    side = src.resize((1600, 1200), Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display: shown as 1200 x 1600
    side.save(d / "rotated.jpg", quality=92, exif=exif)
    return d


def _minmax(m: torch.Tensor) -> torch.Tensor:
    v = m.flatten(1)
    lo, hi = v.min(1, keepdim=True).values, v.max(1, keepdim=True).values
    return (v - lo) / (hi - lo)


def test_draft_factor_divides_the_picture(tmp_path):
    """A JPEG whose sides are not multiples of the reduction is not drafted at it: 1154x865 at 1/2
    would be 577x433 (865/433 != 2) and the model's resize would sample it up to half a pixel off
    (measured: 57/255 on the model input, Grad-CAM 0.035 after min-max)."""
    assert draft_factor((4000, 3000), 256, 600) == 4  # 1/8 < max(256/3000, 600/4000) <= 1/4
    assert draft_factor((4000, 3000), 256, 400) == 8
    assert draft_factor((4000, 3004), 256, 400) == 4  # 3004 = 4 x 751: 1/8 would leave a partial block
    assert draft_factor((1154, 865), 256, 400) == 1  # 865 is odd: decoded whole
    assert draft_factor((4000, 3000), 256, None) == 1
    src = Image.open(SAMPLES / "chelsea.png").convert("RGB")
    src.resize((1154, 865), Image.BICUBIC).save(tmp_path / "odd.jpg", quality=90)
    src.resize((1152, 864), Image.BICUBIC).save(tmp_path / "even.jpg", quality=90)
    odd, size = load_for_run(tmp_path / "odd.jpg", min_short=256, max_side=400)
    assert odd.size == size == (1154, 865)
    even, size = load_for_run(tmp_path / "even.jpg", min_short=256, max_side=400)
    assert size == (1152, 864) and even.size == (576, 432)


def test_draft_scale_keeps_what_the_model_and_overlay_need():
    assert draft_scale((4000, 3000), 512, None) == 1.0  # overlay at the original size: no reduction
    assert draft_scale((4000, 3000), None, 512) == 1.0
    f = draft_scale((4000, 3000), 512, 1024)
    assert min(4000, 3000) * f >= 512 and max(4000, 3000) * f >= 1024
    assert draft_scale((300, 200), 512, 256) == 1.0  # never enlarges


def test_reduced_size_decoding_agrees_with_full_decoding(big_jpegs, default_model):
    """The model input from a draft decode is within 2 grey levels of the full decode's, the size
    comes from the header (EXIF-rotated), and Grad-CAM maps agree after min-max normalisation.

    Measured: max |dx| 1-2/255; Grad-CAM max |dmap| 0.016-0.025 after min-max (bench folder, 12
    JPEGs of 1-12 MP: <= 0.028). The issue's atol 1e-3 does not hold for any draft: the DCT-scaled
    decode changes 5-25 % of the model input's values by one grey level even at 4-6x the model's
    resize, and one grey level on just 0.1 % of the values already moves Grad-CAM by 0.001-0.0016
    and pixel-gradient maps (saliency) by 0.24-0.40 (their ReLU patterns flip), so only a
    bit-identical input (no draft) meets it. The bound asserted here is 0.03 (Grad-CAM)."""
    items = [ImageItem(big_jpegs / "wide.jpg", "wide"), ImageItem(big_jpegs / "rotated.jpg", "rotated")]
    pre = default_model.preprocess
    full = ImageDataset(items, pre, overlay_max_side=512, draft=False)
    fast = ImageDataset(items, pre, overlay_max_side=512, draft=True)
    a, b = [full[i] for i in range(2)], [fast[i] for i in range(2)]
    assert [s["size"] for s in b] == [(2400, 1800), (1200, 1600)] == [s["size"] for s in a]
    assert [tuple(s["orig"].shape) for s in b] == [(384, 512, 3), (512, 384, 3)]
    img, size = load_for_run(big_jpegs / "wide.jpg", min_short=2 * pre.resize, max_side=512)
    assert size == (2400, 1800) and img.size == (1200, 900)  # really reduced, by exactly 1/2
    xa, xb = torch.stack([s["x"] for s in a]), torch.stack([s["x"] for s in b])
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    assert ((xa - xb).abs() * std).max() <= 2.5 / 255  # in [0, 1] pixel units
    from conftest import bind
    from xaicli.methods import build_method

    gc = bind(build_method("gradcam"), default_model)
    ma, mb = gc(xa, None).maps, gc(xb, None).maps
    assert torch.allclose(_minmax(ma), _minmax(mb), atol=0.03)
    # a PNG is never drafted: identical inputs
    png = ImageDataset([ImageItem(SAMPLES / "coffee.png", "c")], pre, overlay_max_side=128, draft=True)[0]
    ref = ImageDataset([ImageItem(SAMPLES / "coffee.png", "c")], pre)[0]
    assert torch.equal(png["x"], ref["x"]) and max(png["orig"].shape) == 128


@pytest.mark.slow
def test_overlay_formats_and_npz_maps_evaluate(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for n in ("coffee.png", "rocket.jpg"):
        shutil.copy(SAMPLES / n, d / n)
    out = tmp_path / "out"
    cfg = build_config(
        None,
        {
            "input": str(d),
            "output": str(out),
            "methods": "gradcam",
            "overlay_format": "webp",
            "save_maps": "npz-f16",
            "overlay_max_side": 200,
            "workers": 0,
        },
    )
    s = run_explain(cfg)
    assert s.done == 2
    files = sorted(p.name for p in (out / "gradcam").iterdir())
    assert files == ["coffee.npz", "coffee.webp", "rocket.npz", "rocket.webp"]
    assert max(Image.open(out / "gradcam" / "rocket.webp").size) == 200
    from xaicli.reader import RunFolder

    run = RunFolder(out)
    m = run.load_map("gradcam", "coffee")
    assert m.dtype == np.float32 and m.shape == (224, 224)
    row = {r["image"]: r for r in rows(out / "explanations.csv")}["coffee"]
    assert m.max() == pytest.approx(float(row["map_max"]), rel=1e-3)  # float16 x scale: 3 digits
    assert run.overlay_file("gradcam", "coffee").suffix == ".webp"
    assert run_explain(cfg).skipped == 2  # resume sees the .webp/.npz files
    r = run_xai("evaluate", out, "--metric", "deletion", "--quiet")
    assert r.returncode == 0, r.stderr
    assert len([x for x in rows(out / "metrics.csv") if x["metric"] == "deletion"]) == 2


@pytest.mark.slow
def test_save_maps_false_writes_overlays_only_and_evaluate_says_why(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    shutil.copy(SAMPLES / "coffee.png", d / "coffee.png")
    out = tmp_path / "out"
    r = run_xai("explain", d, "-o", out, "-m", "gradcam", "--save-maps", "false", "--overlay-format", "jpg", "-q")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (out / "gradcam").iterdir()) == ["coffee.jpg"]
    r = run_xai("evaluate", out, "--metric", "deletion")
    assert r.returncode == 2
    assert "saved no raw maps (save_maps: false)" in r.stderr and "save_maps: npy" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "key,value,msg",
    [
        ("save_maps", "f16", "allowed: npy"),
        ("overlay_format", "gif", "allowed: png, jpg, webp"),
        ("amp", "fp16", "allowed: bf16, none"),
        ("engine", "spark", "allowed: local, ray"),
        ("write_queue", 0, "write_queue"),
    ],
)
def test_new_keys_are_validated(tmp_path, key, value, msg):
    with pytest.raises(ConfigError, match=msg):
        build_config(None, {"input": str(SAMPLES), key: value})


def test_new_keys_accept_yaml_false(tmp_path):
    cfg = build_config(None, {"input": str(SAMPLES), "save_maps": False, "amp": False, "overlay_format": "jpeg"})
    assert cfg.save_maps is False and cfg.amp == "none" and cfg.overlay_format == "jpg"


def test_writer_queue_is_bounded(tmp_path, monkeypatch):
    """With writing slower than the device, at most `write_queue` batches wait for the writers."""
    import time

    import xaicli.sinks as sinks

    seen = []
    orig = sinks.MapSink.consume

    def consume(self, result):
        orig(self, result)
        seen.append(len(self.pending))

    def slow(*a, **k):
        time.sleep(0.05)

    monkeypatch.setattr(sinks.MapSink, "consume", consume)
    monkeypatch.setattr(sinks, "save_image", slow)
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(6):
        shutil.copy(SAMPLES / "coffee.png", d / f"c{i}.png")
    cfg = build_config(
        None,
        {"input": str(d), "output": str(tmp_path / "o"), "methods": "cam", "batch_size": 1, "workers": 0}
        | {"write_queue": 2, "writers": 1},
    )
    assert run_explain(cfg).done == 6
    assert max(seen) <= 2 and len(rows(tmp_path / "o" / "explanations.csv")) == 6


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.flatten().numpy(), b.flatten().numpy())[0])


def _bf16_ok(device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1))
        return True
    except (RuntimeError, TypeError):
        return False


@pytest.mark.slow
def test_bf16_and_channels_last_agree_with_fp32(default_model, sample_batch):
    """Spearman >= 0.98 with the fp32 maps: channels_last for a CAM and a gradient method; bf16
    autocast for Grad-CAM and LRP's CAM relative. (Measured on CPU: Grad-CAM 0.9995, channels_last
    1.0; pixel-gradient maps under bf16 only reach 0.69-0.79, see README.)"""
    from conftest import bind
    from xaicli.engine import precision
    from xaicli.methods import build_method

    x = sample_batch
    for name in ("gradcam", "saliency"):
        bm = bind(build_method(name), default_model)
        ref = bm(x, None).maps
        default_model.model.to(memory_format=torch.channels_last)
        try:
            cl = bm(x.contiguous(memory_format=torch.channels_last), None).maps
        finally:
            default_model.model.to(memory_format=torch.contiguous_format)
        assert min(_spearman(ref[i], cl[i]) for i in range(len(x))) >= 0.98, name
    if not _bf16_ok(x.device):
        pytest.skip(f"bfloat16 autocast is not supported on {x.device} by torch {torch.__version__}")
    bm = bind(build_method("gradcam"), default_model)
    ref = bm(x, None).maps
    with precision(x.device, "bf16"):
        half = bm(x, None).maps.float()
    assert min(_spearman(ref[i], half[i]) for i in range(len(x))) >= 0.98


@pytest.mark.slow
def test_run_with_amp_and_channels_last(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    shutil.copy(SAMPLES / "coffee.png", d / "coffee.png")
    r = run_xai("explain", d, "-o", tmp_path / "o", "-m", "gradcam", "--amp", "bf16", "--channels-last", "-q")
    assert r.returncode == 0, r.stderr
    (row,) = rows(tmp_path / "o" / "explanations.csv")
    assert row["status"] == "ok"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_with_bf16_channels_last_and_pinned_memory(tmp_path):
    """On CUDA: pinned host memory + non_blocking copies (the default), bf16 autocast and
    channels_last; Grad-CAM maps agree with an fp32 run (Spearman >= 0.98)."""
    d = tmp_path / "imgs"
    d.mkdir()
    for n in ("coffee.png", "chelsea.png"):
        shutil.copy(SAMPLES / n, d / n)
    base = {"input": str(d), "methods": "gradcam", "device": "cuda", "workers": 1}
    run_explain(build_config(None, base | {"output": str(tmp_path / "fp32")}))
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    fast = base | {"output": str(tmp_path / "bf16"), "amp": "bf16", "channels_last": True}
    assert run_explain(build_config(None, fast)).done == 2
    for n in ("coffee", "chelsea"):
        a = torch.from_numpy(np.load(tmp_path / "fp32" / "gradcam" / f"{n}.npy"))
        b = torch.from_numpy(np.load(tmp_path / "bf16" / "gradcam" / f"{n}.npy"))
        assert _spearman(a, b) >= 0.98


def test_overlay_copy_and_overlay_fast_paths_match_the_plain_ones():
    """The decode workers' overlay copy (torch uint8 antialiased bilinear) is PIL's `fit_side`
    within one grey level on under 1 % of the values; `overlay`'s integer arithmetic gives exactly
    the pixels of the float32 formula (dimmed floor(x/2) outside the crop, floor(r(1-a) + c a + 0.5))."""
    from xaicli.data import fit_side_uint8
    from xaicli.images import fit_side
    from xaicli.ops import display01
    from xaicli.outputs import colormap_lut, overlay

    img = Image.open(SAMPLES / "chelsea.png").convert("RGB").resize((1000, 752), Image.BICUBIC)
    for side in (768, 333, 2000, None):
        a, b = fit_side_uint8(img, side).numpy(), np.asarray(fit_side(img, side))
        assert a.shape == b.shape and a.dtype == np.uint8
        d = np.abs(a.astype(int) - b.astype(int))
        assert d.max() <= 1 and (d > 0).mean() < 0.01
    rng = np.random.default_rng(0)
    orig = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    cam = rng.normal(size=(224, 224)).astype(np.float32)
    box = (10.4, -3.0, 100.2, 80.6)
    for alpha in (0.5, 0.3):
        got = overlay(orig, cam, box, "jet", alpha)
        m = display01(torch.from_numpy(cam)[None], "positive", 99.5)[0].numpy()
        color = colormap_lut("jet")[
            np.clip(np.asarray(Image.fromarray(m, "F").resize((90, 81), Image.BILINEAR)) * 255.0 + 0.5, 0, 255).astype(
                np.uint8
            )
        ]
        want = (orig.astype(np.float32) * 0.5).astype(np.uint8)
        region = orig[0:81, 10:100].astype(np.float32)
        want[0:81, 10:100] = (region * (1 - alpha) + color.astype(np.float32) * alpha + 0.5).astype(np.uint8)
        assert np.array_equal(got, want), alpha
