"""`xai render OUT`: redraw a run's overlay PNGs from its stored .npy maps, with other display
settings (colormap, alpha, the `overlay:` section: clipping, diverging colormap, caption,
colorbar). No model, no recomputation: each source image is decoded once and every map of it is
drawn again; run.yaml then records the new settings (its config and `hashes.display`), so a later
`xai explain` with them resumes instead of refusing. `xai explain` calls `redraw` itself when a
config differs from the folder's only by display settings.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .images import load_image
from .methods import METHODS
from .models.preprocess import Preprocess
from .outputs import load_map_file, map_paths, read_run_yaml, write_run_yaml
from .reader import RunFolder
from .sinks import MapStyle, caption_of, draw_png

DISPLAY_FIELDS = ("colormap", "alpha")  # top-level display keys; the rest is the `overlay:` section


@dataclass
class RenderSummary:
    out: Path
    images: int = 0
    maps: int = 0
    missing: int = 0  # rows whose map or source image could not be read (left as they were)
    seconds: float = 0.0


def style_of(run: RunFolder, cfg=None) -> MapStyle:
    cfg = cfg if cfg is not None else run.config
    kinds = {m.key: METHODS[m.name].map_kind for m in cfg.methods if m.name in METHODS}
    return MapStyle.of(cfg, kinds)


def redraw(
    out: Path, style: MapStyle, pre: Preprocess | None = None, skip=(), max_pixels: int | None = None, progress=None
) -> RenderSummary:
    """Redraw the PNG of every `ok` map of OUT (except the images in `skip`) from its .npy."""
    from .evaluate import _locator

    t0 = time.perf_counter()
    run = RunFolder(out)
    cfg = run.config
    pre = pre or Preprocess.from_dict(run.resolved.get("preprocess"))
    if pre is None:  # a run.yaml of an earlier version: the model's own preprocessing
        from .models.registry import load_model_cfg

        pre = load_model_cfg(cfg.model).preprocess
    locate = _locator(run.out, cfg.output)
    limit = max_pixels or cfg.max_pixels
    groups: dict[str, list[tuple[str, dict]]] = {}  # image -> [(map key, row)]
    path_of: dict[str, str] = {}
    for key, per in run.latest().items():
        for row in per.values():
            if row.get("status") == "ok" and row["image"] not in skip:
                groups.setdefault(row["image"], []).append((key, row))
                path_of.setdefault(row["image"], row.get("path") or "")
    res = RenderSummary(run.out)
    names = run.methods
    if progress:
        progress.start(len(groups))

    def one(image: str) -> tuple[int, int]:
        try:
            orig = np.asarray(load_image(locate(path_of[image]), limit), dtype=np.uint8)
        except Exception:  # the source moved or is unreadable: its PNGs stay as they are
            return 0, len(groups[image])
        h, w = orig.shape[:2]
        box = pre.crop_box(w, h)
        done = missing = 0
        for key, row in groups[image]:
            method = row["method"]
            for name in names.get(method, ()) or (None,):
                png, raw = map_paths(run.out, method, key, name, *run.formats)  # the run's overlay/map formats
                try:
                    if raw is None:
                        raise OSError("save_maps: false")
                    cam = load_map_file(raw)
                except (OSError, ValueError, KeyError):
                    missing += 1
                    continue
                caption = caption_of(row, name) if style.caption else None
                draw_png(png, cam, orig, box, style.look(method), caption)
                done += 1
        return done, missing

    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="xai-render") as pool:
        for done, missing in pool.map(one, sorted(groups)):
            res.maps += done
            res.missing += missing
            res.images += 1
            if progress:
                progress.advance(1)
    if progress:
        progress.stop()
    res.seconds = time.perf_counter() - t0
    return res


def display_overrides(config: str | Path | None, flags: dict, current: dict | None = None) -> dict:
    """The display keys to apply: all of the config file's (colormap, alpha, overlay; defaults for
    those it leaves out, so that `xai explain --config` with it then matches), else the run's
    (`current`, its run.yaml config), then the flags on top."""
    from .config import RunConfig

    upd: dict = {}
    if config is not None:
        from .config import read_yaml

        data = read_yaml(config)
        fields = RunConfig.model_fields
        upd = {k: data.get(k, fields[k].default) for k in DISPLAY_FIELDS}
        upd["overlay"] = data.get("overlay") or {}
    elif current is not None and isinstance(current.get("overlay"), dict):
        upd["overlay"] = current["overlay"]
    overlay = dict(upd.get("overlay") or {})
    for k, v in flags.items():
        if v is None:
            continue
        if k in DISPLAY_FIELDS:
            upd[k] = v
        else:
            overlay[k] = v
    if overlay or "overlay" in upd:
        upd["overlay"] = overlay
    return upd


def dump_methods(cfg) -> dict:
    """The methods and metrics of a RunConfig in their config form (for re-validation)."""
    from .config import dump_config

    d = dump_config(cfg)
    return {"methods": d["methods"], "metrics": d["metrics"]}


def run_render(
    out: str | Path, config=None, flags: dict | None = None, wait: bool = False, progress=None, on_wait=None
):
    """`xai render`: new display settings for an output folder, its PNGs redrawn from the maps."""
    from pydantic import ValidationError

    from .config import RunConfig, dump_config, format_validation_error
    from .locks import OutputLock
    from .state import JsonLog, config_hash, config_parts

    run = RunFolder(out)
    upd = display_overrides(config, flags or {}, run.run["config"])
    try:
        cfg = RunConfig.model_validate({**run.config.model_dump(mode="json"), **dump_methods(run.config), **upd})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(config or "command line"))) from None
    with OutputLock(run.out, wait=wait, on_wait=on_wait):
        doc = read_run_yaml(run.out)
        res = redraw(run.out, style_of(run, cfg), max_pixels=cfg.max_pixels, progress=progress)
        extra = {k: v for k, v in doc.items() if k not in ("config", "versions")}
        old_cfg = run.config
        # only when the files the run used are unchanged: a retrained checkpoint must stay visible
        # to the next `xai explain` (which then refuses, naming the file)
        if str(doc.get("config_hash")) == config_hash(old_cfg):
            extra["config_hash"] = config_hash(cfg)
            hashes = dict(doc.get("hashes") or {})
            if hashes:  # an earlier version's run.yaml gains its parts at the next `xai explain`
                hashes["display"] = config_parts(cfg)["display"]
                extra["hashes"] = hashes
        write_run_yaml(run.out, dump_config(cfg), extra)
        JsonLog(run.out / "xai-log.jsonl").event(
            "render", maps=res.maps, missing=res.missing, seconds=round(res.seconds, 3)
        )
    return res
