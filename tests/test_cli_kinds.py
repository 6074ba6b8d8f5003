"""`memplan load` runs a test forward on every kind of model, with inputs built from its config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from memplan.cli import main

KINDS = {
    "bert": "input_ids [1, 8]",
    "t5": "input_ids [1, 8], decoder_input_ids [1, 8]",
    "whisper": "decoder_input_ids [1, 8], input_features [1, 16, 32]",
    "clip": "input_ids [1, 8], pixel_values [1, 3, 32, 32]",
    "vit": "pixel_values [1, 3, 32, 32]",
}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_load_runs_a_forward_built_from_the_config(
    tiny_family: Callable[[str], Path], capsys: pytest.CaptureFixture[str], name: str
) -> None:
    assert main(["load", str(tiny_family(name)), "--simulate", "cpu=8GiB"]) == 0
    out, err = capsys.readouterr()
    assert f"forward on {KINDS[name]}:" in out and "Traceback" not in out + err


@pytest.mark.parametrize("name", ["t5", "bart", "whisper", "clip"])
def test_plan_reads_their_config(
    tiny_family: Callable[[str], Path], capsys: pytest.CaptureFixture[str], name: str
) -> None:
    assert main(["plan", str(tiny_family(name)), "--simulate", "cpu=8GiB"]) == 0
    out = capsys.readouterr().out
    assert "no usable config.json" not in out and "4 layers" in out


def test_a_context_beyond_the_model_is_one_line_naming_its_limit(
    tiny_family: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tiny_family("bert"))
    assert main(["plan", path, "--context", "10000000000000", "--simulate", "cpu=8GiB"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at most 512 tokens" in err and "PiB" not in err
