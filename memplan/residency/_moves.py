"""Moving entries between tiers, several at once.

A move reserves room on its target and (where that is short) claims victims to demote, all
under the state lock; copies, reads back and frees with no lock held; and publishes the entry's
new tier under the state lock. The caller has claimed the entry it moves (``Table.claimed``).
A reservation counts against a tier's free room until the copy has landed, so two moves never
promise each other the same bytes; the tier's own capacity check stays the last word.

Nothing here waits while holding a claim, except for a key another thread is putting or
dropping (``KeyStore``), which waits on tier I/O alone: so no two moves can wait on each other.
Room that is short is made by demoting entries that nothing holds; one that another move has
claimed is skipped, not waited for, and where nothing else can go the move fails with
``TierFull`` (a lease retries it).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from memplan._logtext import failure_text
from memplan.errors import EntryInUse, MemplanError, PinViolation, TierError, TierFull
from memplan.residency._entries import Entry, Move, Table
from memplan.residency._keystore import KeyStore

__all__ = ["Mover"]

log = logging.getLogger("memplan.residency")


class Mover:
    """Moves, room making and their records, over one table and key store."""

    def __init__(self, table: Table, keys: KeyStore) -> None:
        self.table, self.keys = table, keys
        self.tiers, self.state = table.tiers, table.state
        self.reserved = [0 for _ in self.tiers]  # bytes promised to copies not landed yet
        self.routes: Counter[str] = Counter()  # bytes written, by "source->target"
        self.moves: deque[Move] = deque(maxlen=1000)
        self.seconds: dict[tuple[int, int], tuple[int, float]] = {}  # (source, target): bytes, seconds
        # Drops ``entry`` (claimed) instead of demoting it, given the seconds keeping it below
        # would cost (None: no room below); True if it did. Set by the models added by name.
        self.drop: Callable[[Entry, float | None, str], bool] | None = None
        self.admission = False  # True: a use promotes an entry over others only where it is worth more

    def free(self, index: int) -> int:
        """Bytes on tier ``index`` that no copy has been promised (caller holds the state lock).
        A copy's bytes count twice while it lands (used, and still reserved): never below 0."""
        return max(0, self.tiers[index].available - self.reserved[index])

    # -- room --------------------------------------------------------------------------
    @contextlib.contextmanager
    def room(
        self, entry: Entry, index: int, protect: set[str], reason: str, *, evict: bool, admit: bool = False
    ) -> Iterator[None]:
        """Room for ``entry`` on tier ``index``, reserved for the block; made by demoting idle
        entries (not those in ``protect``) where ``evict``, else only the free room is taken.
        ``admit``: demote only entries the eviction policy values less than ``entry``."""
        reserved = self._room(
            entry.name, index, lambda: self.keys.needed(entry.group, index), protect, reason,
            evict=evict, hold=True, entrant=entry if admit else None,
        )  # fmt: skip
        try:
            yield
        finally:
            with self.state:
                self.reserved[index] -= reserved
                self.state.notify_all()

    def make_room(self, owner: str, index: int, nbytes: int, reason: str) -> None:
        """Demote idle entries from tier ``index`` until ``nbytes`` are free there, for ``owner``
        (not reserved); ``TierFull``, and nothing moved, where that cannot be done."""
        self._room(owner, index, lambda: nbytes, set(), reason, evict=True, hold=False)

    def _room(
        self, owner: str, index: int, needed: Callable[[], int], protect: set[str], reason: str,
        *, evict: bool, hold: bool, entrant: Entry | None = None,
    ) -> int:  # fmt: skip
        stuck = set(protect) | {owner}
        while True:
            with self.state:
                wanted, free = needed(), self.free(index)
                if wanted <= free:
                    self.reserved[index] += wanted if hold else 0
                    return wanted if hold else 0
                victim = self._victim(index, wanted - free, stuck) if evict else None
                if victim is None or (entrant is not None and self._worth_less(entrant, victim, index)):
                    raise TierFull(self.tiers[index].name, owner, wanted, max(free, 0))
                victim.moving = True
                chosen = self.table.candidate(victim)
            try:
                self.demote(victim, stuck | {victim.name}, reason, may_drop=True)
            except (TierError, EntryInUse):
                stuck.add(victim.name)  # nowhere below has room for it
                continue
            finally:
                self.table.land(victim)
            with self.state:
                self.table.counts["evictions"] += 1
                self.table.eviction.evicted(chosen)

    def _worth_less(self, entrant: Entry, victim: Entry, index: int) -> bool:
        """Whether the eviction policy values ``entrant``, were it on tier ``index``, below
        ``victim``: admitting it would evict what pays more to keep (caller holds state)."""
        first = self.table.eviction.order(
            [self.table.candidate(entrant, at=index), self.table.candidate(victim)]
        )
        return first[0].name == entrant.name

    def _victim(self, index: int, short: int, stuck: set[str]) -> Entry | None:
        """The entry to demote from tier ``index`` first, or None where demoting every movable
        one would not free ``short`` bytes (that would only waste moves); caller holds state."""
        last = index + 1 >= len(self.tiers)  # only entries that may be dropped can leave it
        tier, refs = self.tiers[index], self.keys.refs[index]
        movable = [
            e for e in self.table.entries.values()
            if e.tier == index and e.name not in stuck and self.table.blocked(e, index) is None
            and (e.policy.drop or not last) and not self.table.wanted[e.name]
        ]  # fmt: skip
        evictable = sum(
            tier.size_of(key) for e in movable for key in e.group.sizes(tier.addressable) if refs[key] == 1
        )
        if not movable or evictable < short:
            return None
        first = self.table.eviction.order([self.table.candidate(e) for e in movable])[0]
        return self.table.entries[first.name]

    # -- moves -------------------------------------------------------------------------
    def move(self, entry: Entry, target: int, protect: set[str], reason: str, *, admit: bool = False) -> None:
        """Copy ``entry`` (claimed by the caller) to tier ``target``, making room there; read it
        back, publish, then free the old copy. If the copy or the read-back fails, the entry
        stays whole where it was and nothing it wrote stays on ``target``."""
        source = entry.tier
        if source == target:
            return
        started = time.perf_counter()
        with self.room(entry, target, protect, f"room for {entry.name}", evict=True, admit=admit):
            written = self.keys.copy_in(entry.group, target, source)
        try:
            tensors = self.keys.read_back(entry.group, target)
        except BaseException as exc:
            self.keys.release_quietly(entry.group, target)
            if isinstance(exc, MemplanError):
                self.table.count("failures")
            raise
        seconds = time.perf_counter() - started
        with self.state:
            entry.tier = target
            bind(entry, tensors)  # before the release, so no module still holds what is freed
        self.keys.release(entry.group, source)
        self._record(entry, source, target, written, reason, seconds)

    def _record(
        self, entry: Entry, source: int, target: int, written: int, reason: str, seconds: float
    ) -> None:
        kind = "promotions" if target < source else "demotions"
        src, dst = self.tiers[source].name, self.tiers[target].name
        with self.state:
            self.routes[f"{src}->{dst}"] += written
            self.table.counts[kind] += 1
            entry.moved[kind] += 1
            total, spent = self.seconds.get((source, target), (0, 0.0))
            self.seconds[source, target] = (total + entry.group.nbytes, spent + seconds)
        self.moves.append(Move(entry.name, src, dst, written, reason, time.time(), seconds))

    def measured_rate(self, source: int, target: int) -> float | None:
        """Bytes a second moves from ``source`` to ``target`` have taken here, or None: none yet."""
        with self.state:
            total, spent = self.seconds.get((source, target), (0, 0.0))
        return total / spent if total and spent > 0 else None

    def demote(self, entry: Entry, protect: set[str], reason: str, *, may_drop: bool = False) -> None:
        """``entry`` (claimed) one tier down, or further down where that one has no room.
        ``may_drop``: the manager's own demotion, which the ``drop`` hook may answer by dropping
        the entry instead (cheaper to load again than to keep below, or no room below)."""
        if may_drop and self.drop is not None and self.drop(entry, self.keep_seconds(entry), reason):
            return
        last: TierError | None = None
        for target in range(entry.tier + 1, len(self.tiers)):
            try:
                self.move(entry, target, protect | {entry.name}, reason)
                return
            except TierError as exc:
                last = exc
        if may_drop and self.drop is not None and self.drop(entry, None, reason):
            return
        raise last or TierError(self.tiers[entry.tier].name, entry.name, "already on the slowest tier")

    def can_go_down(self, entry: Entry) -> bool:
        """Whether a tier lies below ``entry``'s, or it may be dropped instead."""
        return entry.tier + 1 < len(self.tiers) or entry.policy.drop

    def demote_if_free(self, entry: Entry, reason: str) -> bool | None:
        """The manager's own demotion (may drop) of ``entry`` if nothing holds it: None where
        something does (leased, pinned, needed, moving), False where the demotion failed
        (logged; the entry stays whole where it was), True where it left its tier."""
        if self.table.try_claim(entry) is not None:
            return None
        try:
            self.demote(entry, {entry.name}, reason, may_drop=True)
            return True
        except TierError as exc:
            log.warning("could not demote %s (%s): %s", entry.name, reason, failure_text(exc))
            return False
        finally:
            self.table.land(entry)

    def keep_seconds(self, entry: Entry) -> float | None:
        """Seconds demoting ``entry`` one tier costs, now and at its next use: the write down
        and the promotion back, each at the rate measured on that route (the tiers' nominal
        bandwidth before any such move). None where it is on the slowest tier."""
        below = entry.tier + 1
        if below >= len(self.tiers):
            return None
        back = self.table.first_addressable()
        nbytes = entry.group.nbytes
        down = self.measured_rate(entry.tier, below) or self.tiers[below].bandwidth
        up = self.measured_rate(below, back) or self.tiers[below].bandwidth
        return nbytes / down + self.tiers[below].latency_s + nbytes / up

    def promote(self, entry: Entry, protect: set[str]) -> None:
        """``entry`` (claimed) onto the fastest addressable tier that can make room without
        breaking pins or leases.

        When no tier has room the entry stays where it is (if it can be used there); a failure
        other than room (its copy cannot be read) is raised as it is.
        """
        if entry.pinned is not None:
            if not self.tiers[entry.tier].addressable:
                raise PinViolation(
                    entry.name,
                    f"pinned to {self.tiers[entry.tier].name}, where it cannot be used; "
                    "unpin it or pin it to a tier it can run on",
                )
            return
        cause: TierError | None = None
        runs_here = self.tiers[entry.tier].addressable
        for target in range(0, entry.tier):
            if not self.tiers[target].addressable:
                continue
            try:
                # Where it can run already, it moves up only over entries worth less.
                self.move(entry, target, protect, "use", admit=self.admission and runs_here)
                return
            except TierFull:
                continue
            except TierError as exc:
                cause = cause or exc
        if not self.tiers[entry.tier].addressable:
            first = self.tiers[0]
            raise cause or TierFull(first.name, entry.name, entry.group.nbytes, first.available)
        if cause is not None:
            log.warning("%s stays on %s: %s", entry.name, self.tiers[entry.tier].name, failure_text(cause))

    # -- newcomers ---------------------------------------------------------------------
    def place_new(self, entry: Entry, order: Sequence[int]) -> None:
        """Onto the first tier of ``order`` whose free room takes the newcomer's tensors and
        hands them back (newcomers evict nobody); where one fails, what was written there goes
        again before the next is tried."""
        last: TierError | None = None
        for index in order:
            try:
                with self.room(entry, index, set(), "register", evict=False):
                    self.keys.copy_in(entry.group, index, entry.group.originals)
                entry.tier = index
                bind(entry, self.keys.read_back(entry.group, index))
                return
            except BaseException as exc:
                if entry.tier >= 0 and isinstance(exc, MemplanError):
                    self.table.count("failures")  # the read-back failed (copy_in counts its own)
                self.abandon(entry)
                if not isinstance(exc, TierError):
                    raise
                last = exc
        raise last or TierFull(self.tiers[-1].name, entry.name, entry.group.nbytes, 0)

    def abandon(self, entry: Entry) -> None:
        """Undo an unpublished registration: free the keys it holds on its tier and give the
        caller's module its own tensors back. Never raises an ``Exception``: the failure that
        brought it here is the one the caller sees."""
        index, entry.tier = entry.tier, -1
        try:
            entry.group.restore()
        except Exception as exc:
            log.error("could not give %s its own tensors back: %s", entry.name, failure_text(exc, trace=True))
        if index >= 0:
            self.keys.release_quietly(entry.group, index)


def bind(entry: Entry, tensors: dict[str, Any] | None) -> None:
    """Plug what the key store's ``read_back`` gave into the entry's module, or unplug it."""
    if tensors is not None:
        entry.group.attach(tensors)
    else:
        entry.group.release()
