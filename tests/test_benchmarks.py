"""Every benchmark runs at its --quick size, so none of them rots. No timing is asserted here:
the figures are for people, measured with the full sizes (see the README)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p.name for p in (ROOT / "benchmarks").glob("[!_]*.py"))


def test_every_benchmark_is_listed_here() -> None:
    assert BENCHMARKS == [
        "estimate_accuracy.py", "gpu_check.py", "load_speed.py", "monitor_overhead.py", "plan_speed.py",
        "residency_trace.py",
    ]  # fmt: skip


@pytest.mark.parametrize("script", BENCHMARKS)
def test_benchmark_quick_run(script: str) -> None:
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    if script == "gpu_check.py" and "no CUDA device here" in result.stdout:
        return  # it checks real GPUs only; here it must say so and pass
    assert "x" in result.stdout or "%" in result.stdout  # each prints ratios against its peer
