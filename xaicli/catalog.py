"""The method table of docs/methods.md, generated from the METHODS registry.

    python -m xaicli.catalog     (or `make docs`) rewrites the table between the markers

Columns: name, what it computes (the registered description), parameters with their defaults
(the spec's dataclass fields), the CSV columns it declares (`extras`) and its cost (`cost`).
tests/test_docs.py fails when the table in docs/methods.md differs from what this renders.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path

BEGIN = "<!-- methods-table:begin -->"
END = "<!-- methods-table:end -->"
DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def _value(v) -> str:
    """A default as it is written in a YAML config: null, true/false, plain strings, {} / [...]."""
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    if isinstance(v, str):
        return v
    if isinstance(v, dict | list | tuple):
        return json.dumps(list(v) if isinstance(v, tuple) else v)
    return repr(v)


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _choices(tp) -> list[str]:
    """The allowed values of a Literal[...] (or Literal[...] | None) annotation, else [], sorted:
    typing caches Literals regardless of order, so the written order depends on import order."""
    if typing.get_origin(tp) is typing.Literal:
        return sorted(str(a) for a in typing.get_args(tp))
    return [c for a in typing.get_args(tp) for c in _choices(a)]


def _params(cls) -> str:
    from .objectives import OBJECTIVES

    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: no choices shown
        hints = {}
    out = []
    for f in cls.params():
        text = f"`{f.name}={_value(_default(f))}`"
        choices = _choices(hints.get(f.name)) or (list(OBJECTIVES) if f.name == "objective" else [])
        if choices:
            text += " (" + " \\| ".join(choices) + ")"
        out.append(text)
    return ", ".join(out) or "–"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or "–"


def _kind_doc(cls) -> str:
    """A map_kind that depends on the parameters: the first line of the property's comment/doc."""
    doc = (cls.map_kind.fget.__doc__ or "").strip().splitlines()
    return _cell(doc[0]) if doc else "depends on the parameters"


def methods_table() -> str:
    """The markdown table of every registered method, sorted by name."""
    from .methods import METHODS

    lines = [
        "| method | what it computes | parameters (defaults) | CSV extras | cost per image | overlay (map_kind) |",
        "|---|---|---|---|---|---|",
    ]
    for name, cls in sorted(METHODS.items()):
        extras = ", ".join(f"`{e}`" for e in cls.extras) or "–"
        names = f" (maps: {', '.join(f'`{n}`' for n in cls.map_names)})" if cls.map_names else ""
        kind = cls.map_kind if isinstance(cls.map_kind, str) else _kind_doc(cls)  # a property: its docstring
        lines.append(
            f"| `{name}` | {_cell(cls.description)}{names} | {_params(cls)} | {extras} | {_cell(cls.cost)} | {kind} |"
        )
    return "\n".join(lines) + "\n"


def render(text: str) -> str:
    """`text` with the part between the markers replaced by the current table."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the markers {BEGIN} ... {END} are missing")
    return text[: start + len(BEGIN)] + "\n" + methods_table() + text[end:]


def update_methods_doc(path: str | Path = DOC) -> bool:
    """Rewrite the table in `path` (docs/methods.md); True when the file changed."""
    p = Path(path)
    old = p.read_text(encoding="utf-8")
    new = render(old)
    if new == old:
        return False
    p.write_text(new, encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else DOC
    changed = update_methods_doc(path)
    print(f"{path}: {'updated' if changed else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
