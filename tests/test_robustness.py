"""Runs that cron can trust: resume after SIGKILL, one writer, bad input, OOM back-off, shards."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, SAMPLES, run_xai
from xaicli.cli import main
from xaicli.config import build_config
from xaicli.errors import ConfigError, LockedError
from xaicli.explain_run import RunOptions, run_explain
from xaicli.outputs import TMP_PREFIX
from xaicli.state import OutputLock, config_hash, make_plan

TIMING = {"seconds"}


def rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def corpus(d: Path, n: int) -> Path:
    """n small distinct photos (crops of the samples) so a run takes a few seconds."""
    d.mkdir(parents=True, exist_ok=True)
    srcs = [Image.open(SAMPLES / f).convert("RGB") for f in ("chelsea.png", "coffee.png", "rocket.jpg")]
    for i in range(n):
        im = srcs[i % 3]
        w, h = im.size
        box = (i % 7 * 5, i % 5 * 5, w - i % 4 * 6, h - i % 6 * 4)
        im.crop(box).resize((160, 120)).save(d / f"img_{i:03d}.jpg", quality=90)
    return d


def snapshot(out: Path):
    files = sorted(
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.suffix in (".png", ".npy")
    )
    table = sorted(tuple((k, v) for k, v in r.items() if k not in TIMING) for r in rows(out / "explanations.csv"))
    arrays = {f: np.load(out / f) for f in files if f.endswith(".npy")}
    return files, table, arrays


def assert_same_outputs(a: Path, b: Path):
    fa, ta, aa = snapshot(a)
    fb, tb, ab = snapshot(b)
    assert fa == fb
    assert len(ta) == len(tb) == len({(dict(r)["image"], dict(r)["method"]) for r in ta})  # no duplicate rows
    for ra, rb in zip(ta, tb, strict=True):
        da, db = dict(ra), dict(rb)
        for k in da:
            if k.endswith("_prob") or k in ("map_min", "map_max"):
                assert float(da[k]) == pytest.approx(float(db[k]), rel=1e-4, abs=1e-6), k
            else:
                assert da[k] == db[k], k
    for f in aa:
        np.testing.assert_allclose(aa[f], ab[f], rtol=1e-4, atol=1e-6)


def _env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def explain_cfg(imgs, out, **kw):
    base = {"input": str(imgs), "output": str(out), "methods": "gradcam,saliency", "batch_size": 2, "workers": 0}
    return build_config(None, {**base, **kw})


def log_events(out: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (out / "xai-log.jsonl").read_text().splitlines()) if e["event"] == kind]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    imgs = corpus(tmp_path / "imgs", 30)
    ref, out = tmp_path / "ref", tmp_path / "out"
    run_explain(explain_cfg(imgs, ref))

    # decode workers are forked: the lock must still die with the main process (not live on in them)
    args = ["explain", str(imgs), "-m", "gradcam,saliency", "-b", "2", "--workers", "2", "--quiet", "--out", str(out)]
    p = subprocess.Popen([sys.executable, "-m", "xaicli", *args], env=_env(), cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and len(rows(out / "explanations.csv")) < 6:
        time.sleep(0.02)
    time.sleep(0.2)  # land somewhere inside a later batch
    p.send_signal(signal.SIGKILL)
    p.wait()
    n_before = len(rows(out / "explanations.csv"))
    assert 0 < n_before < 60, "the kill must land mid-run"
    with OutputLock(out):  # free at once: no orphaned worker keeps it
        pass

    s = run_explain(explain_cfg(imgs, out))
    assert s.skipped == n_before // 2 and s.done == 30 - n_before // 2
    assert_same_outputs(ref, out)
    assert not list(out.rglob(TMP_PREFIX + "*"))

    # nothing left to do; a changed image is redone without duplicating its rows
    assert run_explain(explain_cfg(imgs, out)).done == 0
    os.utime(imgs / "img_005.jpg", ns=(1, 1))
    assert run_explain(explain_cfg(imgs, out)).done == 1
    table = rows(out / "explanations.csv")
    assert len(table) == 60 and len({(r["image"], r["method"]) for r in table}) == 60
    assert [e["todo"] for e in log_events(out, "run_start")][-3:] == [30 - n_before // 2, 0, 1]


def test_different_config_is_refused_then_forced(tmp_path):
    out = tmp_path / "out"
    one = SAMPLES / "chelsea.png"
    run_explain(explain_cfg(one, out, methods="gradcam"))
    with pytest.raises(ConfigError, match="different config.*--force"):
        run_explain(explain_cfg(one, out, methods="saliency"))
    run_explain(explain_cfg(one, out, methods="saliency"), options=RunOptions(force=True))
    assert not (out / "gradcam").exists() and (out / "saliency" / "chelsea.npy").exists()
    assert [r["method"] for r in rows(out / "explanations.csv")] == ["saliency"]
    # batch size, workers and device do not change the outputs: same config for resume
    assert run_explain(explain_cfg(one, out, methods="saliency", batch_size=5, workers=1)).skipped == 1


@pytest.mark.slow
def test_second_concurrent_run_is_refused(tmp_path, capsys):
    imgs = corpus(tmp_path / "imgs", 30)
    out = tmp_path / "out"
    args = ["explain", str(imgs), "-b", "2", "--workers", "0", "--quiet", "--out", str(out)]
    p = subprocess.Popen([sys.executable, "-m", "xaicli", *args], env=_env(), cwd=ROOT)
    try:
        deadline = time.time() + 60
        lock = out / ".xai.lock"
        while time.time() < deadline and "pid" not in (lock.read_text() if lock.exists() else ""):
            time.sleep(0.05)
        with pytest.raises(SystemExit) as e:
            main(args)
        err = " ".join(capsys.readouterr().err.split())
        assert e.value.code == 3, err
        assert "in use by another xai run" in err and f"pid {p.pid}" in err and "--wait" in err
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
    assert p.returncode in (0, 130)


def test_lock_wait_and_stale_lock(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".xai.lock").write_text("pid 999999 on gone since 2020-01-01\n")  # dead holder: no flock held
    with OutputLock(out):
        with pytest.raises(LockedError, match="pid"):
            with OutputLock(out):
                pass
    held = OutputLock(out).__enter__()
    got = []

    def second():
        with OutputLock(out, wait=True, on_wait=lambda h: got.append("waited")):
            got.append("acquired")

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.3)
    assert got == ["waited"]
    held.__exit__(None, None, None)
    t.join(5)
    assert got == ["waited", "acquired"]


def _png_bomb(path: Path, w: int, h: int) -> None:
    """A valid PNG header claiming w x h pixels (a decompression bomb's signature)."""

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def make_bad_corpus(d: Path) -> tuple[dict[str, str], list[str]]:
    """(kind -> file name, names expected to fail). Generated here, at least 15 kinds."""
    d.mkdir()
    cat = Image.open(SAMPLES / "chelsea.png").convert("RGB").resize((120, 80))
    k = {}
    (d / "zero.jpg").write_bytes(b"")
    k["zero bytes"] = "zero.jpg"
    buf = (SAMPLES / "rocket.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(buf[: len(buf) // 3])
    k["truncated jpeg"] = "truncated.jpg"
    (d / "text.jpg").write_text("this is not a picture\n")
    k["text named .jpg"] = "text.jpg"
    _png_bomb(d / "bomb.png", 40000, 40000)
    k["decompression bomb"] = "bomb.png"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(d / "one.png")
    k["1x1"] = "one.png"
    Image.fromarray(np.asarray(cat.convert("L"), dtype=np.uint16) * 257).save(d / "deep16.tif")
    k["16-bit tiff"] = "deep16.tif"
    cat.convert("CMYK").save(d / "cmyk.jpg")
    k["cmyk jpeg"] = "cmyk.jpg"
    pal = cat.convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(d / "palette.png", transparency=0)
    k["palette png with transparency"] = "palette.png"
    frames = [cat, cat.transpose(Image.FLIP_LEFT_RIGHT)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    k["animated gif"] = "anim.gif"
    exif = Image.Exif()
    exif[0x0112] = 6
    cat.save(d / "rotated.jpg", exif=exif)
    k["exif-rotated jpeg"] = "rotated.jpg"
    cat.convert("L").save(d / "gray.png")
    k["grayscale"] = "gray.png"
    cat.save(d / "secret.png")
    os.chmod(d / "secret.png", 0)
    k["no read permission"] = "secret.png"
    os.symlink(d / "does_not_exist.png", d / "dangling.png")
    k["broken symlink"] = "dangling.png"
    raw = os.path.join(os.fsencode(d), b"caf\xe9.png")
    cat.save(raw.decode("utf-8", "surrogateescape"))
    k["non-utf-8 name"] = b"caf\xe9.png".decode("utf-8", "surrogateescape")
    cat.save(d / "with spaces in name.webp")
    k["name with spaces (webp)"] = "with spaces in name.webp"
    cat.save(d / "plain.bmp")
    k["bmp"] = "plain.bmp"
    rgba = cat.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "rgba.png")
    k["rgba"] = "rgba.png"
    fail = ["zero.jpg", "truncated.jpg", "text.jpg", "bomb.png", "dangling.png"]
    if os.geteuid() != 0:  # root reads files whatever their mode
        fail.append("secret.png")
    return k, fail


def test_bad_input_corpus(tmp_path):
    d = tmp_path / "bad"
    kinds, fail = make_bad_corpus(d)
    assert len(kinds) >= 15
    out = tmp_path / "out"
    r = run_xai("explain", d, "--out", out, "-q", "-b", "4", "--workers", "2")
    assert r.returncode == 1, r.stderr  # done, some failed
    assert "Traceback" not in r.stderr
    errs = {e["image"]: e["reason"] for e in rows(out / "errors.csv")}
    done = {e["image"] for e in rows(out / "explanations.csv") if e["status"] == "ok"}
    stem = {
        name: Path(name).stem.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for name in kinds.values()
    }
    for kind, name in kinds.items():
        s = stem[name]
        assert (s in errs) != (s in done), f"{kind}: must be either done or in errors.csv"
        assert (s in errs) == (name in fail), f"{kind}: {'expected a failure' if name in fail else errs.get(s)}"
    assert "pixel limit" in errs["bomb"]
    with Image.open(out / "gradcam" / "rotated.png") as im:
        assert im.size == (80, 120)  # overlay drawn on the upright (EXIF-rotated) image
    assert (out / "gradcam" / "caf\ufffd.png").exists()
    assert (out / "gradcam" / "with spaces in name.png").exists()


def test_configurable_pixel_limit(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("RGB", (300, 300)).save(d / "big.png")
    Image.new("RGB", (50, 50)).save(d / "small.png")
    cfg = build_config(None, {"input": str(d), "output": str(tmp_path / "o"), "max_pixels": 10_000, "workers": 0})
    s = run_explain(cfg)
    assert s.done == 1 and s.failed == 1 and "pixel limit" in s.errors[0][1]


def test_oom_halves_the_batch_and_finishes(tmp_path, monkeypatch):
    from xaicli.methods.cam import BoundCAM

    real = BoundCAM.compute
    seen = []

    def fake_run(self, x, target):
        seen.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(self, x, target)

    monkeypatch.setattr(BoundCAM, "compute", fake_run)
    cfg = build_config(None, {"input": str(SAMPLES), "output": str(tmp_path / "o"), "batch_size": 6, "workers": 0})
    s = run_explain(cfg)
    assert s.done == 6 and s.failed == 0
    assert seen[:3] == [6, 3, 2] and max(seen[3:]) <= 2  # halved until it fit, then kept the smaller size
    assert len(rows(tmp_path / "o" / "explanations.csv")) == 6
    log = (tmp_path / "o" / "xai-log.jsonl").read_text()
    assert '"oom_backoff"' in log


def test_oom_on_a_single_image_flags_it(tmp_path, monkeypatch):
    from xaicli.methods.cam import BoundCAM

    def always_oom(self, x, target):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(BoundCAM, "compute", always_oom)
    cfg = build_config(None, {"input": str(SAMPLES / "chelsea.png"), "output": str(tmp_path / "o"), "workers": 0})
    run_explain(cfg)
    s = run_explain(cfg)
    (row,) = rows(tmp_path / "o" / "explanations.csv")
    assert row["status"] == "oom" and not (tmp_path / "o" / "gradcam" / "chelsea.png").exists()
    assert row["top1_label"] == "tiger cat"  # the prediction still comes from a plain forward
    assert s.flagged == 1 and s.exit_code == 1
    monkeypatch.undo()  # the next run (more memory) retries the flagged image
    s = run_explain(cfg)
    assert s.done == 1 and rows(tmp_path / "o" / "explanations.csv")[0]["status"] == "ok"


def test_nonfinite_maps_are_flagged_not_written(tmp_path, monkeypatch):
    from xaicli.methods.gradient import BoundGradient

    real = BoundGradient.compute

    def nan_first(self, x, target):
        e = real(self, x, target)
        e.maps[0, 3, 3] = float("nan")
        return e

    monkeypatch.setattr(BoundGradient, "compute", nan_first)
    cfg = build_config(
        None,
        {"input": str(SAMPLES), "output": str(tmp_path / "o"), "methods": "saliency", "batch_size": 8, "workers": 0},
    )
    run_explain(cfg)
    table = {r["image"]: r for r in rows(tmp_path / "o" / "explanations.csv")}
    assert table["astronaut"]["status"] == "nonfinite"  # first of the sorted batch
    assert not (tmp_path / "o" / "saliency" / "astronaut.png").exists()
    assert sum(r["status"] == "ok" for r in table.values()) == 5


def test_shards_of_three_cover_the_folder_exactly_once(tmp_path):
    imgs = corpus(tmp_path / "imgs", 20)
    seen = []
    for i in range(3):
        cfg = build_config(None, {"input": str(imgs), "output": str(tmp_path / f"o{i}")})
        s = run_explain(cfg, options=RunOptions(dry_run=True, shard=f"{i}/3"))
        seen.append({it.rel for it in s.planned})
        assert not (tmp_path / f"o{i}").exists()  # dry run writes nothing
    assert all(seen)  # each shard got some
    assert set.union(*seen) == {f"img_{i:03d}" for i in range(20)}
    assert sum(len(s) for s in seen) == 20
    with pytest.raises(ConfigError, match="--shard"):
        run_explain(explain_cfg(imgs, tmp_path / "x"), options=RunOptions(dry_run=True, shard="3/3"))


def test_limit_then_resume(tmp_path):
    out = tmp_path / "o"
    assert run_explain(explain_cfg(SAMPLES, out), options=RunOptions(limit=2)).done == 2
    assert len(rows(out / "explanations.csv")) == 4  # 2 images x 2 methods
    plan = run_explain(explain_cfg(SAMPLES, out), options=RunOptions(dry_run=True))
    assert plan.skipped == 2 and len(plan.planned) == 4
    assert run_explain(explain_cfg(SAMPLES, out)).done == 4
    assert len(rows(out / "explanations.csv")) == 12


def test_outputs_never_escape_the_output_folder(tmp_path):
    # absolute paths and '..' in a list file, and a symlinked method folder pointing outside
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(SAMPLES / "chelsea.png", tmp_path / "outside.png")
    (d / "list.txt").write_text(f"{tmp_path / 'outside.png'}\n../outside.png\n")
    out = tmp_path / "o"
    assert run_explain(explain_cfg(d / "list.txt", out, methods="saliency")).done == 1  # one file, named twice
    written = [p for p in tmp_path.rglob("*.npy")]
    assert written and all(p.resolve().is_relative_to(out.resolve()) for p in written)

    out2 = tmp_path / "o2"
    (tmp_path / "elsewhere").mkdir()
    out2.mkdir()
    os.symlink(tmp_path / "elsewhere", out2 / "gradcam")
    s = run_explain(explain_cfg(SAMPLES / "chelsea.png", out2, methods="gradcam"))
    assert s.failed == 1 and s.exit_code == 1
    assert not list((tmp_path / "elsewhere").iterdir())
    assert "outside the output folder" in rows(out2 / "errors.csv")[0]["reason"]


def test_malicious_checkpoint_via_cli(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"fc.weight": Evil()}, tmp_path / "evil.pth")
    r = run_xai(
        "explain",
        SAMPLES / "chelsea.png",
        "--out",
        tmp_path / "o",
        "--model",
        "torchvision:resnet18",
        "--weights",
        tmp_path / "evil.pth",
        "-q",
    )
    assert r.returncode == 2 and "refused" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "workers, group, sig",
    [(0, False, signal.SIGTERM), (2, True, signal.SIGTERM), (2, True, signal.SIGINT)],
    ids=["pid", "process-group-with-workers", "ctrl-c-to-the-group"],
)
def test_sigterm_exits_130_and_keeps_finished_batches(tmp_path, workers, group, sig):
    # `timeout`, systemd and cron signal the whole group: decode workers must not turn it into a crash
    imgs = corpus(tmp_path / "imgs", 40)
    out = tmp_path / "o"
    cmd = ["explain", str(imgs), "--out", str(out), "-q", "-b", "2", "--workers", str(workers)]
    p = subprocess.Popen(
        [sys.executable, "-m", "xaicli", *cmd],
        env=_env(),
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=group,
    )
    deadline = time.time() + 60
    while time.time() < deadline and len(rows(out / "explanations.csv")) < 2:
        time.sleep(0.05)
    if group:
        os.killpg(p.pid, sig)
    else:
        p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err and "internal error" not in err
    done = rows(out / "explanations.csv")
    assert done and all((out / "gradcam" / f"{r['image']}.png").exists() for r in done)


def test_limit_keeps_earlier_failures_it_does_not_retry(tmp_path):
    d = tmp_path / "imgs"
    shutil.copytree(SAMPLES, d)
    (d / "a_bad.jpg").write_text("not an image")
    (d / "b_bad.jpg").write_text("not an image")
    out = tmp_path / "o"
    s = run_explain(explain_cfg(d, out, methods="saliency"))
    assert s.failed == 2 and s.exit_code == 1
    s = run_explain(explain_cfg(d, out, methods="saliency"), options=RunOptions(limit=1))
    assert s.failed == 1  # only a_bad was retried ...
    assert sorted(r["image"] for r in rows(out / "errors.csv")) == ["a_bad", "b_bad"]  # ... b_bad's row stays


def test_config_hash_follows_local_files(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("image,class\nchelsea.png,281\n")
    cfg = explain_cfg(SAMPLES, tmp_path / "o", target=str(labels))
    h1 = config_hash(cfg)
    os.utime(labels, ns=(10**18, 10**18))
    assert config_hash(cfg) != h1  # an edited labels file (or checkpoint) makes every image stale


def test_interrupted_force_replacement_does_not_block_the_next_run(tmp_path):
    out = tmp_path / "o"
    one = SAMPLES / "chelsea.png"
    run_explain(explain_cfg(one, out, methods="gradcam"))
    # as if --force to another config died after removing the outputs, before its run.yaml
    shutil.rmtree(out / "gradcam")
    (out / "explanations.csv").unlink()
    cfg = explain_cfg(one, out, methods="saliency")
    plan = make_plan(out, [], cfg, config_hash(cfg), force=False)  # no refusal
    assert not plan.replace_config
    assert run_explain(cfg).done == 1
