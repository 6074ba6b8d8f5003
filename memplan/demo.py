"""``memplan demo``: the whole flow on a small random Llama, in under a minute, on any machine.

It writes the checkpoint, shows ``probe``, plans it on four simulated machines where the right
answer differs (full, quantized, sharded, streamed), loads it for real on two of them, runs a
forward on each and checks that the outputs agree. The simulated machines are sized from the
model's own estimates, so the four answers hold whatever the overheads are set to.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memplan.errors import DoesNotFit
from memplan.gpu import probe, render_inventory
from memplan.planner import Checkpoint, Plan, Policy, inspect, plan
from memplan.units import format_size

__all__ = ["DEMO_LLAMA", "run_demo", "write_random_llama"]

GiB = 1 << 30
# ~60M parameters: big enough that the CUDA context does not dwarf it, small enough to write
# and load in seconds.
DEMO_LLAMA = dict(
    hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
    num_key_value_heads=4, vocab_size=8192, max_position_embeddings=1024,
)  # fmt: skip


def write_random_llama(path: Path, *, seed: int = 0, **config: Any) -> Path:
    """A random-init transformers Llama saved as safetensors (needs ``memplan[hf]``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.to(torch.bfloat16)  # type: ignore[arg-type]  # transformers types .to oddly
    model.save_pretrained(path, max_shard_size="100MB")
    return path


def _chooses(checkpoint: Checkpoint, spec: str, policy: Policy) -> str | None:
    try:
        return plan(checkpoint, probe(spec), policy=policy).chosen.candidate
    except DoesNotFit:
        return None


def _smallest_gpu(checkpoint: Checkpoint, policy: Policy, accept: set[str]) -> int:
    """The smallest GPU (to a MiB) on which the plan picks one of ``accept``, by bisection."""
    low, high = 1 << 20, 64 * GiB
    while high - low > 1 << 20:
        mid = (low + high) // 2
        if _chooses(checkpoint, f"cuda:0={mid}B,cpu=16GiB,disk=100GiB", policy) in accept:
            high = mid
        else:
            low = mid
    return high


def machines(checkpoint: Checkpoint) -> list[tuple[str, str, Policy]]:
    """Four simulated machines and the policy each is planned with."""
    plain, quant = Policy(), Policy(allow_quantization=True)
    streaming = Policy(order=("full", "sharded", "streamed-host", "streamed-disk"))
    full = _smallest_gpu(checkpoint, plain, {"full"})
    quantized = _smallest_gpu(checkpoint, quant, {"full", "int8", "nf4"})
    streamed = _smallest_gpu(checkpoint, streaming, set(streaming.order))  # anything at all fits
    small = (full + quantized) // 2
    mib = 1 << 20
    return [
        ("a large GPU", "cuda:0=24GiB,cpu=16GiB,disk=100GiB", plain),
        ("a small GPU", f"cuda:0={small // mib}MiB,cpu=16GiB,disk=100GiB", quant),
        ("two small GPUs", f"cuda:0={small // mib}MiB,cuda:1={small // mib}MiB,cpu=16GiB,disk=100GiB", plain),
        ("a tiny budget", f"cuda:0={streamed // mib + 1}MiB,cpu=16GiB,disk=100GiB", streaming),
    ]


def _load_and_run(checkpoint: Checkpoint, chosen: Plan, ids: Any, say: Callable[[str], None]) -> Any:
    import torch

    from memplan.loaders import handle_of, load

    model = load(checkpoint.path, plan=chosen, progress=False)
    with torch.no_grad():
        logits = model(ids).logits
    handle = handle_of(model)
    assert handle is not None  # load() hangs one on every model it returns
    report = handle.report
    say(report.explain())
    return logits


def run_demo(workdir: Path | None = None, say: Callable[[str], None] = print) -> int:
    """Run the demo; returns 0 when both loads ran and their outputs agree."""
    import torch

    with tempfile.TemporaryDirectory(prefix="memplan-demo-") as tmp:
        path = write_random_llama((workdir or Path(tmp)) / "demo-llama", **DEMO_LLAMA)
        checkpoint = inspect(path)
        size = format_size(checkpoint.nbytes)
        say(f"== a random {checkpoint.num_params / 1e6:.0f}M-parameter Llama, {size} in {path}\n")
        say("== memplan probe (this machine)\n" + render_inventory(probe()) + "\n")
        plans = {}
        for label, spec, policy in machines(checkpoint):
            chosen = plan(checkpoint, probe(spec), policy=policy)
            plans[label] = chosen
            say(f"== on {label} ({spec}): {chosen.chosen.candidate}")
            say(chosen.explain() + "\n")
        ids = (torch.arange(16) % DEMO_LLAMA["vocab_size"]).unsqueeze(0)
        outputs = []
        for label in ("a large GPU", "a tiny budget"):
            say(f"== loading for real as planned on {label}")
            outputs.append(_load_and_run(checkpoint, plans[label], ids, say))
        same = torch.equal(outputs[0], outputs[1])
        say("(simulated GPUs have no CUDA context: measured peaks lack the ~600 MiB the estimate counts)")
        say("\n== summary")
        for label, chosen in plans.items():
            say(f"  {label:15} -> {chosen.chosen.candidate}")
        say(f"  outputs of the full and the streamed load are identical: {same}")
        return 0 if same else 1
