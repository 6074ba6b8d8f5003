"""Every example runs as a user would run it, and says what it promises to."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_retention_policies_example_shows_each_policy_at_work() -> None:
    out = run_example("examples/retention_policies.py")
    assert "summarizer  gpu -> host" in out and "(room for embedder)" in out
    assert "embedder    gpu -> host" in out and "(medium pressure)" in out
    assert "(idle past its 0.2s limit)" in out
    assert out.count("chat on gpu") >= 5  # pinned: never moved


def test_infer_example_loads_in_one_line_and_generates(tiny_llama: Path) -> None:
    out = run_example("examples/infer.py", str(tiny_llama), "--new-tokens", "3")
    assert "tiny-llama: full on cpu" in out and "generated 3 tokens" in out


def test_infer_example_tries_another_machine(tiny_llama: Path) -> None:
    out = run_example("examples/infer.py", str(tiny_llama), "--simulate", "cuda:0=24GiB,cpu=64GiB")
    assert "[simulated devices]" in out and "generated 8 tokens" in out


def test_ci_simulated_devices_example_passes_under_the_plugin() -> None:
    # The plugin comes from the installed entry point, as in a user's project.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "examples/ci_simulated_devices"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout


def test_memplan_demo_gives_four_different_answers_and_agreeing_outputs() -> None:
    out = run_example("-m", "memplan", "demo")
    assert "a large GPU     -> full" in out
    assert "a small GPU     -> int8" in out or "a small GPU     -> nf4" in out
    assert "two small GPUs  -> sharded" in out
    assert "a tiny budget   -> streamed" in out
    assert "outputs of the full and the streamed load are identical: True" in out
