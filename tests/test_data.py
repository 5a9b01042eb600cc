"""Image discovery and decoding: formats, modes, EXIF, output keys."""

import numpy as np
import pytest
from PIL import Image

from xaicli.data import discover, load_image, safe_rel
from xaicli.errors import InputError


def test_discover_folder_glob_list_and_file(tmp_path):
    (tmp_path / "a").mkdir()
    for n in ("x.jpg", "a/y.PNG", "a/z.webp", "skip.txt"):
        Image.new("RGB", (8, 8)).save(tmp_path / n) if not n.endswith(".txt") else (tmp_path / n).write_text("x")
    d = discover(tmp_path)
    assert [i.rel for i in d.items] == ["a/y", "a/z", "x"] and d.ignored == 1
    assert [i.rel for i in discover(tmp_path, recursive=False).items] == ["x"]
    assert [i.rel for i in discover(str(tmp_path / "**" / "*.PNG")).items] == ["a/y"]
    lst = tmp_path / "list.txt"
    lst.write_text("x.jpg\n# comment\n\na/z.webp\n")
    assert [i.rel for i in discover(lst).items] == ["x", "a/z"]
    assert [i.rel for i in discover(tmp_path / "x.jpg").items] == ["x"]
    with pytest.raises(InputError):
        discover(tmp_path / "missing")


def test_colliding_stems_keep_their_extension(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert sorted(i.rel for i in discover(tmp_path).items) == ["a_jpg", "a_png"]


def test_safe_rel_never_escapes(tmp_path):
    assert ".." not in safe_rel(tmp_path / ".." / ".." / "etc" / "passwd", tmp_path)
    assert not safe_rel(__import__("pathlib").Path("/etc/passwd"), tmp_path).startswith("/")


def test_modes_are_converted(tmp_path):
    a16 = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    im = load_image(tmp_path / "g16.png")
    assert im.mode == "RGB"
    arr = np.asarray(im)[..., 0]
    assert arr.max() > 200 and arr.min() < 10  # scaled from 16 bit, not clipped at 255
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.save(tmp_path / "t.png")
    assert np.asarray(load_image(tmp_path / "t.png")).min() == 255  # transparent -> white
    Image.new("L", (4, 4), 7).save(tmp_path / "g.bmp")
    assert load_image(tmp_path / "g.bmp").mode == "RGB"
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = np.asarray(load_image(tmp_path / "c.jpg"))[0, 0]
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


def test_pixel_limit(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="pixel limit"):
        load_image(tmp_path / "big.png", max_pixels=5000)


def test_output_keys_are_unique_and_never_reserved(tmp_path):
    for n in ("a.jpg", "a.JPG", "a_jpg.png", ".xai-tmp-x.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / n, format="PNG")
    keys = [i.rel for i in discover(tmp_path).items]
    assert len(keys) == len(set(keys)) == 4
    assert not any(k.startswith(".xai-") for k in keys)
    lst = tmp_path / "l.txt"
    lst.write_text("a.jpg\na.jpg\n./a.jpg\n")
    assert len(discover(lst).items) == 1
