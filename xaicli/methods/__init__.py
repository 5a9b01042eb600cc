"""Method registry: `@register(name, description)` on a MethodSpec dataclass adds it here.

Adding a method is one file: a spec dataclass (its parameters) with the decorator, and the
BoundMethod subclass that computes it (see docs/architecture.md). `xai methods`, the config
validator, docs/methods.md and the contract tests all read METHODS.
"""

from __future__ import annotations

# importing the family modules fills the registry
from . import cam, gradient  # noqa: E402,F401
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
