"""Method registry: `@register(name, description)` on a MethodSpec dataclass adds it here.

Adding a method is one file in this folder: a spec dataclass (its parameters) with the decorator,
and the BoundMethod subclass that computes it (see docs/architecture.md). Every module here is
imported below, so the file needs no other line anywhere. `xai methods`, the config validator,
docs/methods.md and the contract tests all read METHODS.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (  # noqa: F401
    METHODS,
    BoundMethod,
    Context,
    MethodSpec,
    Result,
    build_method,
    explain,
    make_context,
    register,
)

__all__ = [
    "METHODS",
    "BoundMethod",
    "Context",
    "MethodSpec",
    "Result",
    "build_method",
    "explain",
    "make_context",
    "register",
]

# importing every family module fills the registry (sorted: a deterministic order)
for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod != "base":
        importlib.import_module(f"{__name__}.{_mod}")
