"""memplan.load against transformers / accelerate on the same ~1B random-init Llama, in the same run.

Every measurement runs in a fresh interpreter so its peak RSS is its own.

- int8 / nf4 (warm cache): load seconds and peak RSS above the imports, against
  ``from_pretrained(quantization_config=BitsAndBytesConfig(...), device_map="cpu")``.
- full, cold cache: time to first output (load + one forward), against ``from_pretrained``; and
  memplan's read rate against the disk's cold bandwidth (O_DIRECT reads of the same files).
- streamed under a host budget: peak RSS and a cold forward, against accelerate's disk offload
  (``device_map="auto"``, ``max_memory={"cpu": budget}``, ``offload_folder``).

    python benchmarks/load_speed.py            # ~1.1B model (writes ~2.2 GB once, under /tmp)
    python benchmarks/load_speed.py --quick    # a tiny model, smoke run for CI
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    LLAMA_1B,
    LLAMA_QUICK,
    current_rss,
    drop_page_cache,
    make_llama,
    mib,
    peak_rss,
    run_worker,
)

TOKENS = 8


def _ids() -> Any:
    import torch

    return (torch.arange(TOKENS) * 7 % 1000).unsqueeze(0)


def _forward(model: Any) -> float:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        model(_ids())
    return time.perf_counter() - start


def _footprint(model: Any) -> int:
    from memplan.loaders._quantize import quantized_nbytes

    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(quantized_nbytes(t) for t in tensors.values())


def _bnb_config(method: str) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )  # fmt: skip


def _memplan_plan(path: Path, order: tuple[str, ...], spec: str, context: int = 512, **policy: Any) -> Any:
    import memplan

    inventory = memplan.probe(spec)
    return memplan.plan(
        memplan.inspect(path),
        inventory,
        memplan.Workload(context=context),
        memplan.Policy(order=order, **policy),
    )


def worker(case: str, path: Path, arg: str) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    # Imports are not what is measured: both sides start with the model code (and bnb) loaded.
    if case.endswith("quant"):
        import bitsandbytes  # noqa: F401
    import torch
    from transformers import LlamaForCausalLM  # noqa: F401

    import memplan

    base = current_rss()
    if case in ("tf-full", "mp-full", "tf-offload", "mp-stream"):
        drop_page_cache(path)
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if case == "tf-quant":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=_bnb_config(arg), device_map="cpu"
        )
    elif case == "mp-quant":
        chosen = _memplan_plan(path, (arg,), "cpu=64GiB", allow_quantization=True)
        model = memplan.load(path, plan=chosen, progress=False)
    elif case == "tf-full":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    elif case == "mp-full":
        model = memplan.load(path, plan=_memplan_plan(path, ("full",), "cpu=64GiB"), progress=False)
    elif case == "tf-offload":
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as folder:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": arg}, offload_folder=folder
            )
            loaded = time.perf_counter() - start
            drop_page_cache(path)
            extra["forward_s"] = _forward(model)
            return {"load_s": loaded, "peak": peak_rss(), "base": base, **extra}
    elif case == "mp-stream":
        from memplan.planner import Overheads

        # The host budget is the whole process's: what it already holds is the runtime overhead.
        overheads = Overheads(host_runtime=base)
        chosen = _memplan_plan(
            path, ("streamed-disk",), f"cpu={arg}", TOKENS, headroom=0.0, overheads=overheads
        )
        model = memplan.load(path, plan=chosen, progress=False)
        extra["strategy"] = memplan.planner.describe(chosen.strategy)
        loaded = time.perf_counter() - start
        drop_page_cache(path)
        extra["forward_s"] = _forward(model)
        streamer = model.memplan_streamer  # None when every layer fit resident
        extra["hidden"] = streamer.stats.hidden_fraction if streamer else 1.0
        return {"load_s": loaded, "peak": peak_rss(), "base": base, **extra}
    else:
        raise SystemExit(f"unknown case {case}")
    loaded = time.perf_counter() - start
    first_output = loaded + _forward(model) if case.endswith("full") else loaded
    return {"load_s": loaded, "first_output_s": first_output, "peak": peak_rss(), "base": base,
            "footprint": _footprint(model)}  # fmt: skip


def cold_bandwidth(path: Path) -> float:
    """Bytes per second reading the shards with O_DIRECT (no page cache), 16 MiB at a time."""
    chunk = 16 << 20
    buffer = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    total, start = 0, time.perf_counter()
    for file in sorted(path.glob("*.safetensors")):
        fd = os.open(file, os.O_RDONLY | os.O_DIRECT)
        try:
            while got := os.readv(fd, [buffer]):
                total += got
        finally:
            os.close(fd)
    return total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, smoke run")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "memplan-bench-1b")
    parser.add_argument("--budget", default="600MiB", help="host budget for the streamed comparison")
    parser.add_argument("--only", choices=("quantized", "full", "streamed"), help="run one comparison")
    parser.add_argument("--worker", nargs=3, metavar=("CASE", "MODEL", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        case, model, arg = args.worker
        print(json.dumps(worker(case, Path(model), arg)))
        return
    shape = LLAMA_QUICK if args.quick else LLAMA_1B
    path = make_llama(args.model_dir.with_name(args.model_dir.name + ("-quick" if args.quick else "")), shape)
    me = Path(__file__)
    print(f"model: {path} ({sum(f.stat().st_size for f in path.glob('*.safetensors')) / 2**30:.2f} GiB)")
    if args.only in (None, "quantized"):
        quantized(me, path)
    if args.only in (None, "full"):
        full_cold(me, path)
    if args.only in (None, "streamed"):
        streamed(me, path, "420MiB" if args.quick else args.budget)


def quantized(me: Path, path: Path) -> None:
    print(
        "\nquantized, warm cache        load s   peak above imports   footprint   goal: peak <= 1.15 x fp + 256 MiB"
    )
    for method in ("int8", "nf4"):
        theirs = run_worker(me, "tf-quant", str(path), method)
        ours = run_worker(me, "mp-quant", str(path), method)
        for who, r in (("transformers", theirs), ("memplan", ours)):
            above = r["peak"] - r["base"]
            ok = above <= 1.15 * r["footprint"] + (256 << 20)
            print(
                f"  {method:5} {who:14} {r['load_s']:8.2f}   {mib(above):>18}   {mib(r['footprint']):>9}   {ok}"
            )
        print(
            f"  {method:5} time ratio memplan/transformers: {ours['load_s'] / theirs['load_s']:.2f} (goal <= 0.33)"
        )


def full_cold(me: Path, path: Path) -> None:
    bandwidth = cold_bandwidth(path)
    theirs = run_worker(me, "tf-full", str(path), "-")
    ours = run_worker(me, "mp-full", str(path), "-")
    nbytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    rate = nbytes / ours["load_s"]
    print("\nfull, cold cache             load s   first output s   peak above imports")
    for who, r in (("transformers", theirs), ("memplan", ours)):
        print(
            f"  {who:26} {r['load_s']:8.2f}   {r['first_output_s']:14.2f}   {mib(r['peak'] - r['base']):>18}"
        )
    print(
        f"  first-output ratio memplan/transformers: {ours['first_output_s'] / theirs['first_output_s']:.2f} (goal <= 0.8)"
    )
    print(f"  disk cold bandwidth (O_DIRECT) {mib(bandwidth)}/s; memplan load read at {mib(rate)}/s"
          f" = {rate / bandwidth:.0%} of it (goal >= 85%)")  # fmt: skip


def streamed(me: Path, path: Path, budget: str) -> None:
    import memplan

    limit = memplan.parse_size(budget)
    theirs = run_worker(me, "tf-offload", str(path), budget)
    ours = run_worker(me, "mp-stream", str(path), budget)
    print(f"\nstreamed under a {budget} host budget   peak RSS   within budget+10%   cold forward s")
    for who, r in (("accelerate disk offload", theirs), ("memplan streamed-disk", ours)):
        ok = r["peak"] <= 1.1 * limit
        print(f"  {who:34} {mib(r['peak']):>8}   {ok!s:>17}   {r['forward_s']:14.2f}")
    print(f"  memplan plan: {ours['strategy']}; I/O hidden behind compute: {ours['hidden']:.0%}")
    print(
        f"  cold forward ratio memplan/accelerate: {ours['forward_s'] / theirs['forward_s']:.2f} (goal <= 0.8)"
    )


if __name__ == "__main__":
    main()
