"""Thousands of random register / use / write / release / pin / unpin / pressure / tier-failure
steps; after each one the manager's books must balance, and every tensor a lease holds must read
exactly what the model of it says (writes through a lease included, and never another entry's)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from memplan import Device, MemplanError, ResidencyManager, RetentionPolicy, TierError
from memplan.residency.eviction import LRU
from memplan.residency.tiers.base import Tier
from memplan.residency.tiers.memory import MemoryTier

KiB = 1 << 10
NAMES = [f"e{i}" for i in range(8)]


class InjectedFaults(Tier):
    """Mixed into a tier: its next ``fail_puts`` puts, ``fail_gets`` gets and ``fail_drops``
    drops raise ``raises(tier, key, why)`` (a :class:`TierError`, as a flaky disk would, unless
    set to e.g. a Ctrl-C), after the first ``passes[op]`` of them go through."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_puts = self.fail_gets = self.fail_drops = 0
        self.armed = True
        self.raises: Callable[[str, str, str], BaseException] = TierError
        self.passes = {"put": 0, "get": 0, "drop": 0}

    def _inject(self, op: str, key: str, why: str) -> None:
        if not (self.armed and getattr(self, f"fail_{op}s")):
            return
        if self.passes[op]:
            self.passes[op] -= 1
            return
        setattr(self, f"fail_{op}s", getattr(self, f"fail_{op}s") - 1)
        raise self.raises(self.name, key, f"injected {why} failure")

    def _discard(self, key: str, handle: Any) -> None:
        self._inject("drop", key, "delete")
        super()._discard(key, handle)

    def _store(self, key: str, tensor: torch.Tensor, room: int) -> tuple[Any, int]:
        self._inject("put", key, "write")
        return super()._store(key, tensor, room)

    def _fetch(self, key: str, handle: Any) -> torch.Tensor:
        self._inject("get", key, "read")
        return super()._fetch(key, handle)


class FailingTier(InjectedFaults, MemoryTier):
    """A memory tier with injected faults."""


class ResidencyMachine(RuleBasedStateMachine):
    @initialize(eviction=st.sampled_from(["gdsf", "lru"]))
    def build(self, eviction: str) -> None:
        self.tiers = [
            FailingTier(4 * KiB, name="gpu", device=Device("cuda", 0), bandwidth=20e9),
            FailingTier(8 * KiB, name="host", bandwidth=10e9),
            FailingTier(name="disk", device=Device("disk"), bandwidth=2e9),
        ]
        self.rm = ResidencyManager(self.tiers, eviction=LRU() if eviction == "lru" else None)
        self.originals: dict[str, dict[str, torch.Tensor]] = {}
        self.leases: list[tuple[str, Any, Any]] = []

    def _attempt(self, op: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return op(*args, **kwargs)
        except MemplanError:
            return None  # a refusal is fine; what it leaves behind is checked by the invariants

    @rule(
        name=st.sampled_from(NAMES),
        sizes=st.lists(st.integers(0, 600), min_size=1, max_size=3),
        shared=st.booleans(),
        priority=st.sampled_from([0.5, 1.0, 4.0]),
        max_pressure=st.sampled_from(["low", "medium", "high"]),
    )
    def register(self, name: str, sizes: list[int], shared: bool, priority: float, max_pressure: Any) -> None:
        if name in self.rm:
            return
        tensors = {
            f"t{i}": torch.randn(n, generator=torch.Generator().manual_seed(n)) for i, n in enumerate(sizes)
        }
        if shared:  # the same bytes as other entries' first tensor: stored once
            tensors["shared"] = torch.ones(128)
        needs = [n for n in self.originals if n < name][:1]
        policy = RetentionPolicy(priority=priority, max_pressure=max_pressure)
        copy = {k: v.clone() for k, v in tensors.items()}
        if self._attempt(self.rm.register, name, tensors, policy=policy, needs=needs) is not None:
            self.originals[name] = copy

    @rule(name=st.sampled_from(NAMES))
    def use(self, name: str) -> None:
        if name not in self.rm:
            return
        cm = self.rm.use(name)
        got = self._attempt(cm.__enter__)
        if got is not None:
            for key, tensor in self.originals[name].items():
                assert torch.equal(got[key], tensor)
            self.leases.append((name, cm, got))

    @precondition(lambda self: self.leases)
    @rule(which=st.integers(0, 100), delta=st.sampled_from([1.0, -3.5, 0.25]))
    def write_under_lease(self, which: int, delta: float) -> None:
        name, _, got = self.leases[which % len(self.leases)]
        for key, tensor in got.items():
            tensor.add_(delta)
            self.originals[name][key].add_(delta)

    @precondition(lambda self: self.leases)
    @rule(which=st.integers(0, 100))
    def release(self, which: int) -> None:
        _, cm, _ = self.leases.pop(which % len(self.leases))
        cm.__exit__(None, None, None)

    @rule(name=st.sampled_from(NAMES), tier=st.sampled_from([None, "gpu", "host", "disk"]))
    def pin(self, name: str, tier: str | None) -> None:
        if name in self.rm:
            self._attempt(self.rm.pin, name, tier)

    @rule(name=st.sampled_from(NAMES))
    def unpin(self, name: str) -> None:
        if name in self.rm:
            self.rm.unpin(name)

    @rule(name=st.sampled_from(NAMES))
    def demote(self, name: str) -> None:
        if name in self.rm:
            self._attempt(self.rm.demote, name)

    @rule(name=st.sampled_from(NAMES))
    def unregister(self, name: str) -> None:
        if name in self.rm:
            self._attempt(self.rm.unregister, name)
            if name not in self.rm:
                del self.originals[name]

    @rule(ratio=st.floats(0.0, 1.0), device=st.sampled_from([None, Device("cuda", 0), Device("cpu")]))
    def pressure(self, ratio: float, device: Device | None) -> None:
        self.rm.apply_pressure(ratio, device)

    @rule(tier=st.integers(0, 2), puts=st.integers(0, 3), gets=st.integers(0, 2), drops=st.integers(0, 2))
    def break_tier(self, tier: int, puts: int, gets: int, drops: int) -> None:
        broken = self.tiers[tier]
        broken.fail_puts, broken.fail_gets, broken.fail_drops = puts, gets, drops

    @invariant()
    def books_balance_and_data_is_intact(self) -> None:
        if not hasattr(self, "rm"):
            return
        for tier in self.tiers:
            tier.armed = False
        try:
            for tier in self.tiers:
                assert tier.used == self.rm.held_bytes(tier.name) <= tier.capacity
                assert tier.used == sum(tier.size_of(k) for k in tier.keys())  # noqa: SIM118
                # and every key there is one an entry on it holds, or one a failed drop left
                held = {
                    key
                    for name in self.rm.names()
                    if self.rm.tier_of(name) is tier
                    for key in self.rm._entries[name].group.sizes(tier.addressable)
                }
                assert set(tier.keys()) == held | set(self.rm.orphans(tier.name))
            for name in self.rm.names():
                info = self.rm.info(name)
                if info.pinned_tier is not None:
                    assert info.tier == info.pinned_tier
                if info.leases:
                    assert self.rm.tier_of(name).addressable
            leased: set[str] = set()
            todo = [name for name, _, _ in self.leases]
            while todo:  # a lease holds what the entry needs, too
                name = todo.pop()
                leased.add(name)
                todo += self.rm.info(name).needs
            assert {n for n in self.rm.names() if self.rm.info(n).leases} == leased
            for name, _, got in self.leases:  # held tensors read what this entry's writes made them
                for key, tensor in self.originals[name].items():
                    assert torch.equal(got[key], tensor), f"{name}.{key} changed under its lease"
            assert self.rm.verify() == []
        finally:
            for tier in self.tiers:
                tier.armed = True

    def teardown(self) -> None:
        for _, cm, _ in self.leases:
            cm.__exit__(None, None, None)


ResidencyMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("MEMPLAN_STATEFUL_EXAMPLES", "60")),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestResidencyMachine = ResidencyMachine.TestCase


def test_the_found_stale_key_sequence_replays_clean() -> None:
    """As hypothesis found it: the read-back of a registration failed and left its keys on the
    gpu tier; registering the name again with other tensors then leased the old ones."""
    machine = ResidencyMachine()
    steps = [
        lambda: machine.build(eviction="gdsf"),
        lambda: machine.break_tier(tier=0, puts=0, gets=1, drops=0),
        lambda: machine.register(name="e0", sizes=[0], shared=False, priority=0.5, max_pressure="low"),
        lambda: machine.register(name="e0", sizes=[1], shared=False, priority=0.5, max_pressure="low"),
        lambda: machine.use(name="e0"),
    ]
    try:
        for step in steps:
            step()
            machine.books_balance_and_data_is_intact()
    finally:
        machine.teardown()
