"""Shared by the method and metric registries: build a registered dataclass from checked params."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Annotated

from pydantic import Field, TypeAdapter, ValidationError

from .errors import XaiError

# bounded numeric parameters (a typo such as 100000 or 99999999999999999999 is refused when the
# config is read instead of exhausting memory or time in the night)
Batch = Annotated[int, Field(ge=1, le=4096)]  # items per forward/backward of an inner loop
Count = Annotated[int, Field(ge=1, le=100_000)]  # path points, samples, steps
MAX_INT = 2**31 - 1  # any other integer parameter


def check_values(params: dict, where: str = "") -> str | None:
    """The first value no parameter may hold: a non-finite float, a NUL byte, a huge integer.
    Returns 'parameter ...: why' or None."""
    for k, v in params.items():
        loc = f"{where}.{k}" if where else str(k)
        if isinstance(v, float) and not math.isfinite(v):
            return f"parameter '{loc}': must be a finite number (got {v!r})"
        if isinstance(v, str) and "\0" in v:
            return f"parameter '{loc}': contains a NUL byte"
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT:
            return f"parameter '{loc}': {v} is out of range (at most {MAX_INT})"
        if isinstance(v, dict):
            bad = check_values(v, loc)
            if bad:
                return bad
        if isinstance(v, list | tuple):
            bad = check_values({f"[{i}]": x for i, x in enumerate(v)}, loc)
            if bad:
                return bad
    return None


def _numeric_fields(cls) -> set[str]:
    """Fields typed int or float (maybe Annotated/Optional): a YAML `true` there is a mistake."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        return set()
    out = set()
    for name, h in hints.items():
        args = {a for a in typing.get_args(h) if a is not type(None)} if typing.get_args(h) else {h}
        if typing.get_origin(h) is Annotated:
            args = {typing.get_args(h)[0]}
        if args and args <= {int, float}:
            out.add(name)
    return out


def registrar(registry: dict):
    """A `@register(name, description)` class decorator that files classes into `registry`."""

    def register(name: str, description: str):
        def deco(cls):
            cls.name = name
            cls.description = description
            registry[name] = cls
            return cls

        return deco

    return register


def public_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.name.startswith("_")]


def build_registered(registry: dict, kind: str, name: str, params: dict, error: type[XaiError]):
    """registry[name](**params), with unknown names/parameters and bad types as one-line `error`s."""
    if name not in registry:
        raise error(f"unknown {kind} '{name}' (allowed: {', '.join(sorted(registry))})")
    cls = registry[name]
    allowed = {f.name for f in public_fields(cls)}
    unknown = sorted(set(params) - allowed)
    if unknown:
        shown = ", ".join(sorted(allowed)) or "none"
        raise error(f"{kind} '{name}': unknown parameter '{unknown[0]}' (allowed: {shown})")
    bad = check_values(params)
    if bad:
        raise error(f"{kind} '{name}': {bad}")
    flags = sorted(k for k in _numeric_fields(cls) if isinstance(params.get(k), bool))
    if flags:
        raise error(f"{kind} '{name}': parameter '{flags[0]}': a number is needed (got {params[flags[0]]!r})")
    try:
        return TypeAdapter(cls).validate_python(params)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise error(f"{kind} '{name}': parameter '{loc}': {err['msg']} (got {err.get('input')!r})") from None
