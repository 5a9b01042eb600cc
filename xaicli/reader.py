"""The output folder as code: a reader of the documented layout (xaicli/outputs.py).

`xai evaluate`, `xai report` (xaicli/report.py) and users' scripts read a run through this one class:

    run = RunFolder("xai-out")
    run.config                      # the RunConfig the run used (validated), run.resolved, run.versions
    run.methods                     # {key: (names of its maps, () for one)}
    for row in run.explanations():  # explanations.csv rows (a later row for the same key wins)
        m = run.load_map(row["method"], row["image"])   # float32 [H, W] (or [K, H, W])
    run.metrics(), run.metrics_summary(), run.errors(), run.manifest()

Layer: reads files only; imports outputs (the layout), and config and methods lazily (to validate
run.yaml and to know which methods have named maps).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import ConfigError, InputError
from .outputs import (
    ERROR_FIELDS,
    METRIC_FIELDS,
    READ_FIELDS,
    REPAIR_HINT,
    damaged,
    load_map_file,
    map_key,
    map_paths,
    method_keys,
    read_csv,
    read_manifest,
    read_run_yaml,
)

NO_MAPS_HINT = "run `xai explain` again with save_maps: npy (or npz-f16, or --save-maps npy) to score its maps"


class RunFolder:
    def __init__(self, out: str | Path):
        self.out = Path(out)
        if not self.out.is_dir():
            raise InputError(f"{self.out}: no such output folder (run `xai explain` first, or name the folder)")
        self._config = None
        self.run = read_run_yaml(self.out)
        if not self.run or "config" not in self.run:
            raise InputError(f"{self.out}: no run.yaml here; is this an output folder of `xai explain`?")

    # -- run.yaml --------------------------------------------------------------------------------
    @property
    def config(self):
        """The run's RunConfig; metrics this version does not know are dropped (the maps still count)."""
        from pydantic import ValidationError

        from .config import RunConfig, format_validation_error

        if self._config is not None:
            return self._config
        try:
            try:
                self._config = RunConfig.model_validate(self.run["config"])
            except ValidationError:
                self._config = RunConfig.model_validate({**self.run["config"], "metrics": []})
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, str(self.out / "run.yaml")) + f"; {REPAIR_HINT}") from None
        except (RecursionError, TypeError, ValueError) as e:
            raise damaged(self.out / "run.yaml", f"its config cannot be read: {type(e).__name__}") from None
        return self._config

    @property
    def resolved(self) -> dict:
        return self.run.get("resolved") or {}

    @property
    def versions(self) -> dict:
        return self.run.get("versions") or {}

    @property
    def multi_target(self) -> bool:
        """Several targets per image: rows and maps are keyed `<rel>__<class>` (outputs.map_key)."""
        return bool(self.resolved.get("multi_target"))

    def row_key(self, row: dict) -> str:
        """The map key of an explanations.csv row: its image, or `<image>__<target_class>`."""
        return map_key(row["image"], row.get("target_class"), self.multi_target)

    @property
    def methods(self) -> dict[str, tuple[str, ...]]:
        return {key: tuple(spec.map_names) for key, spec in self.config.specs()}  # may depend on params

    # -- tables ----------------------------------------------------------------------------------
    def explanations(self) -> list[dict]:
        return read_csv(self.out / "explanations.csv", READ_FIELDS)

    def latest(self) -> dict[str, dict[str, dict]]:
        """{map key: {method: row}}, the last row of each (key, method) winning. The key is the
        image (`rel`), or `<rel>__<class>` in a run with several targets per image; `load_map`,
        `has_maps` and `overlay_file` take that key."""
        by_image: dict[str, dict[str, dict]] = {}
        for r in self.explanations():
            by_image.setdefault(self.row_key(r), {})[r["method"]] = r
        return by_image

    def errors(self) -> list[dict]:
        return read_csv(self.out / "errors.csv", ERROR_FIELDS)

    def metrics(self) -> list[dict]:
        return read_csv(self.out / "metrics.csv", METRIC_FIELDS)

    def metrics_summary(self) -> list[dict]:
        return read_csv(self.out / "metrics_summary.csv", ("method", "metric", "mean"))

    def metrics_summary_by_class(self) -> list[dict]:
        return read_csv(self.out / "metrics_summary_by_class.csv")

    def metrics_curves(self) -> list[dict]:
        return read_csv(self.out / "metrics_curves.csv")

    def plots(self) -> list[Path]:
        """The run's plot PNGs in OUT (metrics_<metric>.png, sanity_<method>.png)."""
        return sorted(p for p in self.out.glob("*.png") if p.name.startswith(("metrics_", "sanity_")))

    def last_run(self) -> dict:
        """The last run_end event of OUT/xai-log.jsonl (status, done, failed, seconds, ...), or {}."""
        p = self.out / "xai-log.jsonl"
        last = {}
        if p.is_file():
            for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
                if '"run_end"' in line:
                    try:
                        last = json.loads(line)
                    except ValueError:
                        pass
        return last

    @property
    def formats(self) -> tuple[str, str | bool]:
        """(overlay_format, save_maps) of the run: png|jpg|webp and npy|npz-f16|False."""
        return self.config.overlay_format, self.config.save_maps

    @property
    def maps_saved(self) -> bool:
        """False when the run was made with `save_maps: false` (overlays only, nothing to score)."""
        return self.config.save_maps is not False

    def overlay_file(self, method: str, image: str) -> Path:
        """The overlay image of one (method, image); the first named map's for a method with several."""
        names = self.methods.get(method, ()) or (None,)
        return map_paths(self.out, method, image, names[0], *self.formats)[0]

    def sheet_file(self, image: str) -> Path:
        """OUT/sheets/<rel>.png, the comparison sheet of an image."""
        return (self.out / "sheets" / image).with_name(Path(image).name + ".png")

    def manifest(self) -> dict:
        """manifest.json ({} when missing or damaged: every run rewrites it at its end)."""
        return read_manifest(self.out)

    # -- maps ------------------------------------------------------------------------------------
    def map_files(self, method: str, image: str) -> list[Path]:
        """The raw map files (.npy, or .npz with save_maps: npz-f16) of one (method, image): one, or
        one per named map; [] when the run saved no raw maps (save_maps: false)."""
        names = self.methods.get(method, ()) or (None,)
        files = [map_paths(self.out, method, image, n, *self.formats)[1] for n in names]
        return [p for p in files if p is not None]

    def has_maps(self, method: str, image: str) -> bool:
        files = self.map_files(method, image)
        return bool(files) and all(p.is_file() for p in files)

    def load_map(self, method: str, image: str) -> np.ndarray:
        """float32 [H, W], or [K, H, W] for a method with named maps (from .npy or .npz-f16)."""
        files = self.map_files(method, image)
        if not files:
            raise InputError(f"{self.out}: the run saved no raw maps (save_maps: false); {NO_MAPS_HINT}")
        arrs = [load_map_file(p) for p in files]
        return arrs[0] if len(arrs) == 1 and not self.methods.get(method) else np.stack(arrs)


def manifest_of(out: Path, status: str) -> dict:
    """What a run wrote, by kind (listed from the folder at the end of the run)."""
    run = read_run_yaml(out)
    keys = method_keys(run)
    rows = read_csv(out / "explanations.csv", READ_FIELDS)
    per = {k: sum(1 for r in rows if r["method"] == k and r["status"] == "ok") for k in keys}
    files = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
    return {
        "status": status,
        "config_hash": run.get("config_hash"),
        "files": files,
        "maps": {k: {"folder": k, "ok": n} for k, n in per.items()},
        "explanations": len(rows),
        "errors": len(read_csv(out / "errors.csv", ERROR_FIELDS)),
        "metrics": sorted({r["metric"] for r in read_csv(out / "metrics.csv", METRIC_FIELDS)}),
        "plots": [f for f in files if f.endswith(".png")],
    }
