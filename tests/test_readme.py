"""The README's Python examples run as written and print what their comments say."""

import os
import re
from pathlib import Path
from unittest import mock

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def expected_output(code: str) -> list[str]:
    """The comment after each ``print(...)`` line is the line that call prints."""
    return re.findall(r"^\s*print\(.*\)\s*#\s*(.+?)\s*$", code, re.MULTILINE)


def test_readme_has_python_examples() -> None:
    assert BLOCKS and all(expected_output(code) for code in BLOCKS)


@pytest.mark.parametrize("code", BLOCKS)
def test_readme_python_block_runs(code: str, capsys: pytest.CaptureFixture[str]) -> None:
    with mock.patch.dict(os.environ):  # an example may point HF_HUB_CACHE at its own cache
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.splitlines() == expected_output(code)
