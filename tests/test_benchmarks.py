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
        "residency_trace.py", "serving.py",
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
    if script == "serving.py":  # it checks every request's logits against the peers' before it prints
        assert "memplan / count-LRU: p50" in result.stdout
        assert "logits identical under the three policies: yes" in result.stdout


def test_a_model_dir_the_benchmark_did_not_write_is_never_overwritten(tmp_path: Path) -> None:
    """``--model-dir`` pointed at a user's own model (another config) is refused, untouched."""
    from transformers import LlamaConfig

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from _common import LLAMA_QUICK, make_checkpoint, make_llama

    theirs = tmp_path / "their-model"
    theirs.mkdir()
    (theirs / "config.json").write_text('{"model_type": "llama", "hidden_size": 4096}')
    (theirs / "model.safetensors").write_bytes(b"their weights")
    with pytest.raises(SystemExit, match="did not write"):
        make_llama(theirs, LLAMA_QUICK)
    assert (theirs / "model.safetensors").read_bytes() == b"their weights"
    ours = make_llama(tmp_path / "ours", LLAMA_QUICK)  # a folder it wrote: written again for a new config
    other = dict(LLAMA_QUICK, num_hidden_layers=LLAMA_QUICK["num_hidden_layers"] + 1)
    assert make_checkpoint(ours, "LlamaForCausalLM", LlamaConfig(**other)) == ours


def test_the_count_lru_peer_never_waits_for_requests_that_wait_for_their_own_load(tmp_path: Path) -> None:
    """serving.py's count-LRU: four clients asking for four models, one slot. A request that waits
    for the load lock holds no model, so the loader must not wait for it to go idle (it did,
    and the full benchmark hung)."""
    import threading
    import time

    import torch

    import memplan

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serving

    paths = serving.write_models(tmp_path / "models", (2, 3, 4, 6), 128, 1024)
    checkpoints = {n: memplan.with_computed_buffers(memplan.inspect(p)) for n, p in paths.items()}
    cache = serving.Cache("count-LRU", checkpoints, "64MiB", max_models=1, keep_alive_s=None)
    ids = torch.randint(0, 1024, (1, serving.TOKENS), generator=torch.Generator().manual_seed(0))
    failures: list[BaseException] = []

    def client(names: list[str]) -> None:
        try:
            for name in names:
                cache.forward(name, ids)
        except BaseException as exc:
            failures.append(exc)

    names = list(paths)
    clients = [threading.Thread(target=client, args=(names[i:] + names[:i],), daemon=True) for i in range(4)]
    for t in clients:
        t.start()
    deadline = time.monotonic() + 120
    for t in clients:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in clients), "the count-LRU cache deadlocked"
    assert not failures, failures
    cache.close()
