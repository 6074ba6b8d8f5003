"""A model whose layers are streamed or offloaded, in a residency manager: the manager takes charge
of every weight the model holds in memory, its own and those its streamer keeps for the layers that
hold placeholders between forwards; weights streamed from the checkpoint's files stay there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import memplan
from memplan import Allocator, Device, ResidencyManager, get_tier
from memplan.residency._groups import WeightKeeper
from tests.loaders.test_load import logits
from tests.residency.test_model_round_trips import plan_for

CPU = Device("cpu")


def _load(path: Path, kind: str) -> tuple[torch.nn.Module, Allocator]:
    chosen = plan_for(path, kind)
    allocator = Allocator(chosen.inventory)
    return memplan.load(path, plan=chosen, allocator=allocator, progress=False), allocator


def _host_and_zstd() -> list[Any]:
    return [get_tier("host", "1GiB"), get_tier("host", "1GiB", compression="zstd", name="z")]


def _in_memory(model: torch.nn.Module) -> int:
    """Bytes of the weights ``model`` holds in memory: its own tensors and its streamer's."""
    held = {id(t): t for t in [*model.parameters(), *model.buffers()] if not t.is_meta}
    kept = model.memplan.streamer.kept_weights()
    held |= {id(w): w for _, w in kept.values() if w is not None}
    return sum(t.numel() * t.element_size() for t in held.values())


@pytest.mark.parametrize("kind", ["offloaded", "streamed-host"])
def test_registering_takes_charge_of_the_weights_the_streamer_keeps_in_host_memory(
    tiny_llama: Path, tmp_path: Path, kind: str
) -> None:
    model, allocator = _load(tiny_llama, kind)
    assert isinstance(model.memplan.streamer, WeightKeeper)
    want, nbytes = logits(model), _in_memory(model)
    host_before = allocator.usage(CPU).used
    assert host_before > 0  # the streamer's host copies, charged by the load
    host, disk = get_tier("host", "1GiB"), get_tier("disk", tmp_path / "spill")
    with ResidencyManager([host, disk], dedup=False) as rm:
        assert rm.register("llama", model).nbytes == nbytes
        assert host.used >= nbytes  # (rounded up to the host pool's size classes)
        assert allocator.usage(CPU).used == 0  # the tiers charge them now, not the load
        rm.demote("llama", "disk")
        assert host.used == 0 and disk.used >= nbytes
        kept = model.memplan.streamer.kept_weights()
        assert all(w is not None and w.is_meta for _, w in kept.values())  # nothing left behind
        with rm.use("llama") as leased:
            assert torch.equal(logits(leased), want)


def test_a_model_streamed_from_disk_leaves_its_streamed_layers_in_the_files(
    tiny_llama: Path, tmp_path: Path
) -> None:
    model, _ = _load(tiny_llama, "streamed-disk")
    want, nbytes = logits(model), _in_memory(model)
    streamer = model.memplan.streamer
    assert all(w is None for _, w in streamer.kept_weights().values())
    with ResidencyManager([get_tier("host", "1GiB"), get_tier("disk", tmp_path / "spill")]) as rm:
        assert rm.register("llama", model).nbytes == nbytes  # the resident layers only
        rm.demote("llama", "disk")
        before = streamer.stats.bytes_moved
        with rm.use("llama") as leased:
            assert torch.equal(logits(leased), want)
        assert streamer.stats.bytes_moved > before  # read from the checkpoint's files again


def test_a_registration_that_fails_gives_the_streamer_its_weights_and_the_load_its_budget_back(
    tiny_llama: Path,
) -> None:
    model, allocator = _load(tiny_llama, "streamed-host")
    want = logits(model)
    before = {d: allocator.usage(d).used for d in allocator.devices()}
    with ResidencyManager([get_tier("host", "64KiB")]) as rm, pytest.raises(memplan.TierFull):
        rm.register("llama", model)
    assert {d: allocator.usage(d).used for d in allocator.devices()} == before
    assert all(w is not None and not w.is_meta for _, w in model.memplan.streamer.kept_weights().values())
    assert torch.equal(logits(model), want)
