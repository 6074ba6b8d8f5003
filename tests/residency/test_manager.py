"""The residency manager with real modules on real tiers: what a model server relies on."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from memplan import (
    Allocator,
    Device,
    MemplanError,
    PinViolation,
    ResidencyManager,
    RetentionPolicy,
    TierFull,
    get_tier,
)
from memplan.gpu import parse_simulation
from memplan.residency import LRU, Belady, Candidate, EntryInUse, get_eviction
from memplan.residency._groups import digest_of
from memplan.residency.eviction import GDSF
from tests.conftest import run_threads

KiB = 1 << 10
GPU = Device("cuda", 0)


def mlp(width: int = 32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, 8)
    ).eval()


def stack(gpu: int, host: int) -> list:
    """Memory tiers standing in for gpu, host and an unbounded disk, with real bandwidth ratios."""
    return [
        get_tier("memory", gpu, name="gpu", bandwidth=20e9, device=GPU),
        get_tier("memory", host, name="host", bandwidth=10e9),
        get_tier("memory", name="disk", bandwidth=2e9, device=Device("disk")),
    ]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_module_output_is_identical_after_a_trip_through_disk_and_back(tmp_path: Path) -> None:
    allocator = Allocator(parse_simulation("cuda:0=1MiB,cpu=1GiB"))
    tiers = [get_tier("gpu", allocator=allocator), get_tier("host", "64MiB"), get_tier("disk", tmp_path)]
    model, x = mlp(), torch.randn(4, 32)
    with torch.no_grad():
        expected = model(x)
    with ResidencyManager(tiers) as rm:
        rm.register("mlp", model)
        assert rm.tier_of("mlp").name == "gpu"
        assert allocator.usage(tiers[0].device).used == rm.info("mlp").nbytes
        rm.demote("mlp", "disk")
        assert model[0].weight.is_meta  # released: a forward now fails loudly
        assert allocator.usage(tiers[0].device).used == 0
        with rm.use("mlp") as leased, torch.no_grad():
            assert leased is model and rm.tier_of("mlp").name == "gpu"
            assert torch.equal(leased(x), expected)
        assert rm.verify() == []


def test_tied_parameters_stay_tied_across_moves() -> None:
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    rm = ResidencyManager(stack(64 * KiB, 64 * KiB))
    rm.register("tied", model)
    assert rm.info("tied").nbytes == 10 * 4 * 4  # stored once
    rm.demote("tied", "disk")
    with rm.use("tied"):
        assert model["head"].weight is model["emb"].weight


def test_leased_entries_are_never_evicted_and_others_are() -> None:
    rm = ResidencyManager(stack(2 * KiB + 512, 64 * KiB))
    for name in ("a", "b"):
        rm.register(name, {"w": torch.randn(256)}, tier="host")  # 1 KiB each
    with rm.use("a") as a:
        assert set(a) == {"w"}
        with rm.use("b"):
            assert rm.tier_of("a").name == rm.tier_of("b").name == "gpu"
            rm.register("c", {"w": torch.randn(256)}, tier="host")
            with rm.use("c"):  # no room on gpu and both there are leased: served from host
                assert rm.tier_of("c").name == "host"
            with pytest.raises(EntryInUse):
                rm.demote("a")
    with rm.use("c"):  # now a and b may make room
        assert rm.tier_of("c").name == "gpu"


def test_pins_hold_and_a_request_that_would_break_one_raises() -> None:
    rm = ResidencyManager(stack(2 * KiB, 64 * KiB))
    rm.register("base", {"w": torch.randn(384)})  # 1.5 KiB on gpu
    rm.pin("base")
    with pytest.raises(PinViolation):
        rm.demote("base")
    rm.register("other", {"w": torch.randn(384)}, tier="host")
    with pytest.raises(PinViolation) as caught:
        rm.pin("other", "gpu")
    assert caught.value.key == "other"
    assert rm.tier_of("base").name == "gpu" and rm.tier_of("other").name == "host"
    assert rm.apply_pressure(0.99).level == "critical" and rm.tier_of("base").name == "gpu"
    rm.unpin("base")
    rm.pin("other", "gpu")
    assert rm.tier_of("other").name == "gpu" and rm.tier_of("base").name == "host"


def test_an_entry_stays_while_an_entry_that_needs_it_is_resident() -> None:
    rm = ResidencyManager(stack(3 * KiB, 64 * KiB))
    rm.register("base", {"w": torch.randn(256)}, tier="host")
    rm.register("adapter", {"a": torch.randn(64)}, needs=["base"], tier="host")
    with rm.use("adapter"):
        assert rm.tier_of("base").name == "gpu"  # brought up with what needs it
    with pytest.raises(EntryInUse, match="needed by adapter"):
        rm.demote("base")
    rm.register("big", {"w": torch.randn(400)}, tier="host")
    with rm.use("big"):  # evicts the adapter first, and only then may base go
        pass
    assert rm.tier_of("big").name == "gpu"
    assert rm.tier_of("adapter").name != "gpu" or rm.tier_of("base").name == "gpu"
    with pytest.raises(EntryInUse):
        rm.unregister("base")


def test_idle_entries_are_demoted_one_tier_per_limit_and_leased_ones_retried() -> None:
    clock = FakeClock()
    rm = ResidencyManager(stack(64 * KiB, 64 * KiB), clock=clock)
    rm.register("chat", {"w": torch.randn(16)}, policy=RetentionPolicy(max_idle_s=60))
    rm.register("batch", {"w": torch.randn(16)}, policy=RetentionPolicy(max_idle_s=5))
    rm.register("forever", {"w": torch.randn(16)})
    clock.now = 10
    assert rm.maintain() == ["batch"] and rm.tier_of("batch").name == "host"
    with rm.use("chat"):
        clock.now = 100
        assert rm.maintain() == ["batch"]  # chat is leased: skipped, retried later
    clock.now = 161
    assert rm.maintain() == ["chat"]
    assert rm.tier_of("forever").name == "gpu" and rm.tier_of("batch").name == "disk"


def test_the_cleanup_thread_runs_and_stops_promptly() -> None:
    rm = ResidencyManager(stack(64 * KiB, 64 * KiB), interval_s=0.02)
    rm.register("x", {"w": torch.randn(16)}, policy=RetentionPolicy(max_idle_s=0.0))
    with rm:
        deadline = time.monotonic() + 5
        while rm.tier_of("x").name == "gpu" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rm.tier_of("x").name != "gpu"
    assert rm._worker.thread is not None
    rm._worker.thread.join(timeout=0.5)  # past its last pass, the thread only has to exit
    assert not rm._worker.thread.is_alive()


def test_pressure_levels_escalate_and_each_response_is_recorded() -> None:
    rm = ResidencyManager(stack(64 * KiB, 64 * KiB))
    rm.register("casual", {"w": torch.randn(64)})
    rm.register("sturdy", {"w": torch.randn(64)}, policy=RetentionPolicy(max_pressure="high"))
    assert rm.apply_pressure(0.5, GPU).level == "none" and not rm.responses
    low = rm.apply_pressure(0.72, GPU)
    assert low.actions == ("clear caches",) and low.demoted == ()
    medium = rm.apply_pressure(0.85, GPU)
    assert medium.demoted == ("casual",) and medium.freed_bytes == 64 * 4
    assert rm.apply_pressure(0.92, GPU).demoted == ()  # sturdy rides out high pressure
    critical = rm.apply_pressure(0.97, GPU)
    assert critical.demoted == ("sturdy",) and "gc.collect and empty_cache" in critical.actions
    for _ in range(120):
        rm.apply_pressure(0.75)
    assert len(rm.responses) == 100


def test_identical_tensors_are_stored_once_where_no_lease_can_write_them(tmp_path: Path) -> None:
    gpu, disk = get_tier("memory", 64 * KiB, name="gpu", device=GPU), get_tier("disk", tmp_path)
    rm = ResidencyManager([gpu, disk])
    shared = torch.randn(512)
    rm.register("a", {"w": shared.clone(), "b": torch.randn(8)})
    rm.register("b", {"w": shared.clone(), "b": torch.randn(8)})
    # On an addressable tier a lease writes the stored tensor itself: each entry has its own.
    assert gpu.used == 2 * (512 * 4 + 8 * 4) == rm.held_bytes("gpu")
    rm.demote("a")
    rm.demote("b")
    assert gpu.used == 0 and disk.used == rm.held_bytes("disk") and len(disk) == 3
    assert rm.stats().dedup_saved_bytes == disk.size_of(digest_of(shared)[:48])
    rm.unregister("b")
    assert len(disk) == 2 and rm.verify() == []


def test_compression_and_pool_report_their_figures(tmp_path: Path) -> None:
    host = get_tier("host", "16MiB")
    zdisk = get_tier("disk", tmp_path, compression="zstd")
    rm = ResidencyManager([host, zdisk])
    for i in range(4):
        rm.register(f"m{i}", {"w": torch.full((100_000,), float(i))})  # compressible, 1 MiB class
        rm.demote(f"m{i}")
        with rm.use(f"m{i}"):
            pass
    pool = host.pool.stats()
    assert (pool.misses, pool.hits, pool.hit_rate) == (4, 4, 0.5)  # each use reused a released buffer
    rm.demote("m0")
    assert zdisk.stats().compression_ratio > 50


def test_eviction_orders() -> None:
    old_big = Candidate("old-big", 8 << 30, last_use=1, uses=10, priority=1, reload_cost_s=4.0)
    new_small = Candidate("new-small", 1 << 30, last_use=9, uses=1, priority=1, reload_cost_s=0.5)
    assert [c.name for c in LRU().order([new_small, old_big])] == ["old-big", "new-small"]
    gdsf = GDSF()
    assert [c.name for c in gdsf.order([old_big, new_small])] == ["new-small", "old-big"]
    belady = Belady(["a", "b", "a", "c"])
    belady.touched("a")  # at position 0; next uses: b at 1, a at 2, c at 3, d never
    picks = belady.order([Candidate(n, 1, 0, 1, 1, 1) for n in "abcd"])
    assert [c.name for c in picks] == ["d", "c", "a", "b"]
    with pytest.raises(MemplanError):
        get_eviction("random")


def test_bad_requests_are_typed_errors() -> None:
    rm = ResidencyManager(stack(1 * KiB, 1 * KiB))
    with pytest.raises(MemplanError, match="no entry"):
        rm.demote("nothing")
    with pytest.raises(MemplanError, match="nn.Module or a mapping"):
        rm.register("bad", 42)
    rm.register("x", {"w": torch.randn(4)})
    with pytest.raises(MemplanError, match="already registered"):
        rm.register("x", {"w": torch.randn(4)})
    with pytest.raises(TierFull):
        rm.register("huge", {"w": torch.randn(1024)}, tier="gpu")
    assert "huge" not in rm and rm.tiers[0].used == rm.held_bytes("gpu")


def test_eight_threads_leasing_and_pressing_at_once_finish_without_double_frees() -> None:
    rm = ResidencyManager(stack(6 * KiB, 12 * KiB))
    tensors = {f"m{i}": torch.randn(256) for i in range(12)}
    for name, t in tensors.items():
        rm.register(name, {"w": t.clone()})

    def worker(seed: int) -> None:
        import random

        rnd = random.Random(seed)
        for _ in range(150):
            name = rnd.choice(list(tensors))
            if rnd.random() < 0.1:
                rm.apply_pressure(rnd.choice([0.75, 0.85, 0.96]))
                continue
            with rm.use(name) as got:
                assert torch.equal(got["w"], tensors[name])

    errors = run_threads(worker, 8, timeout_s=120)
    assert not errors, errors[0]
    for tier in rm.tiers:
        assert tier.used == rm.held_bytes(tier.name) <= tier.capacity
    assert rm.verify() == [] and rm.stats().leased == 0


def test_a_leased_entry_can_be_pinned_where_it_is_and_not_moved_by_a_pin() -> None:
    rm = ResidencyManager(
        [get_tier("memory", "1MiB", name="gpu", device=Device("cuda", 0)), get_tier("host", "64MiB")]
    )
    rm.register("a", {"w": torch.ones(4)})
    with rm.use("a"):
        rm.pin("a")  # where it is: nothing moves, so its lease does not stand in the way
        assert rm.info("a").pinned_tier == "gpu"
        rm.unpin("a")
        with pytest.raises(EntryInUse):
            rm.pin("a", "host")  # that would move it under its lease
    rm.close()


def test_with_admission_a_use_moves_up_only_over_entries_worth_less() -> None:
    """Admission: "b" runs from the host where moving up would evict "a", used far more; once
    "b" is used more than "a", it moves up over it. Without admission every use moves up."""
    for admission in (True, False):
        rm = ResidencyManager(stack(1024 + 512, 64 * KiB), admission=admission)
        rm.register("a", {"w": torch.randn(256)})  # 1 KiB: the gpu holds one
        rm.register("b", {"w": torch.randn(256)}, tier="host")
        for _ in range(5):
            with rm.use("a"):
                pass
        with rm.use("b"):
            assert rm.tier_of("b").name == ("host" if admission else "gpu")
        for _ in range(8):
            with rm.use("b"):
                pass
        assert rm.tier_of("b").name == "gpu" and rm.tier_of("a").name == "host"
        rm.close()
