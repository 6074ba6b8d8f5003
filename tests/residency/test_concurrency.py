"""Many threads on one residency manager, over real tiers that fail and stall: every budget holds,
every leased tensor reads what was stored, nothing deadlocks, and a hung tier delays only the
entries moving through it."""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import random
import sys
import threading
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from memplan import Allocator, Device, ResidencyManager, RetentionPolicy, TierError
from memplan.errors import DoesNotFit, EntryExists, EntryInUse, NoSuchEntry, PinViolation
from memplan.gpu import parse_simulation
from memplan.residency.tiers.base import Tier
from memplan.residency.tiers.disk import DiskTier
from memplan.residency.tiers.gpu import GpuTier
from memplan.residency.tiers.host import HostTier

KiB = 1 << 10
GPU = Device("cuda", 0)
STRESS_SECONDS = float(os.environ.get("MEMPLAN_STRESS_SECONDS", "15"))
STRESS_SEED = int(os.environ.get("MEMPLAN_STRESS_SEED", str(random.randrange(1 << 30))))
# What a manager may refuse a request with while others run (TierFull is a TierError); anything
# else is a bug.
REFUSALS = (DoesNotFit, EntryExists, EntryInUse, NoSuchEntry, PinViolation, TierError)


# -- threads that must finish ----------------------------------------------------------------------


def stacks() -> str:
    """Every thread's stack, for a watchdog's failure message."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(
        f"--- thread {names.get(ident, ident)}\n{''.join(traceback.format_stack(frame))}"
        for ident, frame in sys._current_frames().items()
    )


def join_or_fail(threads: list[threading.Thread], timeout_s: float, what: str) -> None:
    """Join ``threads``; any still running after ``timeout_s`` fails the test with every stack."""
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    if alive:
        pytest.fail(f"{what}: {alive} still running after {timeout_s:.0f}s (a deadlock?)\n{stacks()}")


# -- real tiers that fail and stall ----------------------------------------------------------------


class Unreliable(Tier):
    """Mixed into a real tier: while ``faulty``, one put, get or drop in ``1 / fail_rate`` raises a
    :class:`TierError` (a flaky disk) and one in ``1 / stall_rate`` first sleeps up to
    ``stall_s`` (a slow one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.faulty = False
        self.fail_rate, self.stall_rate, self.stall_s = 0.03, 0.03, 0.03
        self.trouble: Counter[str] = Counter()

    def _trouble(self, op: str, key: str) -> None:
        if not self.faulty:
            return
        roll = random.random()
        if roll < self.stall_rate:
            self.trouble[f"{op} stalls"] += 1
            time.sleep(random.uniform(0, self.stall_s))
        elif roll < self.stall_rate + self.fail_rate:
            self.trouble[f"{op} failures"] += 1
            raise TierError(self.name, key, f"injected {op} failure")

    def _store(self, key: str, tensor: torch.Tensor, room: int) -> tuple[Any, int]:
        self._trouble("put", key)
        return super()._store(key, tensor, room)  # type: ignore[safe-super]

    def _fetch(self, key: str, handle: Any) -> torch.Tensor:
        self._trouble("get", key)
        return super()._fetch(key, handle)  # type: ignore[safe-super]

    def _discard(self, key: str, handle: Any) -> None:
        self._trouble("drop", key)
        super()._discard(key, handle)  # type: ignore[safe-super]


class UnreliableGpu(Unreliable, GpuTier):
    pass


class UnreliableHost(Unreliable, HostTier):
    pass


class UnreliableDisk(Unreliable, DiskTier):
    pass


# -- the stress test -------------------------------------------------------------------------------

FIXED = [f"m{i:02d}" for i in range(50)]
WRITABLE = set(FIXED[:8])  # leases of these write in place (one at a time: the test serialises them)
EXTRAS = [f"x{i}" for i in range(6)]  # registered and unregistered while the others run
TIER_NAMES = ["gpu", "host", "zhost", "disk"]


def fixed_tensors(index: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(index)
    tensors = {"w": torch.randn(128 + 64 * (index % 8), generator=g), "b": torch.randn(16, generator=g)}
    if index % 5 == 0:  # the same bytes in ten entries: stored once where tiers deduplicate
        tensors["shared"] = torch.ones(256)
    return tensors


def extra_tensors(name: str, generation: int) -> dict[str, torch.Tensor]:
    """A registration of ``name`` that says which one it is: a lease shows whose tensors it got."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{generation}".encode()))
    return {"generation": torch.tensor([float(generation)]), "w": torch.randn(200, generator=g)}


def fixed_policy(index: int) -> RetentionPolicy:
    return RetentionPolicy(
        max_idle_s=0.3 if index % 7 == 3 else None,  # the manager's worker demotes these
        priority=(0.5, 1.0, 4.0)[index % 3],
        max_pressure=("low", "medium", "high")[index % 3],
    )


def needs_of(index: int) -> list[str]:
    return [FIXED[index - 5]] if index >= 45 else []  # m45..m49 are adapters of m40..m44


def assert_same(name: str, got: Any, expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected), f"{name}: leased {sorted(got)}, registered {sorted(expected)}"
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), f"{name}.{key} is not what was stored"


@dataclass
class Stress:
    """The shared state of one stress run: the manager, what every entry must read, what went wrong."""

    rm: ResidencyManager
    tiers: list[Any]
    expected: dict[str, dict[str, torch.Tensor]]  # fixed entries, writes included
    locks: dict[str, threading.Lock]  # a writable entry's leases, one at a time
    stop: threading.Event = field(default_factory=threading.Event)
    generations: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    tried: dict[str, set[int]] = field(default_factory=lambda: {n: set() for n in EXTRAS})
    counts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    over_budget: list[str] = field(default_factory=list)

    # -- one step of a worker ------------------------------------------------------------------
    def use(self, rnd: random.Random, kept: list[tuple[str, dict[str, torch.Tensor], Any]]) -> None:
        name = rnd.choice(FIXED + EXTRAS)
        if name in EXTRAS:
            with self.rm.use(name) as got:
                generation = int(got["generation"].item())
                assert generation in self.tried[name], f"{name}: leased a generation never registered"
                assert_same(name, got, extra_tensors(name, generation))
            return
        if name not in WRITABLE:
            with self.rm.use(name) as got, self.stays(name):
                assert_same(name, got, self.expected[name])
                time.sleep(rnd.uniform(0, 0.004))  # held while others move, press and fail
                assert_same(name, got, self.expected[name])
            kept.append((name, self.expected[name], got))  # a handed-out tensor stays its holder's
            del kept[:-4]
            return
        with self.locks[name], self.rm.use(name) as got, self.stays(name):
            assert_same(name, got, self.expected[name])
            time.sleep(rnd.uniform(0, 0.004))
            delta = rnd.choice([1.0, -0.5, 0.25])
            for key, tensor in got.items():  # lands in the stored copy: the next lease reads it
                tensor.add_(delta)
                self.expected[name][key].add_(delta)

    @contextlib.contextmanager
    def stays(self, name: str) -> Iterator[None]:
        """Asserts that leased ``name`` is where it can be used, and nothing moves it meanwhile."""
        where = self.rm.tier_of(name)
        assert where.addressable, f"{name} leased on {where.name}"
        yield
        assert self.rm.tier_of(name) is where, f"{name} moved from {where.name} under its lease"

    def step(self, rnd: random.Random, kept: list[Any]) -> None:
        roll = rnd.random()
        name = rnd.choice(FIXED)
        if roll < 0.45:
            self.use(rnd, kept)
        elif roll < 0.62:
            self.rm.demote(name, rnd.choice([None, None, *TIER_NAMES[1:]]))
        elif roll < 0.66:
            self.rm.pin(name, rnd.choice([None, *TIER_NAMES]))
        elif roll < 0.74:
            self.rm.unpin(name)
        elif roll < 0.78:
            self.rm.apply_pressure(rnd.choice([0.5, 0.75, 0.85, 0.92, 0.97]), rnd.choice([None, GPU]))
        elif roll < 0.82:
            self.rm.signal_pressure(rnd.choice([0.75, 0.85, 0.97]), rnd.choice([None, GPU, Device("cpu")]))
        elif roll < 0.90:
            extra = rnd.choice(EXTRAS)
            generation = next(self.generations)
            self.tried[extra].add(generation)  # before it lands: a lease may see it first
            self.rm.register(extra, extra_tensors(extra, generation), tier=rnd.choice([None, *TIER_NAMES]))
        elif roll < 0.96:
            self.rm.unregister(rnd.choice(EXTRAS))
        elif roll < 0.98:
            assert self.rm.verify() == []
        else:
            self.read_figures(name)

    def read_figures(self, name: str) -> None:
        """What a dashboard reads while entries move: never refused, never failing."""
        try:
            stats = self.rm.stats()
            held = [self.rm.held_bytes(tier.name) for tier in self.tiers]
            info = self.rm.info(name)
        except Exception as exc:
            raise AssertionError(f"reading the figures raised {exc!r}") from exc
        assert stats.entries >= len(FIXED) and info.nbytes > 0 and min(held) >= 0

    def worker(self, seed: int) -> None:
        rnd = random.Random(seed)
        kept: list[tuple[str, dict[str, torch.Tensor], Any]] = []
        while not self.stop.is_set():
            try:
                self.step(rnd, kept)
                self.counts["done"] += 1
            except REFUSALS as exc:
                self.counts[type(exc).__name__] += 1
            except BaseException:
                self.failures.append(f"seed {seed}: {traceback.format_exc()}")
                self.stop.set()
                return
        for name, expected, got in kept:  # untouched since it was handed out
            if not all(torch.equal(got[key], tensor) for key, tensor in expected.items()):
                self.failures.append(f"{name}: a tensor handed out by a lease changed after it was released")

    def monitor(self) -> None:
        """Every tier's budget, sampled all along."""
        while not self.stop.is_set():
            for tier in self.tiers:
                used = tier.used
                if used > tier.capacity:
                    self.over_budget.append(f"{tier.name}: {used} used of {tier.capacity}")
            time.sleep(0.001)


def build(tmp_path: Path) -> tuple[Stress, Allocator]:
    allocator = Allocator(parse_simulation("cuda:0=4MiB,cpu=1GiB"))
    tiers = [
        # Less than the allocator's budget: tensors the test still holds keep theirs.
        UnreliableGpu(48 * KiB, allocator=allocator, name="gpu"),
        UnreliableHost(160 * KiB, name="host"),
        UnreliableHost(96 * KiB, compression="zstd", name="zhost"),
        UnreliableDisk(tmp_path / "spill", name="disk"),
    ]
    rm = ResidencyManager(tiers, interval_s=0.05)
    expected = {}
    for i, name in enumerate(FIXED):
        tensors = fixed_tensors(i)
        rm.register(
            name, {k: v.clone() for k, v in tensors.items()}, policy=fixed_policy(i), needs=needs_of(i)
        )
        expected[name] = tensors
    locks = {name: threading.Lock() for name in WRITABLE}
    return Stress(rm, tiers, expected, locks), allocator


def settle(rm: ResidencyManager, timeout_s: float = 30.0) -> None:
    """Unpin everything and wait for the manager's own worker to be done: the idle entries down on
    the last tier, the pressure signalled last answered. Then free what failed drops left."""
    for name in FIXED:
        rm.unpin(name)
    idle = [name for i, name in enumerate(FIXED) if fixed_policy(i).max_idle_s is not None]
    deadline = time.monotonic() + timeout_s
    while any(rm.tier_of(name).name != "disk" for name in idle):
        assert time.monotonic() < deadline, {name: rm.tier_of(name).name for name in idle}
        time.sleep(0.05)
    time.sleep(10 * rm.interval_s)  # a pass or two more: nothing is left for them to move
    rm.maintain()


def test_eight_threads_over_fifty_entries_and_failing_tiers_keep_every_budget_and_every_byte(
    tmp_path: Path,
) -> None:
    """Eight threads lease (reading, and writing in place where only one lease can hold the entry),
    demote, pin, unpin, press (at once and through the manager's worker), verify, and register and
    unregister extra names, over 50 entries on gpu, host, compressed host and disk tiers that fail
    and stall now and then. Runs ``MEMPLAN_STRESS_SECONDS`` (default 15, so CI stays fast; set
    e.g. 120 for a soak) with ``MEMPLAN_STRESS_SEED`` for its operation mix. Every tier stays
    within its capacity all along; at the end the books balance, no orphan is left, every entry
    reads what it was given (and what leases wrote), and ``close()`` frees every byte."""
    stress, allocator = build(tmp_path)
    rm, tiers = stress.rm, stress.tiers
    for tier in tiers:
        tier.faulty = True
    workers = [
        threading.Thread(target=stress.worker, args=(STRESS_SEED + i,), name=f"stress-{i}", daemon=True)
        for i in range(8)
    ]
    monitor = threading.Thread(target=stress.monitor, name="stress-monitor", daemon=True)
    for t in [monitor, *workers]:
        t.start()
    stress.stop.wait(STRESS_SECONDS)
    stress.stop.set()
    join_or_fail(workers, max(60.0, STRESS_SECONDS), f"stress workers (seed {STRESS_SEED})")
    join_or_fail([monitor], 5.0, "the budget monitor")
    trouble = sum((t.trouble for t in tiers), Counter())
    print(f"seed {STRESS_SEED}: {dict(stress.counts)}; injected {dict(trouble)}")

    if stress.failures:
        pytest.fail(f"seed {STRESS_SEED}: {len(stress.failures)} failures; the first:\n{stress.failures[0]}")
    if stress.over_budget:
        pytest.fail(f"seed {STRESS_SEED}: over budget: {stress.over_budget[:5]}")
    assert stress.counts["done"] > 200, f"too little work got through to mean anything: {stress.counts}"
    assert trouble["put failures"] and trouble["get failures"] and trouble["drop failures"], trouble

    for tier in tiers:
        tier.faulty = False
    settle(rm)
    for tier in tiers:
        assert tier.used == rm.held_bytes(tier.name) <= tier.capacity, tier
        assert rm.orphans(tier.name) == [], tier.name
        assert tier.used == sum(tier.size_of(k) for k in tier.keys())  # noqa: SIM118
    assert rm.verify() == []
    assert rm.stats().leased == 0
    print(rm.stats())
    for name in FIXED:
        with rm.use(name) as got:
            assert_same(name, got, stress.expected[name])
    for name in EXTRAS:
        if name in rm:
            with rm.use(name) as got:
                assert_same(name, got, extra_tensors(name, int(got["generation"].item())))
    del got

    rm.close()
    for tier in tiers:
        assert tier.used == 0 and len(tier) == 0, tier
    assert [p.name for p in (tmp_path / "spill").iterdir()] == []
    gc.collect()
    assert allocator.usage(GPU).used == 0  # no gpu bytes outlive their entries


# -- a hung tier delays only the entries moving through it -----------------------------------------


class Gated(Tier):
    """Mixed into a tier: while ``gate`` is closed, a put waits there (a hung remote)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()  # a put is held at the gate

    def _store(self, key: str, tensor: torch.Tensor, room: int) -> tuple[Any, int]:
        if not self.gate.is_set():
            self.waiting.set()
            self.gate.wait(60)
        return super()._store(key, tensor, room)  # type: ignore[safe-super]


class GatedDisk(Gated, DiskTier):
    pass


class StillWaiting(AssertionError):
    """An operation beside the hung move did not finish in time."""


@dataclass
class Hung:
    """``stuck`` on its way from gpu to a disk whose puts hang; ``hot`` beside it on gpu, ``cold`` on host."""

    rm: ResidencyManager
    disk: GatedDisk
    tensors: dict[str, dict[str, torch.Tensor]]
    threads: list[threading.Thread]  # the stuck demotion, and what was run beside it

    def within(self, seconds: float, op: Callable[[], Any]) -> Any:
        """What ``op`` returns, asserting it finishes within ``seconds`` while the disk hangs."""
        done: list[Any] = []

        def run() -> None:
            try:
                done.append(("ok", op()))
            except BaseException as exc:
                done.append(("raised", exc))

        t = threading.Thread(target=run, name="beside", daemon=True)
        self.threads.append(t)
        start = time.monotonic()
        t.start()
        t.join(seconds)
        if t.is_alive():
            raise StillWaiting(f"still waiting after {seconds}s behind a move to the hung disk")
        assert self.disk.waiting.is_set() and not self.disk.gate.is_set()  # the move is still stuck
        outcome, value = done[0]
        if outcome == "raised":
            raise value
        print(f"finished in {time.monotonic() - start:.3f}s")
        return value


@pytest.fixture
def hung(tmp_path: Path) -> Iterator[Hung]:
    allocator = Allocator(parse_simulation("cuda:0=1MiB,cpu=1GiB"))
    disk = GatedDisk(tmp_path / "spill", name="disk")
    rm = ResidencyManager([GpuTier(64 * KiB, allocator=allocator), HostTier("1MiB"), disk])
    tensors = {name: {"w": torch.randn(256), "b": torch.randn(8)} for name in ("stuck", "cold", "hot")}
    for name, tier in (("stuck", "gpu"), ("cold", "host"), ("hot", "gpu")):
        rm.register(name, {k: v.clone() for k, v in tensors[name].items()}, tier=tier)
    disk.gate.clear()
    mover = threading.Thread(target=rm.demote, args=("stuck", "disk"), name="mover", daemon=True)
    mover.start()
    assert disk.waiting.wait(10), "the demotion never reached the disk"
    state = Hung(rm, disk, tensors, [mover])
    try:
        yield state
    finally:
        disk.gate.set()
        join_or_fail(state.threads, 30, "the demotion to the released disk, and what waited for it")
        assert [m.target for m in rm.moves if m.entry == "stuck"][:1] == ["disk"]  # it landed
        for name, expected in tensors.items():
            with rm.use(name) as got:
                assert_same(name, got, expected)
        for tier in rm.tiers:
            assert tier.used == rm.held_bytes(tier.name)
        assert rm.verify() == []
        rm.close()


WAIT_S = 2.0  # what a move of a 1 KiB entry between two healthy tiers may take, on a loaded CI box


def test_a_lease_of_a_resident_entry_never_waits_for_a_hung_tier(hung: Hung) -> None:
    def lease() -> None:
        with hung.rm.use("hot") as got:
            assert_same("hot", got, hung.tensors["hot"])

    hung.within(WAIT_S, lease)
    info = hung.within(WAIT_S, lambda: hung.rm.info("stuck"))
    assert info.tier == "gpu"  # where it is until its copy lands
    assert hung.within(WAIT_S, hung.rm.stats).entries == 3


def test_a_lease_of_the_entry_moving_through_the_hung_tier_waits_for_it_to_land(hung: Hung) -> None:
    leased = threading.Event()

    def lease() -> None:
        with hung.rm.use("stuck") as got:
            assert_same("stuck", got, hung.tensors["stuck"])
            leased.set()

    t = threading.Thread(target=lease, daemon=True)
    t.start()
    assert not leased.wait(0.5)
    hung.disk.gate.set()
    join_or_fail([t], 30, "the lease of the entry once it landed")
    assert leased.is_set()


def test_a_pressure_signal_returns_at_once_while_a_move_hangs(hung: Hung) -> None:
    hung.within(WAIT_S, lambda: hung.rm.signal_pressure(0.97, GPU))


def test_another_entry_is_promoted_while_a_move_to_a_hung_tier_waits(hung: Hung) -> None:
    def lease() -> str:
        with hung.rm.use("cold") as got:
            assert_same("cold", got, hung.tensors["cold"])
            return hung.rm.tier_of("cold").name

    assert hung.within(WAIT_S, lease) == "gpu"


def test_another_entry_is_demoted_while_a_move_to_a_hung_tier_waits(hung: Hung) -> None:
    hung.within(WAIT_S, lambda: hung.rm.demote("hot", "host"))
    assert hung.rm.tier_of("hot").name == "host"


def test_a_new_entry_is_registered_while_a_move_to_a_hung_tier_waits(hung: Hung) -> None:
    hung.within(WAIT_S, lambda: hung.rm.register("new", {"w": torch.zeros(8)}, tier="gpu"))
    hung.rm.unregister("new")


def test_the_managers_worker_answers_pressure_while_a_move_to_a_hung_tier_waits(hung: Hung) -> None:
    """The worker demotes ``hot`` off the pressed gpu (and leaves ``stuck``, moving, to its move)."""
    hung.rm.signal_pressure(0.97, GPU)

    def demoted() -> None:
        while hung.rm.tier_of("hot").name == "gpu":
            time.sleep(0.01)

    hung.within(WAIT_S, demoted)
