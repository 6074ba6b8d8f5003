"""Every memplan model survives every move (issue "Serving many models", item 2, the bf16 half;
tests/residency/test_quantized_models.py is the quantized half): a model loaded under each
strategy, registered, demoted to each tier and used again gives the logits it gave before it
moved, and every budget is back where it started once the manager closes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import memplan
from memplan import Allocator, Device, ResidencyManager, Streamed
from tests.loaders.test_load import CUDA0, logits, plan_only, tight_spec
from tests.residency.test_quantized_models import TIERS, host_and

CPU = Device("cpu")


def plan_for(path: Path, kind: str) -> memplan.Plan:
    ckpt = memplan.inspect(path)
    if kind == "full":
        return plan_only(path, "full", "cuda:0=64MiB,cpu=8GiB")
    if kind == "offloaded":
        return plan_only(path, "offloaded", f"cuda:0={ckpt.nbytes * 0.6:.0f},cpu=8GiB")
    if kind == "sharded":
        each = ckpt.nbytes  # less headroom, neither device holds the model alone
        return plan_only(path, "sharded", f"cuda:0={each},cuda:1={each},cpu=8GiB")
    source = kind.removeprefix("streamed-")
    strategy = Streamed(CUDA0, source, resident_layers=1, prefetch_depth=1, dtype="BF16")  # type: ignore[arg-type]
    return plan_only(path, kind, tight_spec(path, strategy), prefetch_depth=1)


# Offloaded and streamed layers hold placeholders between forwards; their weights are the
# streamer's (host copies: managed with the rest; streamed from disk: left in the files).
KINDS = ["full", "sharded", "offloaded", "streamed-host", "streamed-disk"]


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_model_demoted_and_used_gives_the_logits_it_gave_before(
    tiny_llama: Path, tmp_path: Path, request: pytest.FixtureRequest, kind: str, tier: str
) -> None:
    chosen = plan_for(tiny_llama, kind)
    allocator = Allocator(chosen.inventory)
    start = {d: allocator.usage(d).used for d in allocator.devices()}
    model = memplan.load(tiny_llama, plan=chosen, allocator=allocator, progress=False)
    want = logits(model)
    with ResidencyManager(host_and(tier, tmp_path, request)) as rm:
        rm.register("llama", model)
        if tier != "host":
            rm.demote("llama", tier)
        with rm.use("llama") as leased:
            assert torch.equal(logits(leased), want)
            assert torch.equal(logits(leased), want)  # a second forward too (streamers refill)
        assert rm.verify() == []
    del model, leased
    import gc

    gc.collect()
    assert {d: allocator.usage(d).used for d in allocator.devices()} == start
