"""Thousands of random register / use / write / release / pin / unpin / pressure / tier-failure
steps, some of them run two or three at once on threads; after each one the manager's books must
balance, and every tensor a lease holds must read exactly what the model of it says (writes
through a lease included, and never another entry's)."""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
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
# Run at once, on the first few names (so that they meet): mostly moves.
CONCURRENT_OPS = ["use", "use", "demote", "demote", "pin", "unpin", "pressure", "register", "unregister"]


def stacks() -> str:
    """Every thread's stack, for a watchdog's failure message."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(
        f"--- thread {names.get(ident, ident)}\n{''.join(traceback.format_stack(frame))}"
        for ident, frame in sys._current_frames().items()
    )


def run_at_once(ops: list[Callable[[], object]], timeout_s: float = 30.0) -> list[BaseException | None]:
    """Run ``ops`` on threads released together; what each raised (None: it returned). One still
    running after ``timeout_s`` fails the test with every thread's stack (a deadlock)."""
    start = threading.Barrier(len(ops))
    raised: list[BaseException | None] = [None] * len(ops)

    def run(i: int) -> None:
        try:
            start.wait()
            ops[i]()
        except BaseException as exc:
            raised[i] = exc

    threads = [threading.Thread(target=run, args=(i,), name=f"op-{i}", daemon=True) for i in range(len(ops))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"{alive} still running after {timeout_s}s (a deadlock?)\n{stacks()}"
    return raised


class InjectedFaults(Tier):
    """Mixed into a tier: its next ``fail_puts`` puts, ``fail_gets`` gets and ``fail_drops``
    drops raise ``raises(tier, key, why)`` (a :class:`TierError`, as a flaky disk would, unless
    set to e.g. a Ctrl-C), after the first ``passes[op]`` of them go through. Each waits
    ``delay_s`` first (a slow tier, so that operations on threads overlap)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay_s = 0.0
        self.fail_puts = self.fail_gets = self.fail_drops = 0
        self.armed = True
        self.raises: Callable[[str, str, str], BaseException] = TierError
        self.passes = {"put": 0, "get": 0, "drop": 0}

    def _inject(self, op: str, key: str, why: str) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
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
        self.leased_on: dict[str, str] = {}  # the tier each leased entry was leased on

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
            self.leased_on.setdefault(name, self.rm.tier_of(name).name)

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
        name, cm, _ = self.leases.pop(which % len(self.leases))
        cm.__exit__(None, None, None)
        if all(held != name for held, _, _ in self.leases):
            del self.leased_on[name]

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

    @rule(
        ops=st.lists(
            st.tuples(st.sampled_from(CONCURRENT_OPS), st.sampled_from(NAMES[:3])), min_size=2, max_size=3
        ),
        tier=st.sampled_from([None, "gpu", "host", "disk"]),
        ratio=st.sampled_from([0.75, 0.85, 0.97]),
        size=st.integers(1, 600),
        delay_s=st.sampled_from([0.0, 0.0005]),
    )
    def concurrently(
        self, ops: list[tuple[str, str]], tier: str | None, ratio: float, size: int, delay_s: float
    ) -> None:
        """Two or three operations at once (over tiers slow enough, with ``delay_s``, that they
        overlap); each either does what it says or is refused, and a lease taken meanwhile reads
        the entry as it was, or as registered meanwhile."""
        kept: list[tuple[str, str]] = []
        for op, name in ops:  # one registration (of a free name) and one unregistration at most
            taken = op == "register" and name in self.rm
            if op in ("register", "unregister") and (op in dict(kept) or taken):
                continue
            kept.append((op, name))
        if len(kept) < 2:
            return
        ops, registering = kept, dict(kept).get("register")
        fresh = {
            "t0": torch.randn(size, generator=torch.Generator().manual_seed(size)),
            "shared": torch.ones(128),
        }
        could_read = {name: [tensors] for name, tensors in self.originals.items()}
        if registering is not None:
            could_read.setdefault(registering, []).append(fresh)

        def use(name: str) -> None:
            with self.rm.use(name) as got:
                assert any(
                    set(got) == set(one) and all(torch.equal(got[k], t) for k, t in one.items())
                    for one in could_read[name]
                ), f"{name}: a lease read tensors that were never its own"

        actions: dict[str, Callable[[str], object]] = {
            "use": use,
            "demote": self.rm.demote,
            "pin": lambda name: self.rm.pin(name, tier),
            "unpin": self.rm.unpin,
            "pressure": lambda name: self.rm.apply_pressure(ratio),
            "register": lambda name: self.rm.register(name, {k: v.clone() for k, v in fresh.items()}),
            "unregister": self.rm.unregister,
        }
        for slow in self.tiers:
            slow.delay_s = delay_s
        switching = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)  # threads take turns often: more interleavings per step
        try:
            raised = run_at_once([lambda op=op, name=name: actions[op](name) for op, name in ops])
        finally:
            sys.setswitchinterval(switching)
            for slow in self.tiers:
                slow.delay_s = 0.0
        for (op, name), exc in zip(ops, raised, strict=True):
            if exc is not None and not isinstance(exc, MemplanError):
                raise AssertionError(f"{op} {name} raised {exc!r}") from exc
            if op == "register" and exc is None:
                self.originals[name] = fresh
        for name in list(self.originals):
            if name not in self.rm:
                del self.originals[name]

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
                    for key in self.rm._table.entries[name].group.sizes(tier.addressable)
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
            for name, tier in self.leased_on.items():  # nothing moves a leased entry
                assert self.rm.tier_of(name).name == tier, f"{name} moved off {tier} under its lease"
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
