"""The manager's table: its entries, where each is, and the one lock that guards it all.

``Table.state`` is the only lock the manager takes, and it is never held across tier I/O. An
entry that is being moved (or freed, or checked) is marked ``moving`` by the one thread doing
it, under ``state``; no other thread moves or leases it until that thread clears the mark and
notifies. So moves of different entries run at once, and a slow tier holds up only the entries
moving through it.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from memplan.errors import AlreadyManaged, EntryInUse, NoSuchEntry, TierError
from memplan.residency._groups import Group
from memplan.residency.eviction import Candidate, Eviction
from memplan.residency.policy import RetentionPolicy
from memplan.residency.tiers.base import Tier

__all__ = ["Entry", "EntryInfo", "Move", "Table"]


@dataclass(frozen=True)
class Move:
    """One entry moving between tiers, and why."""

    entry: str
    source: str
    target: str
    nbytes: int  # bytes written to the target (keys it already held cost nothing)
    reason: str
    at: float
    seconds: float = 0.0  # the copy and its read-back, measured


@dataclass(frozen=True)
class EntryInfo:
    name: str
    tier: str
    nbytes: int
    leases: int
    uses: int
    last_use: float
    pinned_tier: str | None
    needs: tuple[str, ...]
    policy: RetentionPolicy
    promotions: int = 0
    demotions: int = 0


@dataclass
class Entry:
    name: str
    group: Group
    policy: RetentionPolicy
    needs: tuple[str, ...]
    tier: int
    last_use: float
    leases: int = 0
    uses: int = 0
    pinned: int | None = None
    moving: bool = False  # claimed by one thread for a move, a release or a check
    moved: Counter[str] = field(default_factory=Counter)  # "promotions", "demotions"


class Table:
    """Entries by name, the tiers they live on, and the counters, under one ``state`` lock."""

    def __init__(self, tiers: Sequence[Tier], eviction: Eviction, clock: Callable[[], float]) -> None:
        self.tiers = list(tiers)
        self.eviction = eviction
        self.clock = clock
        self.state = threading.Condition(threading.RLock())
        self.entries: dict[str, Entry] = {}
        self.pending: dict[str, Group] = {}  # registrations under way: their names are taken
        self.wanted: Counter[str] = Counter()  # uses under way, by name: not demoted to make room
        self.counts: Counter[str] = Counter()

    # -- lookup (callers hold ``state``) ------------------------------------------------
    def entry(self, name: str) -> Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise NoSuchEntry(name) from None

    def tier_index(self, name: str) -> int:
        for i, tier in enumerate(self.tiers):
            if tier.name == name:
                return i
        names = ", ".join(t.name for t in self.tiers)
        raise TierError(name, None, f"not one of this manager's tiers ({names})")

    def info(self, e: Entry) -> EntryInfo:
        pinned = self.tiers[e.pinned].name if e.pinned is not None else None
        return EntryInfo(
            e.name, self.tiers[e.tier].name, e.group.nbytes, e.leases, e.uses, e.last_use,
            pinned, e.needs, e.policy, e.moved["promotions"], e.moved["demotions"],
        )  # fmt: skip

    def count(self, what: str, n: int = 1) -> None:
        with self.state:
            self.counts[what] += n

    def closure(self, entry: Entry) -> list[Entry]:
        """``entry`` and everything it needs, transitively; needed entries first."""
        seen: dict[str, Entry] = {}

        def visit(e: Entry) -> None:
            if e.name in seen:
                return
            seen[e.name] = e
            for need in e.needs:
                visit(self.entry(need))

        visit(entry)
        return list(reversed(seen.values()))

    def first_addressable(self) -> int:
        return next(i for i, t in enumerate(self.tiers) if t.addressable)

    def settled(self, entry: Entry) -> bool:
        """A lease of ``entry`` moves nothing: it is leased already, or it can run where it is
        and is pinned there or on the fastest tier it could run on."""
        if entry.leases:
            return True
        if not self.tiers[entry.tier].addressable:
            return False
        return entry.pinned is not None or entry.tier == self.first_addressable()

    def blocked(self, entry: Entry, index: int) -> str | None:
        """Why ``entry`` cannot leave tier ``index`` now, or None."""
        if entry.moving:
            return "moving"
        if entry.leases:
            return "leased"
        if entry.pinned is not None:
            return f"pinned to {self.tiers[entry.pinned].name}"
        for other in self.entries.values():
            if entry.name in other.needs and other.tier <= index:
                return f"needed by {other.name}, resident on {self.tiers[other.tier].name}"
        return None

    def candidate(self, entry: Entry, at: int | None = None) -> Candidate:
        """``entry`` as eviction sees it, on its tier or, given ``at``, as if on that one."""
        index = entry.tier if at is None else at
        below = self.tiers[min(index + 1, len(self.tiers) - 1)]
        cost = below.latency_s + entry.group.nbytes / below.bandwidth
        return Candidate(
            entry.name, entry.group.nbytes, entry.last_use, entry.uses, entry.policy.priority, cost
        )

    def touch(self, entry: Entry) -> None:
        entry.uses += 1
        entry.last_use = self.clock()
        self.eviction.touched(entry.name)

    # -- claims ------------------------------------------------------------------------
    @contextlib.contextmanager
    def claimed(self, entry: Entry, what: str) -> Iterator[None]:
        """Mark ``entry`` moving for the block, once no other thread has it (waiting for that one
        to land); a leased entry is refused, since leased means never moved."""
        with self.state:
            while entry.moving:
                self.state.wait()
            if entry.leases:
                raise EntryInUse(entry.name, f"leased; cannot {what} it")
            if self.entries.get(entry.name) is not entry:
                raise NoSuchEntry(entry.name)  # unregistered while this thread waited
            entry.moving = True
        try:
            yield
        finally:
            self.land(entry)

    def try_claim(self, entry: Entry) -> str | None:
        """Mark ``entry`` moving if nothing holds it on its tier (no wait); else why not."""
        with self.state:
            why = self.blocked(entry, entry.tier)
            if why is None:
                entry.moving = True
            return why

    def land(self, *entries: Entry) -> None:
        """Clear the moving mark of ``entries`` and wake whoever waits for one to land."""
        with self.state:
            for entry in entries:
                entry.moving = False
            self.state.notify_all()

    def wait_quiet(self) -> None:
        """Until no entry is marked moving and no registration is under way (caller holds
        ``state``)."""
        while self.pending or any(e.moving for e in self.entries.values()):
            self.state.wait()

    # -- registration ------------------------------------------------------------------
    def refuse_managed(self, name: str, group: Group) -> None:
        """Refuse a group holding a module (the same one, a submodule or a parent of one) or a
        tensor an entry already manages, or one a registration under way holds: demoting that
        entry would empty the other's module under its lease. Caller holds ``state``."""
        owners = {id(slot.owner) for r in group.records for slot in r.slots if slot.owner is not None}
        tensors = {id(tensor) for tensor in group.originals.values()}
        others = [(e.name, e.group) for e in self.entries.values()] + list(self.pending.items())
        for other_name, other in others:
            shared = [t for t in group.originals.values() if _taken(other, t)]
            if shared:  # tied to a tensor the other entry was registered with
                path = next(r.path for r in group.records if group.originals[r.private_key] is shared[0])
                raise AlreadyManaged(name, other_name, path)
            for record in other.records:
                for slot in record.slots:
                    if slot.owner is None:
                        continue
                    if id(slot.owner) in owners or id(getattr(slot.owner, slot.attr, None)) in tensors:
                        raise AlreadyManaged(name, other_name, record.path)


def _taken(group: Group, tensor: Any) -> bool:
    """Whether ``group`` was registered with ``tensor`` itself (not an equal one)."""
    held = group.taken.get(id(tensor))
    return held is not None and held() is tensor
