"""The README's supported-models table is the matrix's, as rendered now."""

from __future__ import annotations

import re
from pathlib import Path

from tests.compat.table import render

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_supported_models_table_is_current() -> None:
    found = re.search(
        r"<!-- supported-models:start -->\n(.*?)<!-- supported-models:end -->", README.read_text(), re.DOTALL
    )
    assert found is not None, "README.md lacks the supported-models markers"
    assert found.group(1) == render(), (
        "stale: put `python -m tests.compat.table`'s output between the markers"
    )
