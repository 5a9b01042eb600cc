"""Metric registry: `@register(name, description)` on a Metric dataclass adds it here.

Adding a metric is one class in a family module plus its decorator; `xai metrics`, the config
validator and `xai evaluate` all read METRICS.
"""

from __future__ import annotations

# importing the family modules fills the registry
from . import faithfulness, localization, sanity  # noqa: E402,F401
from .base import METRICS, Metric, build_metric, register  # noqa: F401

__all__ = ["METRICS", "Metric", "build_metric", "register"]
