"""Make small concept folders from sample_images/ (no network), for configs/concepts.yaml.

    python -m xaicli.concepts.sample_data [DEST] [--images sample_images]      (= make concept-data)

DEST/striped/   crops of the cat's striped fur (chelsea.png: forehead and cheek)
DEST/ceramic/   crops of the white cup and saucer (coffee.png)
DEST/random/    random crops of all six sample images (the random counterexamples)
DEST/cat/       variants of chelsea.png (crops, flips): the images tested for class 'tabby'
DEST/coffee/    variants of coffee.png: the images tested for class 'espresso'

Deterministic (seeded); rerunning rewrites the same files.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image, ImageOps

# (left, top, right, bottom) regions of the source images
STRIPED = [("chelsea.png", (170, 0, 330, 110)), ("chelsea.png", (10, 40, 130, 200))]
CERAMIC = [("coffee.png", (40, 230, 560, 390)), ("coffee.png", (60, 40, 300, 200))]
COUNTS = {"striped": 14, "ceramic": 14, "random": 40, "cat": 12, "coffee": 12}


def _crop_in(img: Image.Image, box, rng: random.Random, lo: int, hi: int) -> Image.Image:
    left, top, right, bottom = box
    side = rng.randint(lo, min(hi, right - left, bottom - top))
    x = rng.randint(left, right - side)
    y = rng.randint(top, bottom - side)
    out = img.crop((x, y, x + side, y + side))
    return ImageOps.mirror(out) if rng.random() < 0.5 else out


def _variant(img: Image.Image, rng: random.Random) -> Image.Image:
    w, h = img.size
    f = rng.uniform(0.75, 1.0)
    cw, ch = int(w * f), int(h * f)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = img.crop((x, y, x + cw, y + ch))
    return ImageOps.mirror(out) if rng.random() < 0.5 else out


def make(dest: str | Path, images: str | Path = "sample_images", seed: int = 0) -> Path:
    src, dest = Path(images), Path(dest)
    rng = random.Random(seed)
    opened = {p.name: Image.open(p).convert("RGB") for p in sorted(src.iterdir()) if p.suffix in (".png", ".jpg")}
    for name in COUNTS:
        (dest / name).mkdir(parents=True, exist_ok=True)
    for name, regions in (("striped", STRIPED), ("ceramic", CERAMIC)):
        for i in range(COUNTS[name]):
            file, box = regions[i % len(regions)]
            _crop_in(opened[file], box, rng, 56, 110).save(dest / name / f"{name}_{i:02d}.png")
    files = sorted(opened)
    for i in range(COUNTS["random"]):
        img = opened[files[i % len(files)]]
        _crop_in(img, (0, 0, *img.size), rng, 80, 300).save(dest / "random" / f"random_{i:02d}.png")
    for name, file in (("cat", "chelsea.png"), ("coffee", "coffee.png")):
        for i in range(COUNTS[name]):
            _variant(opened[file], rng).save(dest / name / f"{name}_{i:02d}.png")
    return dest


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    src = sys.argv[sys.argv.index("--images") + 1] if "--images" in sys.argv else "sample_images"
    args = [a for a in args if a != src]
    print(make(args[0] if args else "concept_data", src))
