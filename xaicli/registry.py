"""Shared by the method and metric registries: build a registered dataclass from checked params."""

from __future__ import annotations

import dataclasses

from pydantic import TypeAdapter, ValidationError

from .errors import XaiError


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
    try:
        return TypeAdapter(cls).validate_python(params)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise error(f"{kind} '{name}': parameter '{loc}': {err['msg']} (got {err.get('input')!r})") from None
