"""Issue 12, CLI side: bad input is one line on stderr and exit 1 or 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memplan.cli import main
from memplan.errors import MemplanError
from tests.planner.test_trust import small_config, write_checkpoint

SPEC = "cuda:0=1GiB,cpu=4GiB"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memplan", *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=120,
    )


def assert_one_line(out: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == code, out.stderr
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("monitor", "--interval", "-1", "--duration", "0.2"), "--interval"),
        (("monitor", "--interval", "nan", "--duration", "0.2"), "--interval"),
        (("monitor", "--duration", "-3"), "--duration"),
        (("monitor", "--duration", "0.2", "--prometheus", "127.0.0.1:99999"), "--prometheus"),
        (("monitor", "--duration", "0.2", "--prometheus", "garbage"), "--prometheus"),
        (("monitor", "--duration", "0.2", "--plot", "/nonexistent/x.png"), "--plot"),
    ],
)
def test_bad_monitor_arguments_are_a_usage_line_before_sampling(args: tuple[str, ...], needle: str) -> None:
    assert_one_line(run_cli(*args, "--simulate", SPEC), 2, needle)


@pytest.mark.parametrize("command", ["load", "plan"])
def test_a_dtype_torch_cannot_compute_in_is_a_usage_line(tmp_path: Path, command: str) -> None:
    model = write_checkpoint(tmp_path / "m", range(2), small_config(2))
    assert_one_line(run_cli(command, str(model), "--dtype", "fp8", "--simulate", SPEC), 2, "--dtype")


def test_an_unknown_kv_dtype_is_a_usage_line(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "m", range(2), small_config(2))
    assert_one_line(run_cli("plan", str(model), "--kv-dtype", "int3", "--simulate", SPEC), 2, "--kv-dtype")


def test_a_prometheus_port_in_use_is_one_line_exit_1() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_cli("monitor", "--duration", "0.2", "--prometheus", f"127.0.0.1:{port}", "--simulate", SPEC)
    assert_one_line(out, 1, "memplan: error:", str(port))


def test_layers_with_a_gap_plan_and_a_junk_stage_is_one_line_naming_the_config(tmp_path: Path) -> None:
    """A gap is the built model's to judge (tests/loaders/test_trust.py); a per-stage number that
    is no number is the config's fault, said in one line."""
    gap = write_checkpoint(tmp_path / "gap", [0, 2], small_config(3))
    assert run_cli("plan", str(gap), "--simulate", SPEC).returncode == 0
    junk = write_checkpoint(tmp_path / "junk", [0, 1], {**small_config(2), "num_attention_heads": [2, "x"]})
    assert_one_line(run_cli("plan", str(junk), "--simulate", SPEC), 1, "config.json")


def test_a_negative_head_count_is_one_line_naming_config_and_field(tmp_path: Path) -> None:
    config = {**small_config(2), "num_attention_heads": -4}
    model = write_checkpoint(tmp_path / "neg", range(2), config)
    assert_one_line(run_cli("plan", str(model), "--simulate", SPEC), 1, "config.json", "num_attention_heads")


def test_a_memplan_error_of_several_lines_is_printed_as_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(_: object) -> int:
        raise MemplanError("first line\nsecond line")

    monkeypatch.setattr("memplan.cli._cmd_probe", fail)
    assert main(["probe", "--simulate", SPEC]) == 1
    assert capsys.readouterr().err == "memplan: error: first line second line\n"


def test_a_load_with_an_unwritable_corrections_cache_succeeds_with_one_warning(
    tiny_llama: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    env = {**_environ(), "MEMPLAN_CORRECTIONS": str(blocker / "corrections.json")}
    out = run_cli("load", str(tiny_llama), "--json", env=env)  # not simulated: the measured peak is saved
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert [line for line in out.stderr.splitlines() if "cannot save" in line] != []
    assert json.loads(out.stdout)["report"]


def _environ() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "MEMPLAN_SIMULATE"}


@pytest.mark.parametrize("args", [["--context", "1e99"], ["--batch", "two"]])
def test_a_number_that_is_not_a_whole_number_is_named_as_such(
    tiny_llama: Path, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["plan", str(tiny_llama), "--simulate", "cpu=8GiB", *args])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "positive whole number" in err and "_positive" not in err and len(err.strip().splitlines()) == 1
