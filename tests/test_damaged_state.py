"""A damaged output folder (full disk, hand edit, bad sync) gives one line naming the file and
the fix (exit 2), never an internal error; `xai explain --repair` rebuilds the state from what
is on disk without recomputing finished maps."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLES
from xaicli.cli import main

IMG = str(SAMPLES / "chelsea.png")
BIG = b"x" * 200_000  # over the csv module's field limit (131072)
EXPLAIN = ("explain", IMG, "-m", "gradcam", "--workers", "0", "-q", "--metrics", "avg-drop")

# every state file of the output folder, each damaged in several ways
DAMAGE = {
    "run.yaml": [
        b"config: [unclosed\n",
        b"- a\n- b\n",
        b"\xff\xfe\x00bad",
        b"!!python/object:os.system {}\n",
        "DIR",
        b"[" * 1000,
    ],
    "explanations.csv": [b"garbage\n", BIG + b"\n", "DIR", "APPEND_NUL"],
    "errors.csv": [BIG + b"\n", "DIR", "APPEND_BIG"],
    "metrics.csv": [b"\x00\x00", "DIR"],
    "manifest.json": [b"{not json", "DIR"],
    "xai-log.jsonl": [b"\xff\xfe garbage\n", "DIR"],
    ".xai.lock": [b"\xff garbage", "DIR"],
    ".metrics-partial.csv": [b"garbage\n", b"image,method,metric,value\n" + BIG + b"\nchelsea,gradcam,avg-drop,1\n"],
}
CASES = [(name, k) for name, ways in DAMAGE.items() for k in range(len(ways))]


def cli(*args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dmg") / "base"
    code, err = cli(*EXPLAIN, "-o", out)
    assert code == 0, err
    assert (out / "metrics.csv").is_file() and (out / "manifest.json").is_file()
    return out


def damage(out: Path, name: str, way) -> None:
    p = out / name
    if way == "DIR":
        p.unlink(missing_ok=True)
        p.mkdir()
        (p / "x").write_text("x")
    elif isinstance(way, str):  # APPEND_*: a garbage line after whole rows
        with open(p, "ab") as f:
            f.write((BIG if way == "APPEND_BIG" else b"a\0b,c,d,e") + b"\n")
    else:
        p.write_bytes(way)


def assert_clean(code: int, err: str) -> None:
    assert "internal error" not in err and "Traceback" not in err, err
    assert code in (0, 1, 2), (code, err)
    assert len(err.strip().splitlines()) <= 1, err
    if code == 2:
        assert "damaged state file" in err and "--repair" in err, err


@pytest.mark.slow
@pytest.mark.parametrize(("name", "k"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_damaged_state_file_is_one_line_then_repaired(base, tmp_path, name, k):
    out = tmp_path / "out"
    shutil.copytree(base, out)
    npy = out / "gradcam" / "chelsea.npy"
    before = npy.stat().st_mtime_ns
    damage(out, name, DAMAGE[name][k])
    code, err = cli(*EXPLAIN, "-o", out)
    assert_clean(code, err)
    if code == 2:
        assert name in err  # names the file
    assert_clean(*cli("evaluate", out, "--metric", "avg-drop", "-q"))
    # --repair always leaves a folder the next runs use without complaint
    code, err = cli(*EXPLAIN, "-o", out, "--repair")
    assert code == 0, err
    if name != "explanations.csv":  # its rows may be lost (that image is then redone)
        assert npy.stat().st_mtime_ns == before  # finished maps are not recomputed
    assert cli(*EXPLAIN, "-o", out) == (0, "")  # and the folder is healthy again


def test_repair_keeps_finished_maps_and_their_rows(base, tmp_path):
    """A garbage header on explanations.csv, run.yaml replaced by a directory: --repair keeps the
    whole rows, sets the damaged files aside and recomputes nothing."""
    out = tmp_path / "out"
    shutil.copytree(base, out)
    npy = out / "gradcam" / "chelsea.npy"
    before, ref = npy.stat().st_mtime_ns, np.load(npy)
    lines = (out / "explanations.csv").read_text().splitlines()
    (out / "explanations.csv").write_text("\x00garbage header\n" + "\n".join(lines[1:]) + "\n")
    (out / "run.yaml").unlink()
    (out / "run.yaml").mkdir()
    code, err = cli(*EXPLAIN, "-o", out)
    assert code == 2 and "run.yaml: damaged state file (not a regular file)" in err
    code, err = cli(*EXPLAIN, "-o", out, "--repair")
    assert code == 0, err
    assert npy.stat().st_mtime_ns == before
    np.testing.assert_array_equal(np.load(npy), ref)
    assert (out / "explanations.csv").read_text().splitlines() == lines
    aside = sorted(p.name for p in (out / ".xai-damaged").iterdir())
    assert [a.split(".")[0] for a in aside] == ["explanations", "run"]
    events = [json.loads(x) for x in (out / "xai-log.jsonl").read_text().splitlines()]
    assert [e["file"] for e in events if e["event"] == "state_repaired"] == ["run.yaml", "explanations.csv"]
    assert [e["todo"] for e in events if e["event"] == "run_start"][-1] == 0  # nothing recomputed


def test_garbage_csv_lines_are_dropped_and_logged(base, tmp_path):
    """A line over the csv field limit in errors.csv (and explanations.csv) is dropped, not fatal,
    and reported in the JSON log."""
    out = tmp_path / "out"
    shutil.copytree(base, out)
    with open(out / "errors.csv", "wb") as f:
        f.write(b"image,path,reason\n" + BIG + b"\n")
    with open(out / "explanations.csv", "ab") as f:
        f.write(BIG + b"\n")
    code, err = cli(*EXPLAIN, "-o", out)
    assert code == 0, err
    events = [json.loads(x) for x in (out / "xai-log.jsonl").read_text().splitlines()]
    dropped = {e["file"]: e["what"] for e in events if e["event"] == "state_dropped_lines"}
    assert set(dropped) == {"errors.csv", "explanations.csv"}
    assert [e["todo"] for e in events if e["event"] == "run_start"][-1] == 0
    assert b"xxxx" not in (out / "explanations.csv").read_bytes()
