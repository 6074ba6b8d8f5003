"""A model whose layers are streamed or offloaded, in a residency manager: the manager takes charge
of every weight the model holds in memory, its own and those its streamer keeps for the layers that
hold placeholders between forwards; weights streamed from the checkpoint's files stay there."""

from __future__ import annotations

import threading
from collections.abc import Callable
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


def test_a_layer_whose_part_ran_on_its_own_is_registered_with_its_real_weights(
    tiny_llama: Path,
) -> None:
    """A part called on its own brings its streamed layer's weights in, and they stay until the
    next streamed layer runs (models that call ``layer.forward`` do so): registering then takes
    the model between forwards, not the streaming arena's bytes for weights."""
    model, _ = _load(tiny_llama, "streamed-host")
    want = logits(model)
    proj = model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        proj(torch.ones(1, proj.in_features, dtype=torch.bfloat16))
    assert not proj.weight.is_meta  # its layer is in the arena
    with ResidencyManager(_host_and_zstd()) as rm:
        rm.register("llama", model)
        rm.demote("llama", "z")
        with rm.use("llama") as leased:
            assert torch.equal(logits(leased), want)


def _pause_the_next_prefetch(streamer: Any, release: threading.Event) -> None:
    """The streamer's next prefetch of its first layer (the one a forward starts for the next
    forward) waits for ``release`` (at most a second) before it reads anything."""
    fill: Callable[[int, int], float] = streamer._fill
    seen = []

    def paused(index: int, slot: int) -> float:
        if index == 0:
            seen.append(slot)
            if len(seen) == 2:  # the first filled it for this forward, the second for the next
                release.wait(1.0)
        return fill(index, slot)

    streamer._fill = paused


def test_a_prefetch_under_way_while_the_model_moves_reads_no_moved_weights(tiny_llama: Path) -> None:
    """A forward's last layer starts prefetching the first for the next forward; if the model is
    demoted before that fill reads, the fill must not read the weights the demotion let go of
    (the next forward would raise)."""
    model, _ = _load(tiny_llama, "streamed-host")
    release = threading.Event()
    _pause_the_next_prefetch(model.memplan.streamer, release)
    want = logits(model)
    try:
        with ResidencyManager(_host_and_zstd()) as rm:
            rm.register("llama", model)
            rm.demote("llama", "z")
            release.set()
            with rm.use("llama") as leased:
                assert torch.equal(logits(leased), want)
    finally:
        release.set()


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


@pytest.mark.parametrize("kind", ["offloaded", "streamed-host", "streamed-disk"])
def test_the_streaming_arena_stays_charged_while_the_registered_model_runs(
    tiny_llama: Path, tmp_path: Path, kind: str
) -> None:
    """The tiers charge the weights a registered model holds; the arena its streamed layers run
    through is still the load's, on the compute device, until the model's handle closes (it was
    given back at register, and the device's budget showed it free while every forward used it)."""
    model, allocator = _load(tiny_llama, kind)
    compute = Device("cuda", 0)
    held = dict(model.memplan.placement.held)
    with ResidencyManager([get_tier("host", "1GiB"), get_tier("disk", tmp_path / "spill")]) as rm:
        rm.register("llama", model)
        kept = model.memplan.placement.held
        assert list(kept) == [compute] and 0 < kept[compute] <= held[compute]
        assert allocator.usage(compute).used == kept[compute]
        with rm.use("llama") as leased:
            logits(leased)
    model.memplan.close()
    assert allocator.usage(compute).used == 0
