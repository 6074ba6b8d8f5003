"""Thousands of random register / use / write / release / pin / unpin / pressure / tier-failure
steps; after each one the manager's books must balance, and every tensor a lease holds must read
exactly what the model of it says (writes through a lease included, and never another entry's)."""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from memplan import Device, MemplanError, ResidencyManager, RetentionPolicy, TierError
from memplan.residency.eviction import LRU
from memplan.residency.tiers.memory import MemoryTier

KiB = 1 << 10
NAMES = [f"e{i}" for i in range(8)]


class FailingTier(MemoryTier):
    """A memory tier whose next ``fail_puts`` puts, ``fail_gets`` gets and ``fail_drops`` drops
    raise, as a flaky disk would."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_puts = self.fail_gets = self.fail_drops = 0
        self.armed = True

    def _discard(self, key: str, handle: Any) -> None:
        if self.armed and self.fail_drops:
            self.fail_drops -= 1
            raise TierError(self.name, key, "injected delete failure")
        super()._discard(key, handle)

    def _store(self, key: str, tensor: torch.Tensor, room: int) -> tuple[Any, int]:
        if self.armed and self.fail_puts:
            self.fail_puts -= 1
            raise TierError(self.name, key, "injected write failure")
        return super()._store(key, tensor, room)

    def _fetch(self, key: str, handle: Any) -> torch.Tensor:
        if self.armed and self.fail_gets:
            self.fail_gets -= 1
            raise TierError(self.name, key, "injected read failure")
        return super()._fetch(key, handle)


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
    max_examples=60, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestResidencyMachine = ResidencyMachine.TestCase
