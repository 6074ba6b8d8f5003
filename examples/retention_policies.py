"""Three models under one GPU budget, each with its own retention policy; prints what moved and why.

Runs anywhere: the GPU is simulated (MEMPLAN_SIMULATE syntax), so on a CPU-only machine the
tensors stay in host memory but are charged to the 6 MiB "cuda:0" budget exactly as on a GPU.

    python examples/retention_policies.py
"""

from __future__ import annotations

import tempfile
import time

import torch

from memplan import Allocator, ResidencyManager, RetentionPolicy, format_size, get_tier
from memplan.gpu import parse_simulation


def model(width: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 16)
    ).eval()


def where(rm: ResidencyManager) -> str:
    return ", ".join(f"{name} on {rm.tier_of(name).name}" for name in rm.names())


def run(rm: ResidencyManager, name: str, x: torch.Tensor) -> None:
    with rm.use(name) as m, torch.no_grad():
        m(x[:, : m[0].in_features])
    print(f"used {name:16} now: {where(rm)}")


def main() -> None:
    allocator = Allocator(parse_simulation("cuda:0=6MiB,cpu=1GiB"))
    spill = tempfile.TemporaryDirectory(prefix="memplan-spill-")
    tiers = [get_tier("gpu", allocator=allocator), get_tier("host", "6MiB"), get_tier("disk", spill.name)]
    models = {"chat": model(768, 0), "summarizer": model(640, 1), "embedder": model(896, 2)}
    policies = {
        # The interactive model: pinned to the GPU, never demoted by pressure or idleness.
        "chat": RetentionPolicy(priority=4.0, pinned_tier="gpu"),
        # Used in bursts: let it go after a short idle spell.
        "summarizer": RetentionPolicy(max_idle_s=0.2, max_pressure="medium"),
        # Nightly batch job: the first to go under pressure; its spill survives restarts.
        "embedder": RetentionPolicy(max_pressure="none", persistent=True),
    }
    x = torch.randn(2, 1024)
    with ResidencyManager(tiers, interval_s=0.05) as rm:
        for name, m in models.items():
            info = rm.register(name, m, policy=policies[name])
            print(f"registered {name:10} {format_size(info.nbytes):>9} -> {info.tier}")
        for name in ["chat", "summarizer", "embedder"]:
            run(rm, name, x)
        for ratio in (0.85, 0.97):
            r = rm.apply_pressure(ratio, tiers[0].device)
            print(f"{r.level} pressure ({ratio:.0%} of cuda:0): {'; '.join(r.actions)}")
            freed = format_size(r.freed_bytes)
            print(f"    demoted {list(r.demoted) or 'nothing'}, freed {freed}; now: {where(rm)}")
        run(rm, "summarizer", x)
        time.sleep(0.4)  # the cleanup thread demotes the idle summarizer
        print(f"after 0.4 s idle     now: {where(rm)}")
        print("\nwhat moved and why:")
        for move in rm.moves:
            size = format_size(move.nbytes)
            print(f"  {move.entry:10} {move.source:>4} -> {move.target:4} {size:>9}  ({move.reason})")
        stats = rm.stats()
        print(f"\nuses: {stats.hits} served in place, {stats.misses} moved up; "
              f"{format_size(stats.bytes_moved)} moved; budget used on cuda:0: "
              f"{format_size(allocator.usage(tiers[0].device).used)}")  # fmt: skip
    spill.cleanup()


if __name__ == "__main__":
    main()
