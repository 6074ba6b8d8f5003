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


def test_plan_command_explains(hollow_70b, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    code = main(["plan", str(hollow_70b), "--simulate", "cuda:0=80GiB,cpu=64GiB", "--allow-quantization"])
    out = capsys.readouterr().out
    assert code == 0
    assert "chosen: nf4 on cuda:0" in out and "[    no] full" in out


def test_plan_command_json_round_trips(hollow_70b, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    import memplan

    assert main(["plan", str(hollow_70b), "--simulate", "cuda:0=80GiB,cuda:1=80GiB,cpu=64GiB", "--json"]) == 0
    plan = memplan.Plan.from_json(capsys.readouterr().out)
    assert plan.strategy.kind == "sharded"


def test_plan_command_nothing_fits_exits_1_with_shortfalls(hollow_70b) -> None:  # type: ignore[no-untyped-def]
    out = run_cli("plan", str(hollow_70b), "--simulate", "cuda:0=8GiB,cpu=8GiB")
    assert out.returncode == 1
    assert "short by" in out.stdout and "chosen: nothing fits" in out.stdout
    assert out.stderr.startswith("memplan: nothing fits: needs") and "Traceback" not in out.stderr


def test_plan_command_bad_checkpoint_is_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00")
    out = run_cli("plan", str(tmp_path))
    assert out.returncode == 1
    assert (
        out.stderr.strip()
        == f"memplan: error: {tmp_path / 'model.safetensors'}: file is 2 bytes, shorter than the 8-byte header length"
    )


@pytest.mark.parametrize(
    "args", [("plan",), ("plan", "x", "--context", "0"), ("plan", "x", "--headroom", "2")]
)
def test_plan_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    assert run_cli(*args).returncode == 2


def test_plan_cli_does_not_import_torch(hollow_70b) -> None:  # type: ignore[no-untyped-def]
    code = (
        "import sys; from memplan.cli import main; "
        f"main(['plan', {str(hollow_70b)!r}, '--simulate', 'cuda:0=80GiB,cpu=64GiB']); "
        "assert 'torch' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
