"""Metric registry: `@register(name, description)` on a Metric dataclass adds it here.

Adding a metric is one class in a family module (a new file in this folder is imported by itself)
plus its decorator; `xai metrics`, the config validator, `xai evaluate` and the contract tests all
read METRICS.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import ConfigError
from . import localization
from .base import METRICS, Curve, Metric, MetricResult, build_metric, register  # noqa: F401

__all__ = [
    "METRICS",
    "Curve",
    "Metric",
    "MetricResult",
    "build_metric",
    "build_metrics",
    "load_annotations",
    "register",
]


def build_metrics(specs: list, method_keys: list[str]) -> list[Metric]:
    """MetricCfg-like specs (name + params) -> Metric objects; checks `against`."""
    out = []
    for spec in specs:
        name, params = (spec.name, spec.params) if hasattr(spec, "name") else (spec["name"], spec.get("params", {}))
        m = build_metric(name, **params)
        against = getattr(m, "against", None)
        if "reference" in m.needs and against is None:
            raise ConfigError(f"metric '{name}' needs --against METHOD (one of: {', '.join(method_keys)})")
        if against is not None and against not in method_keys:
            raise ConfigError(f"--against: '{against}' is not a method of this run (one of: {', '.join(method_keys)})")
        out.append(m)
    return out


def load_annotations(path, metrics: list[Metric]):
    """The annotation boxes, or None; a ConfigError when a metric needs boxes and there are none."""
    needs_boxes = [m.name for m in metrics if "boxes" in m.needs]
    if needs_boxes and not path:
        raise ConfigError(f"metric(s) {', '.join(needs_boxes)} need bounding boxes: give --annotations FILE")
    if not path:
        return None
    ann = localization.Annotations.load(path)
    if any(getattr(m, "average", "image") == "class" for m in metrics):
        bad = next(
            (
                lab
                for labs in ann.labels.values()
                for lab in labs
                if lab is not None and localization.class_index(lab) is None
            ),
            None,
        )
        if bad is not None:
            raise ConfigError(
                f"annotations: {path}: label '{bad}' is not a class index; the pointing game's `average: class` "
                "needs integer labels (the model's class index, e.g. 967) or none"
            )
    return ann


# importing every family module fills the registry (sorted: a deterministic order)
for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod != "base":
        importlib.import_module(f"{__name__}.{_mod}")
