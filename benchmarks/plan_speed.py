"""How fast memplan plans a Llama-shaped checkpoint, against accelerate's path, in the same run.

accelerate: ``init_empty_weights`` + ``AutoModelForCausalLM.from_config`` + ``infer_auto_device_map``.
memplan:    ``memplan.inspect`` + ``memplan.plan`` (headers only), and the ``memplan plan`` CLI.
Checkpoints are hollow (real headers, sparse data) so the 405B shape costs no disk.

    python benchmarks/plan_speed.py            # 8B, 70B, 405B
    python benchmarks/plan_speed.py --quick    # 8B only, one repetition (CI smoke run)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import memplan
from memplan.testing import LLAMA_SHAPES, write_llama_checkpoint

SPEC = "cuda:0=80GiB,cuda:1=80GiB,cpu=256GiB"
MAX_MEMORY = {0: "72GiB", 1: "72GiB", "cpu": "230GiB"}  # the same budgets, less memplan's 10% headroom


def best_of(repeats: int, work: Callable[[], object]) -> float:
    work()  # imports and first-call caches are not what is compared
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times) if repeats < 3 else statistics.median(times)


def memplan_plan(path: Path) -> object:
    inventory = memplan.probe(SPEC)
    return memplan.plan(memplan.inspect(path), inventory, memplan.Workload(context=4096))


def accelerate_plan(path: Path) -> object:
    import torch
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return infer_auto_device_map(
        model, max_memory=MAX_MEMORY, dtype=torch.bfloat16, no_split_module_classes=["LlamaDecoderLayer"]
    )


def cli_seconds(path: Path) -> tuple[float, bool]:
    code = (
        "import sys, time; t = time.perf_counter(); from memplan.cli import main; "
        f"main(['plan', {str(path)!r}, '--simulate', {SPEC!r}]); "
        "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return time.perf_counter() - start, "torch imported: False" in out.stderr


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="8B only, one repetition")
    args = parser.parse_args()
    sizes, repeats = (["8b"], 1) if args.quick else (["8b", "70b", "405b"], 5)
    header = f"{'shape':6} {'memplan ms':>11} {'accelerate ms':>14} {'speed-up':>9} {'CLI s':>6}"
    print(header + "  torch-free CLI")
    with tempfile.TemporaryDirectory() as tmp:
        for name in sizes:
            path = write_llama_checkpoint(Path(tmp) / name, LLAMA_SHAPES[name])
            ours = best_of(repeats, partial(memplan_plan, path))
            theirs = best_of(max(1, repeats // 2), partial(accelerate_plan, path))
            cli, torch_free = cli_seconds(path)
            row = f"{name:6} {ours * 1e3:11.1f} {theirs * 1e3:14.1f} {theirs / ours:8.1f}x {cli:6.2f}"
            print(f"{row}  {torch_free}")


if __name__ == "__main__":
    main()
