"""memplan.load against transformers / accelerate on the same ~1B random-init Llama, in the same run.

Every measurement runs in a fresh interpreter so its peak RSS is its own. Each comparison runs
``--runs`` times (default 3) with the peers interleaved, and prints medians: this machine's disk
varies up to 2x from run to run.

- read rate, cold cache: memplan's reader (read-ahead window, every tensor into host memory)
  against the same files read with O_DIRECT 16 MiB requests, and against runai-model-streamer and
  fastsafetensors (CPU mode) where they are installed (peers only: memplan does not use them).

- int8 / nf4 (checkpoint in the page cache): load seconds and peak RSS above the imports, against
  ``from_pretrained(quantization_config=BitsAndBytesConfig(...), device_map="cpu")``; memplan's
  first load (empty quantized-weights cache) and its repeat load (the cache filled, read cold).
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
import shutil
import statistics
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
    if case in ("tf-full", "mp-full", "tf-offload", "mp-stream") or case.endswith("read"):
        drop_page_cache(path)
    if case.endswith("read"):
        return {"read_s": _read_all(case, path)}
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if case == "tf-quant":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=_bnb_config(arg), device_map="cpu"
        )
    elif case == "mp-quant":
        method, _, spill = arg.partition(":")
        os.environ["MEMPLAN_SPILL_DIR"] = spill  # the quantized-weights cache: empty, or filled
        drop_page_cache(Path(spill), "quantized/*/*")  # a repeat load reads it cold
        chosen = _memplan_plan(path, (method,), "cpu=64GiB", allow_quantization=True)
        model = memplan.load(path, plan=chosen, progress=False)
        extra["bytes_read"] = model.memplan.report.bytes_read
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
        streamer = model.memplan.streamer  # None when every layer fit resident
        extra["hidden"] = streamer.stats.hidden_fraction if streamer else 1.0
        extra["stream_rate"] = streamer.stats.bytes_moved / streamer.stats.fetch_seconds if streamer else 0.0
        return {"load_s": loaded, "peak": peak_rss(), "base": base, **extra}
    else:
        raise SystemExit(f"unknown case {case}")
    loaded = time.perf_counter() - start
    first_output = loaded + _forward(model) if case.endswith("full") else loaded
    if case == "mp-full":
        extra["bytes_read"] = model.memplan.report.bytes_read
    return {"load_s": loaded, "first_output_s": first_output, "peak": peak_rss(), "base": base,
            "footprint": _footprint(model), **extra}  # fmt: skip


def _read_all(case: str, path: Path) -> float:
    """Seconds to read every tensor of ``path`` into host memory, cold, by ``case``'s reader."""
    files = sorted(str(f) for f in path.glob("*.safetensors"))
    start = time.perf_counter()
    if case == "mp-read":
        import memplan
        from memplan.loaders._reader import TensorReader

        checkpoint = memplan.inspect(path)
        names = sorted(
            checkpoint.tensors, key=lambda n: (str(checkpoint.tensors[n].file), checkpoint.tensors[n].offset)
        )
        with TensorReader(checkpoint) as reader:
            reader.read_ahead(names)
            for name in names:
                reader.read(name)
    elif case == "runai-read":
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as streamer:
            streamer.stream_files(files)
            for _, tensor in streamer.get_tensors():
                tensor.clone()  # the streamer reuses its buffer: keep each tensor, as a load does
    elif case == "fst-read":
        from fastsafetensors import fastsafe_open

        with fastsafe_open(filenames=files, nogds=True, device="cpu") as opened:
            for name in opened.keys():  # noqa: SIM118 - fastsafetensors handles are not iterable
                opened.get_tensor(name).clone()
    return time.perf_counter() - start


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def _interleaved(
    me: Path, cases: list[tuple[str, str]], path: Path, runs: int
) -> dict[str, list[dict[str, Any]]]:
    """Each (case, arg) ``runs`` times, one after the other in turn, so a slow spell of the disk
    hits every peer alike."""
    found: dict[str, list[dict[str, Any]]] = {f"{c}:{a}": [] for c, a in cases}
    for _ in range(runs):
        for case, arg in cases:
            found[f"{case}:{arg}"].append(run_worker(me, case, str(path), arg))
    return found


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
    parser.add_argument("--runs", type=int, default=3, help="runs of each case, peers interleaved (medians)")
    parser.add_argument(
        "--only", choices=("read", "quantized", "full", "streamed"), help="run one comparison"
    )
    parser.add_argument("--worker", nargs=3, metavar=("CASE", "MODEL", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        case, model, arg = args.worker
        print(json.dumps(worker(case, Path(model), arg)))
        return
    shape = LLAMA_QUICK if args.quick else LLAMA_1B
    runs = 1 if args.quick else args.runs
    path = make_llama(args.model_dir.with_name(args.model_dir.name + ("-quick" if args.quick else "")), shape)
    me = Path(__file__)
    print(f"model: {path} ({sum(f.stat().st_size for f in path.glob('*.safetensors')) / 2**30:.2f} GiB); "
          f"medians of {runs} run(s), peers interleaved")  # fmt: skip
    if args.only in (None, "read"):
        read_rate(me, path, runs)
    if args.only in (None, "quantized"):
        quantized(me, path, runs)
    if args.only in (None, "full"):
        full_cold(me, path, runs)
    if args.only in (None, "streamed"):
        streamed(me, path, "480MiB" if args.quick else args.budget, runs)


def _nbytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def read_rate(me: Path, path: Path, runs: int) -> None:
    peers = [("mp-read", "-")] + [(c, "-") for c, m in (("runai-read", "runai_model_streamer"),
                                                        ("fst-read", "fastsafetensors")) if _installed(m)]  # fmt: skip
    direct: list[float] = []
    found: dict[str, list[dict[str, Any]]] = {f"{c}:-": [] for c, _ in peers}
    for _ in range(runs):
        drop_page_cache(path)
        direct.append(cold_bandwidth(path))
        for case, arg in peers:
            found[f"{case}:{arg}"].append(run_worker(me, case, str(path), arg))
    bandwidth = statistics.median(direct)
    print(
        f"\nread rate, cold cache (every tensor into host memory)   MiB/s   of O_DIRECT 16 MiB ({mib(bandwidth)}/s)"
    )
    names = {
        "mp-read": "memplan reader",
        "runai-read": "runai-model-streamer",
        "fst-read": "fastsafetensors (CPU)",
    }
    for case, _ in peers:
        rate = _nbytes(path) / _median(found[f"{case}:-"], "read_s")
        print(f"  {names[case]:52} {mib(rate):>8}   {rate / bandwidth:.0%}")


def quantized(me: Path, path: Path, runs: int) -> None:
    print(
        "\nquantized, warm cache           load s   peak above imports   footprint   goal: peak <= 1.15 x fp + 256 MiB"
    )
    for method in ("int8", "nf4"):
        spill = Path(tempfile.mkdtemp(prefix="memplan-qcache-"))
        first, repeat, theirs = [], [], []
        for _ in range(runs):
            shutil.rmtree(spill / "quantized", ignore_errors=True)
            theirs.append(run_worker(me, "tf-quant", str(path), method))
            first.append(run_worker(me, "mp-quant", str(path), f"{method}:{spill}"))
            repeat.append(run_worker(me, "mp-quant", str(path), f"{method}:{spill}"))
        shutil.rmtree(spill, ignore_errors=True)
        for who, r in (("transformers", theirs), ("memplan first", first), ("memplan repeat", repeat)):
            above = _median(r, "peak") - _median(r, "base")
            ok = above <= 1.15 * _median(r, "footprint") + (256 << 20)
            print(f"  {method:5} {who:16} {_median(r, 'load_s'):8.2f}   {mib(above):>18}   "
                  f"{mib(_median(r, 'footprint')):>9}   {ok}")  # fmt: skip
        tf = _median(theirs, "load_s")
        print(f"  {method:5} memplan/transformers: first {_median(first, 'load_s') / tf:.2f}x (goal <= 1.0), "
              f"repeat {_median(repeat, 'load_s') / tf:.2f}x (goal <= 0.25); repeat read "
              f"{mib(_median(repeat, 'bytes_read'))} of {mib(_nbytes(path))}")  # fmt: skip


def full_cold(me: Path, path: Path, runs: int) -> None:
    bandwidths = []
    for _ in range(runs):
        drop_page_cache(path)
        bandwidths.append(cold_bandwidth(path))
    found = _interleaved(me, [("tf-full", "-"), ("mp-full", "-")], path, runs)
    theirs, ours = found["tf-full:-"], found["mp-full:-"]
    bandwidth = statistics.median(bandwidths)
    rate = _median(ours, "bytes_read") / _median(ours, "load_s")
    print("\nfull, cold cache             load s   first output s   peak above imports")
    for who, r in (("transformers", theirs), ("memplan", ours)):
        print(f"  {who:26} {_median(r, 'load_s'):8.2f}   {_median(r, 'first_output_s'):14.2f}   "
              f"{mib(_median(r, 'peak') - _median(r, 'base')):>18}")  # fmt: skip
    ratio = _median(ours, "first_output_s") / _median(theirs, "first_output_s")
    print(f"  first-output ratio memplan/transformers: {ratio:.2f}x (goal <= 0.8)")
    print(f"  disk cold bandwidth (O_DIRECT 16 MiB) {mib(bandwidth)}/s; memplan load (construction included) at "
          f"{mib(rate)}/s = {rate / bandwidth:.0%} of it (goal >= 85%)")  # fmt: skip


def streamed(me: Path, path: Path, budget: str, runs: int) -> None:
    import memplan

    limit = memplan.parse_size(budget)
    found = _interleaved(me, [("tf-offload", budget), ("mp-stream", budget)], path, runs)
    theirs, ours = found[f"tf-offload:{budget}"], found[f"mp-stream:{budget}"]
    print(f"\nstreamed under a {budget} host budget   peak RSS   within budget+10%   cold forward s")
    for who, r in (("accelerate disk offload", theirs), ("memplan streamed-disk", ours)):
        peak = _median(r, "peak")
        print(f"  {who:34} {mib(peak):>8}   {peak <= 1.1 * limit!s:>17}   {_median(r, 'forward_s'):14.2f}")
    print(f"  memplan plan: {ours[0]['strategy']}; streamed at {mib(_median(ours, 'stream_rate'))}/s, "
          f"I/O hidden behind compute: {_median(ours, 'hidden'):.0%} (goal >= 70%)")  # fmt: skip
    ratio = _median(ours, "forward_s") / _median(theirs, "forward_s")
    print(f"  cold forward ratio memplan/accelerate: {ratio:.2f}x (goal <= 0.8)")


if __name__ == "__main__":
    main()
