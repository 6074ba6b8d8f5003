"""`memplan probe` as a user runs it: a table, JSON, one-line errors and exit codes."""

import json
import subprocess
import sys

import pytest

from memplan.cli import main

SPEC = "cuda:0=24GiB@20GiB,cuda:1=24GiB,cpu=64GiB,disk=2TiB"


def test_probe_table_with_simulated_devices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--simulate", SPEC]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("simulated devices")
    assert out[1].split() == ["DEVICE", "TOTAL", "FREE", "USED", "OTHERS", "SOURCE", "NAME"]
    assert out[2].split()[:5] == ["cuda:0", "24.0", "GiB", "20.0", "GiB"]
    assert len(out) == 6


def test_probe_json_reports_exactly_the_spec(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--json", "--simulate", SPEC]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(d["device"], d["total"], d["free"]) for d in report["devices"]] == [
        ("cuda:0", 24 << 30, 20 << 30),
        ("cuda:1", 24 << 30, 24 << 30),
        ("cpu", 64 << 30, 64 << 30),
        ("disk", 2 << 40, 2 << 40),
    ]


def test_probe_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEMPLAN_SIMULATE", "cuda:0=80GiB,cpu=256GiB")
    assert main(["probe", "--json"]) == 0
    assert [d["device"] for d in json.loads(capsys.readouterr().out)["devices"]] == [
        "cuda:0",
        "cpu",
    ]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memplan", *args], capture_output=True, text=True, check=False
    )


def test_bad_spec_is_one_line_exit_1_no_traceback() -> None:
    out = run_cli("probe", "--simulate", "cuda:0=24GiB,cuda:0=1GiB")
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert lines[0].startswith("memplan: error: bad simulated-device spec entry 'cuda:0=1GiB'")
    assert "listed twice" in lines[0]


@pytest.mark.parametrize("args", [(), ("probe", "--bogus"), ("frobnicate",)])
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    assert run_cli(*args).returncode == 2


def test_real_probe_table() -> None:
    out = run_cli("probe")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].split()[0] == "DEVICE"
    assert any(line.startswith("cpu ") for line in out.stdout.splitlines())
