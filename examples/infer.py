"""An inference script whose loading is one memplan line.

    python examples/infer.py MODEL_DIR --prompt-tokens 32
    python examples/infer.py MODEL_DIR --simulate "cuda:0=2GiB,cpu=16GiB"   # try another machine

Without a GPU the model runs on the CPU; with --simulate, memplan plans and loads as it would on
the machine described (tensors stay on the CPU, charged to the simulated budgets).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import memplan


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="a safetensors model directory (e.g. from save_pretrained)")
    parser.add_argument("--simulate", help="simulated devices, e.g. 'cuda:0=24GiB,cpu=64GiB'")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    if args.simulate:
        os.environ["MEMPLAN_SIMULATE"] = args.simulate

    model = memplan.load(args.model, progress=False)  # <- the one line: plan, load, fall back on OOM

    print(model.memplan.report.explain())
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(args.new_tokens):  # greedy decoding, no KV cache: the simplest loop
            next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    print(f"generated {args.new_tokens} tokens in {time.perf_counter() - start:.2f} s: "
          f"{ids[0, -args.new_tokens:].tolist()}")  # fmt: skip


if __name__ == "__main__":
    main()
