"""The documentation follows the registry: docs/methods.md's generated table is current, and every
registered method is named in docs/methods.md and README.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from xaicli.catalog import BEGIN, END, methods_table, render
from xaicli.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
METHODS_DOC = ROOT / "docs" / "methods.md"
README = ROOT / "README.md"


def between_markers(text: str) -> str:
    start, end = text.find(BEGIN), text.find(END)
    assert start >= 0 and end > start, f"docs/methods.md lost its markers {BEGIN} ... {END}"
    return text[start + len(BEGIN) : end].strip("\n")


def test_methods_table_is_current():
    current = between_markers(METHODS_DOC.read_text(encoding="utf-8"))
    assert current == methods_table().strip("\n"), (
        "docs/methods.md's method table is stale (a method was added or changed): run `make docs`"
    )


def test_render_replaces_only_the_table():
    text = f"before\n{BEGIN}\nold table\n{END}\nafter\n"
    out = render(text)
    assert out.startswith(f"before\n{BEGIN}\n| method |") and out.endswith(f"{END}\nafter\n")
    assert "old table" not in out and render(out) == out


@pytest.mark.parametrize("doc", [METHODS_DOC, README], ids=lambda p: p.name)
def test_every_method_is_named(doc):
    text = doc.read_text(encoding="utf-8")
    missing = [name for name in sorted(METHODS) if f"`{name}`" not in text]
    assert not missing, f"{doc.relative_to(ROOT)} does not name the method(s) {missing} (as `name`)"
