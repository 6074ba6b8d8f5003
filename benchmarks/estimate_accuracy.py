"""How close memplan's estimated peak is to the peak measured loading and running the model.

For random-init Llama models of ~0.1B and ~1.1B parameters and for full, int8 and nf4 on the
host: plan, then in a fresh process load with memplan and run one forward of ``--context``
tokens, and compare the estimate with the process's peak RSS. Two rows per case:

- whole process: the estimate (with the default host runtime overhead) vs peak RSS;
- model only: the estimate less its fixed overhead vs peak RSS less the RSS after imports.

    python benchmarks/estimate_accuracy.py            # 0.1B and 1.1B
    python benchmarks/estimate_accuracy.py --quick    # a tiny model (CI smoke run)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import LLAMA_1B, LLAMA_100M, LLAMA_QUICK, current_rss, make_llama, mib, peak_rss, run_worker

STRATEGIES = ("full", "int8", "nf4")


def worker(path: Path, strategy: str, context: int) -> dict[str, Any]:
    import bitsandbytes  # noqa: F401  (imports are the runtime, measured apart)
    import torch
    from transformers import LlamaForCausalLM  # noqa: F401

    import memplan

    base = current_rss()
    workload = memplan.Workload(context=context)
    policy = memplan.Policy(order=(strategy,), allow_quantization=True)
    chosen = memplan.plan(memplan.inspect(path), memplan.probe("cpu=64GiB"), workload, policy)
    estimate = chosen.estimate.on(memplan.Device("cpu"))  # type: ignore[union-attr]
    model = memplan.load(path, plan=chosen, progress=False)
    ids = (torch.arange(context) % 1000).unsqueeze(0)
    with torch.no_grad():
        model(ids, use_cache=True)
    return {"estimate": estimate.peak, "overhead": estimate.overhead, "peak": peak_rss(), "base": base}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "STRATEGY", "CONTEXT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, strategy, context = args.worker
        print(json.dumps(worker(Path(model), strategy, int(context))))
        return
    root = Path(tempfile.gettempdir())
    models = {"tiny": LLAMA_QUICK} if args.quick else {"0.1B": LLAMA_100M, "1.1B": LLAMA_1B}
    names = {"tiny": "memplan-bench-1b-quick", "0.1B": "memplan-bench-100m", "1.1B": "memplan-bench-1b"}
    print(f"context {args.context} tokens; goal: within +-5%")
    print(f"{'model':5} {'strategy':8} {'what':14} {'estimated':>10} {'measured':>10} {'error':>7}")
    for label, shape in models.items():
        path = make_llama(root / names[label], shape)
        for strategy in STRATEGIES:
            r = run_worker(Path(__file__), str(path), strategy, str(args.context))
            rows = (
                ("whole process", r["estimate"], r["peak"]),
                ("model only", r["estimate"] - r["overhead"], r["peak"] - r["base"]),
            )
            for what, est, measured in rows:
                error = (est - measured) / measured
                print(f"{label:5} {strategy:8} {what:14} {mib(est):>10} {mib(measured):>10} {error:+7.1%}")


if __name__ == "__main__":
    main()
