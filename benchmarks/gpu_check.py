"""Every CUDA path for real, each against its reference, in one run: the first thing to run on a GPU.

- NVML's view of each GPU against ``torch.cuda.mem_get_info``;
- full, int8, nf4, sharded (two GPUs where present), streamed-host and streamed-disk loads onto
  CUDA (pinned staging, the side stream), each output against transformers' own on the GPU;
- a real ``torch.OutOfMemoryError`` during a load, mapped to ``DeviceOutOfMemory`` and fallen
  back from;
- the gpu residency tier (bit-exact round trip) and host->GPU copy bandwidth, pageable and pinned.

Prints one line a check with the figure beside its reference, and exits 1 if any check failed.
Without CUDA it says so and exits 0.

    python benchmarks/gpu_check.py           # a ~100M Llama
    python benchmarks/gpu_check.py --quick   # a tiny one
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import LLAMA_100M, LLAMA_QUICK, make_llama

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, run: Callable[[], tuple[bool, str]]) -> None:
    try:
        ok, detail = run()
    except Exception as exc:  # a crash is a failed check, reported with the rest
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def ids() -> Any:
    import torch

    return (torch.arange(16) * 7 % 1000).unsqueeze(0).cuda()


def logits(model: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(ids()).logits.float().cpu()


def reference(path: Path, **kwargs: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda:0", **kwargs)
    out = logits(model.eval())
    del model
    torch.cuda.empty_cache()
    return out


def nvml_matches_torch() -> tuple[bool, str]:
    import torch

    import memplan

    inventory, lines, ok = memplan.probe(), [], True
    for index in range(torch.cuda.device_count()):
        _, total = torch.cuda.mem_get_info(index)
        seen = inventory[memplan.Device("cuda", index)]
        ratio = seen.total / total
        ok &= abs(ratio - 1) < 0.01
        lines.append(
            f"cuda:{index} NVML {seen.total / 2**30:.2f} GiB / torch {total / 2**30:.2f} GiB = {ratio:.4f}x"
        )
    return ok, "; ".join(lines)


def load_matches(path: Path, candidate: str, want: Any, **policy: Any) -> tuple[bool, str]:
    import torch

    import memplan

    chosen = memplan.plan(
        memplan.inspect(path), memplan.probe(), memplan.Workload(context=64),
        memplan.Policy(order=(candidate,), **policy),
    )  # fmt: skip
    model = memplan.load(path, plan=chosen, progress=False)
    got = logits(model)
    same = torch.equal(got, want)
    report = model.memplan.report
    extra = ""
    streamer = model.memplan.streamer
    if streamer is not None:
        stats = streamer.stats
        extra = f", {stats.bytes_moved / max(stats.fetch_seconds, 1e-9) / 2**30:.2f} GiB/s, {stats.hidden_fraction:.0%} of I/O hidden"
        same &= streamer._cuda and bool(streamer._stream is not None)
    del model
    torch.cuda.empty_cache()
    diff = "" if same else f", max |diff| {(got - want).abs().max().item():.3g}"
    return same, f"{memplan.planner.describe(report.strategy)} in {report.seconds:.2f} s{extra}{diff}"


def out_of_memory_falls_back(path: Path, want: Any) -> tuple[bool, str]:
    import torch

    import memplan

    chosen = memplan.plan(
        memplan.inspect(path), memplan.probe(), memplan.Workload(context=64),
        memplan.Policy(order=("full", "streamed-host")),
    )  # fmt: skip
    free, _ = torch.cuda.mem_get_info(0)
    hog = torch.empty(free - (64 << 20), dtype=torch.uint8, device="cuda:0")  # leave too little
    try:
        model = memplan.load(path, plan=chosen, progress=False)
        fallbacks = model.memplan.report.fallbacks
        same = torch.equal(logits(model), want)
        del model
    finally:
        del hog
        torch.cuda.empty_cache()
    return bool(fallbacks) and same, f"fallbacks {[str(f) for f in fallbacks]}, output equal: {same}"


def gpu_tier_and_bandwidth() -> tuple[bool, str]:
    import torch

    from memplan.residency import get_tier

    tier = get_tier("gpu")
    x = torch.randn(64 << 20, dtype=torch.float32)
    tier.put("x", x)
    same = torch.equal(tier.get("x").cpu(), x)
    rates = []
    for pinned in (False, True):
        src = x.pin_memory() if pinned else x
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            src.to("cuda:0", non_blocking=pinned)
        torch.cuda.synchronize()
        rates.append(5 * x.nbytes / (time.perf_counter() - start) / 2**30)
    tier.drop("x")
    return (
        same,
        f"round trip bit-exact: {same}; host->GPU {rates[0]:.1f} GiB/s pageable, {rates[1]:.1f} GiB/s pinned ({rates[1] / rates[0]:.2f}x)",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to check (run this where a GPU is)")
        return 0
    path = make_llama(
        Path(tempfile.gettempdir()) / "memplan-gpu-check", LLAMA_QUICK if args.quick else LLAMA_100M
    )
    want = reference(path)
    check("NVML against torch.cuda.mem_get_info", nvml_matches_torch)
    check("full load", lambda: load_matches(path, "full", want))
    for method in ("int8", "nf4"):
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_8bit=True) if method == "int8" else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
        bnb_want = reference(path, quantization_config=config)
        check(
            f"{method} load", lambda m=method, w=bnb_want: load_matches(path, m, w, allow_quantization=True)
        )
    if torch.cuda.device_count() >= 2:
        check("sharded load over two GPUs", lambda: load_matches(path, "sharded", want))
    for source in ("host", "disk"):
        check(f"streamed-{source} load", lambda s=source: load_matches(path, f"streamed-{s}", want))
    check("real OOM mapped and fallen back from", lambda: out_of_memory_falls_back(path, want))
    check("gpu tier and copy bandwidth", gpu_tier_and_bandwidth)
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(
        f"{len(RESULTS) - len(failed)} of {len(RESULTS)} checks passed"
        + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
