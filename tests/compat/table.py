"""The README's supported-models table, rendered from the compatibility matrix's declarations.

``python -m tests.compat.table`` prints it; tests/compat/test_table.py checks the README's copy
(between ``<!-- supported-models:start -->`` and ``<!-- supported-models:end -->``) is current.
"""

from __future__ import annotations

from tests.compat.families import COLUMNS, FAMILIES, UNSUPPORTED, Family, covers

__all__ = ["render"]


def _cell(family: Family, column: str, footnotes: list[str]) -> str:
    if not covers(family, column):
        return "—"
    if (family.name, column) not in UNSUPPORTED:
        return "✓"
    error, message = UNSUPPORTED[family.name, column]
    footnotes.append(f"{family.name}, {column}: `{error.__name__}: {message}`")
    return f"✗ ({len(footnotes)})"


def render() -> str:
    """The markdown table: a row per family, ✓ where memplan's output equals transformers' (int8:
    transformers+bitsandbytes'), ✗ with a footnote giving the error users get, — where the column
    does not apply."""
    footnotes: list[str] = []
    lines = [
        "| family | class | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for family in FAMILIES:
        cells = [_cell(family, column, footnotes) for column in COLUMNS]
        lines.append(f"| {family.name} | `{family.model}` | " + " | ".join(cells) + " |")
    lines += [""] + [f"({i}) {note}" for i, note in enumerate(footnotes, start=1)]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
