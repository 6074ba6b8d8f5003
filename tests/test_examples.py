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
    assert "(idle 0.2s > 0.2s)" in out
    assert out.count("chat on gpu") >= 5  # pinned: never moved
