"""Method registry: `@register(name, description)` on a Method dataclass adds it here.

Adding a method is one class in a family module plus its decorator; `xai methods`, the
config validator and `--help` all read METHODS.
"""

from __future__ import annotations

# importing the family modules fills the registry
from . import cam, gradient  # noqa: E402,F401
from .base import METHODS, Method, build_method, explain, register  # noqa: F401

__all__ = ["METHODS", "Method", "build_method", "explain", "register"]
