"""The residency manager: named tensor groups kept on the fastest tier where they pay.

Tiers are given fastest first (e.g. gpu, host, disk, remote). Every entry lives on exactly one
tier; a move copies its tensors down or up and then frees them where they were, so a failure
halfway leaves the entry whole where it was. Identical tensors are stored once on the tiers
that decode a fresh copy on every read (content-addressed keys with reference counts); on
addressable tiers, where a lease's writes land in the stored tensor, each entry has its own.
Each tier's ``used`` always equals the bytes of the keys its entries hold there, plus keys a
failed drop left behind (``orphans``), which are retried.

The parts, one job each: ``_entries`` (the table and its one lock), ``_keystore`` (keys and
their counts), ``_moves`` (room, moves, newcomers), ``_pressure_response`` and ``_idle`` (what
the manager's own worker does), ``_added`` (models added by name).

Locks, in the order they may be taken:

1. an added model's loading lock (``_added``), held across its load: concurrent first uses of
   one model load it once;
2. ``Table.state``, the manager's one lock: held for table changes, never across tier I/O;
3. a tier's own lock, taken inside tier calls, which never call back.

Claims are not locks but marks set under ``state``: an entry marked ``moving`` belongs to the one
thread moving, freeing or checking it (others wait for it to land); a key marked busy in the key
store belongs to the one thread putting or dropping it. A thread holding a claim never waits for
another claim, except for a busy key, whose holder waits on tier I/O alone; so moves of
different entries run at once, a slow or hung tier holds up only the entries moving through it,
and no two threads can wait on each other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from memplan._logtext import failure_text
from memplan._periodic import Periodic
from memplan.errors import (
    DoesNotFit,
    EntryExists,
    EntryInUse,
    InvalidEntry,
    InvalidOption,
    ManagerClosed,
    NoSuchEntry,
    PinViolation,
    TierFull,
)
from memplan.gpu import Device
from memplan.residency._added import Added, AddedModels, check_model_args
from memplan.residency._entries import Entry, EntryInfo, Move, Table
from memplan.residency._groups import Group, digest_of
from memplan.residency._idle import idle_pass
from memplan.residency._keystore import KeyStore
from memplan.residency._moves import Mover
from memplan.residency._pressure_response import respond
from memplan.residency.eviction import GDSF, Eviction
from memplan.residency.models import ModelSource
from memplan.residency.policy import RetentionPolicy
from memplan.residency.pressure import PressureResponse
from memplan.residency.tiers.base import Tier

__all__ = ["EntryInUse", "EntryInfo", "ManagerStats", "Move", "ResidencyManager"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManagerStats:
    entries: int
    leased: int
    hits: int  # uses served by the tier the entry already was on
    misses: int  # uses that had to move it up
    promotions: int
    demotions: int
    evictions: int  # demotions to make room
    bytes_moved: int
    bytes_by_route: dict[str, int]
    dedup_saved_bytes: int
    pressure_responses: int
    failures: int
    tiers: tuple[Any, ...]  # TierStats of each tier, fastest first
    loads: int = 0  # models added by name, loaded by a use (again after a drop)
    drops: int = 0  # such models dropped rather than demoted
    bytes_loaded: int = 0  # read by those loads (from checkpoints, or the quantized-weights cache)


class ResidencyManager:
    """Entries on ``tiers`` (fastest first), evicted by ``eviction`` (GDSF by default).

    ``admission``: a use of an entry that can run where it is moves it up only over entries the
    eviction policy values less (as a cache admits only what is worth more than what it evicts),
    and otherwise leases it where it is; by default a use moves it up wherever room can be made.

    Use it as a context manager, or call :meth:`start` and :meth:`close`, to run the idle
    cleanup thread every ``interval_s`` seconds.
    """

    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        eviction: Eviction | None = None,
        dedup: bool = True,
        interval_s: float = 1.0,
        clock: Any = time.monotonic,
        admission: bool = False,
    ) -> None:
        if not tiers:
            raise InvalidOption("tiers", list(tiers), "hold at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise InvalidOption("tier names", names, "differ")
        self.tiers = list(tiers)
        self.eviction = eviction or GDSF()
        self.dedup = dedup
        self.interval_s = interval_s
        self.clock = clock
        self._table = Table(self.tiers, self.eviction, clock)
        self._state = self._table.state
        self._keys = KeyStore(self._table, dedup=dedup)
        self._mover = Mover(self._table, self._keys)
        self._mover.admission = admission
        self._models = AddedModels(self._mover, self._keys)
        self.responses: deque[PressureResponse] = deque(maxlen=100)
        self._worker = Periodic("memplan-residency", interval_s, self._work)
        self._pressure: dict[Device | None, float] = {}  # the latest reading per device, not yet answered

    @property
    def moves(self) -> deque[Move]:
        """The last 1,000 moves, oldest first."""
        return self._mover.moves

    # -- lookup --------------------------------------------------------------------------
    def _tier_index(self, name: str) -> int:
        return self._table.tier_index(name)

    def __contains__(self, name: object) -> bool:
        with self._state:
            return name in self._table.entries or name in self._models.sources

    def names(self) -> list[str]:
        """Entries registered (models added by name once loaded)."""
        with self._state:
            return list(self._table.entries)

    def unloaded(self) -> list[str]:
        """Models added by name that no use has loaded yet."""
        return self._models.unloaded()

    def tier_of(self, name: str) -> Tier:
        with self._state:
            return self.tiers[self._table.entry(name).tier]

    def info(self, name: str) -> EntryInfo:
        with self._state:
            return self._table.info(self._table.entry(name))

    # -- registration --------------------------------------------------------------------
    def register(
        self,
        name: str,
        obj: Any,
        *,
        policy: RetentionPolicy | None = None,
        needs: Sequence[str] = (),
        tier: str | None = None,
    ) -> EntryInfo:
        """Take charge of ``obj`` (an ``nn.Module`` or a mapping of tensors) as entry ``name``.

        Its tensors are copied to ``tier`` (default: the policy's pinned tier, else the fastest
        tier with free room; nothing is evicted for a newcomer) and the module's own
        tensors are replaced by the tier's, or by meta tensors if that tier is not addressable.
        A model from :func:`memplan.load` hands its device budget over to the tiers.

        If it fails (or is interrupted), nothing it wrote stays on any tier and ``obj`` keeps its
        own tensors.
        """
        return self._register(name, obj, policy, needs, tier, added=None)

    def _register(
        self, name: str, obj: Any, policy: RetentionPolicy | None, needs: Sequence[str], tier: str | None,
        *, added: Added | None,
    ) -> EntryInfo:  # fmt: skip
        """:meth:`register`; ``added``: what :meth:`add_model` kept for the model ``obj`` is."""
        policy = policy or RetentionPolicy()
        table = self._table
        # Keys of its own: one a failed registration could not free is never read again.
        group = Group(name, obj, dedup=self.dedup, salt=uuid.uuid4().hex)
        with self._state:
            self._refuse_closed(name, "register")
            if name in table.entries or name in table.pending or (name in self._models.sources and not added):
                raise EntryExists(name)
            self._models.check_current(name, added)
            for need in needs:
                table.entry(need)
            table.refuse_managed(name, group)
            table.pending[name] = group
        try:
            entry = Entry(name, group, policy, tuple(needs), tier=-1, last_use=self.clock())
            self._mover.place_new(entry, self._placement_order(entry, tier or policy.pinned_tier))
            with self._state:
                entry.pinned = self._tier_index(policy.pinned_tier) if policy.pinned_tier else None
                try:
                    self._refuse_closed(name, "register")
                    self._models.check_current(name, added)
                except (InvalidEntry, NoSuchEntry):
                    self._mover.abandon(entry)  # closed, or forgotten, while it was copied: void
                    raise
                table.entries[name] = entry
                info = table.info(entry)  # from here on it may move, or (a model) be dropped
        finally:
            with self._state:
                table.pending.pop(name, None)
                self._state.notify_all()  # a close() waits for registrations under way
        group.drop_originals()
        _release_load_budget(obj)
        return info

    def _refuse_closed(self, name: str, what: str) -> None:
        """Caller holds the state lock."""
        if self._models.closed:
            raise ManagerClosed(name, what)

    def _placement_order(self, entry: Entry, tier: str | None) -> list[int]:
        if tier:
            return [self._tier_index(tier)]
        with self._state:  # newcomers take free room only; they evict nobody
            fits = [
                i for i in range(len(self.tiers)) if self._mover.free(i) >= self._keys.needed(entry.group, i)
            ]
        return fits or [len(self.tiers) - 1]

    def add_model(
        self,
        name: str,
        source: str | os.PathLike[str],
        *,
        policy: RetentionPolicy | None = None,
        workload: Any = None,
        revision: str | None = None,
        model_cls: Any = None,
    ) -> None:
        """Register the model at ``source`` (anything :func:`memplan.load` takes) as entry
        ``name`` without loading it: its first :meth:`use` loads it, whole, in its own dtype,
        planned for the room on the fastest addressable tier that holds it (its free room, or
        room made by demoting idle entries as a promotion would; nothing moves where that
        would not be enough), then leases it as any entry. A source that does not
        load raises the loader's error there and stays added, unloaded, for the next use."""
        check_model_args(name, source, policy, workload, revision, model_cls)
        added = ModelSource(source, workload, revision, model_cls)
        self._models.add(name, added, policy or RetentionPolicy())

    def _register_loaded(
        self, name: str, model: Any, policy: RetentionPolicy, tier: str | None, added: Added
    ) -> Any:
        return self._register(name, model, policy, (), tier, added=added)

    def unregister(self, name: str) -> None:
        """Forget ``name`` and free its bytes on every tier. Its module is left with meta tensors.
        A model added by name is forgotten too, loaded or not."""
        table = self._table
        with self._state:
            if name in self._models.sources and name not in table.entries:
                self._models.forget(name)
                return
            entry = table.entry(name)
            if entry.pinned is not None:
                raise PinViolation(name, "unpin it before unregistering")
            dependants = [e.name for e in table.entries.values() if name in e.needs]
            if dependants:
                raise EntryInUse(name, f"needed by {', '.join(dependants)}")
        with table.claimed(entry, "unregister"):
            with self._state:  # gone first: an interrupted free leaves orphans, not a broken entry
                del table.entries[name]
                self._models.forget(name)
            try:
                self._keys.release(entry.group, entry.tier)
            finally:
                with self._state:
                    entry.group.release()
        self.eviction.forgotten(name)

    # -- leases, pins, explicit moves ------------------------------------------------------
    @contextlib.contextmanager
    def use(self, name: str, *, wait_s: float = 0.0) -> Iterator[Any]:
        """Lease ``name`` (and what it needs) on the fastest tier with room; yields the module
        or a mapping of its tensors. Leased entries are never moved, by anything.

        ``wait_s``: where no tier it can run from has room now, because what holds it is leased,
        pinned or moving (``TierFull``; for a model added by name and not loaded, ``DoesNotFit``
        while it would fit a tier's capacity), wait up to this long for a lease to end or a move
        to land, and try again; then raise that error. A model larger than every tier it could
        run from is refused at once."""
        with self._state:
            self._table.wanted[name] += 1  # room is made by demoting others, not what a use waits for
        try:
            group, handle = self._acquire(name, time.monotonic() + wait_s)
        finally:
            with self._state:
                self._table.wanted[name] -= 1
                if not self._table.wanted[name]:
                    del self._table.wanted[name]
        try:
            yield handle
        finally:
            with self._state:
                for e in group:
                    e.leases -= 1
                    e.last_use = self.clock()
                self._state.notify_all()

    def _acquire(self, name: str, deadline: float) -> tuple[list[Entry], Any]:
        while True:
            try:
                self._models.load_if_added(name, self._register_loaded)  # a void load raises
                try:
                    return self._lease(name)
                except NoSuchEntry:
                    with self._state:
                        dropped = name in self._models.sources  # since it loaded: load it again
                    if not dropped:
                        raise
            except (TierFull, DoesNotFit) as exc:
                if isinstance(exc, DoesNotFit) and not self._could_hold(exc.needed):
                    raise
                with self._state:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise
                    self._state.wait(min(left, 0.1))  # a lease ends or a move lands: try again

    def _could_hold(self, nbytes: int) -> bool:
        """Whether an addressable tier is large enough for ``nbytes`` once the others leave."""
        return any(t.addressable and t.capacity >= nbytes for t in self.tiers)

    def _lease(self, name: str) -> tuple[list[Entry], Any]:
        """Lease ``name``'s closure: at once where nothing has to move (the common case), else
        after claiming and promoting what must move, with no lock held while it moves."""
        table = self._table
        with self._state:
            while True:
                self._refuse_closed(name, "use")
                entry = table.entry(name)
                group = table.closure(entry)
                if not any(e.moving for e in group):
                    break
                self._state.wait()  # it lands soon; then decide afresh
            moving = [e for e in group if not table.settled(e)]
            before = entry.tier
            for e in group:
                e.leases += 1  # held while the others move: nothing demotes them meanwhile
            for e in moving:
                e.moving = True
        try:
            for e in moving:
                self._mover.promote(e, {g.name for g in group})
        except BaseException:
            with self._state:
                for e in group:
                    e.leases -= 1
            raise
        finally:
            table.land(*moving)
        with self._state:
            table.counts["hits" if entry.tier == before else "misses"] += 1
            for e in group:
                table.touch(e)
            return group, entry.group.handle()

    def pin(self, name: str, tier: str | None = None) -> None:
        """Keep ``name`` on ``tier`` (default: where it is now) until :meth:`unpin`. Pinning an
        entry where it is moves nothing, so a leased one may be pinned there."""
        with self._state:
            entry = self._table.entry(name)
            while entry.moving:
                self._state.wait()
            target = self._tier_index(tier) if tier else entry.tier
            if entry.pinned is not None and entry.pinned != target:
                raise PinViolation(name, f"already pinned to {self.tiers[entry.pinned].name}")
            if target == entry.tier:
                entry.pinned = target
                return
        with self._table.claimed(entry, "pin"):
            with self._state:  # pinned elsewhere while this thread waited for its claim
                if entry.pinned is not None and entry.pinned != target:
                    raise PinViolation(name, f"already pinned to {self.tiers[entry.pinned].name}")
            try:
                self._mover.move(entry, target, {name}, "pin")
            except TierFull as exc:
                raise PinViolation(
                    name,
                    f"{self.tiers[target].name} has no room without moving "
                    f"pinned or leased entries ({exc.reason})",
                ) from exc
            with self._state:
                entry.pinned = target

    def unpin(self, name: str) -> None:
        with self._state:
            self._table.entry(name).pinned = None

    def demote(self, name: str, tier: str | None = None, *, reason: str = "demote") -> None:
        """Move ``name`` down to ``tier`` (default: one tier down)."""
        table = self._table
        with self._state:
            entry = table.entry(name)
        with table.claimed(entry, "demote"):
            with self._state:
                if entry.pinned is not None:
                    raise PinViolation(name, f"pinned to {self.tiers[entry.pinned].name}")
                entry.moving = False  # blocked() counts its own claim as a reason
                why = table.blocked(entry, entry.tier)
                entry.moving = True
            if why:
                raise EntryInUse(name, why)
            if tier is None:
                self._mover.demote(entry, {name}, reason)
            else:
                self._mover.move(entry, self._tier_index(tier), {name}, reason)

    # -- idle cleanup --------------------------------------------------------------------
    def maintain(self) -> list[str]:
        """One idle-cleanup pass: demote entries idle past their ``max_idle_s`` by one tier, and
        retry freeing keys a failed drop left behind.

        Leased ones are skipped and retried on the next pass. Returns the entries demoted.
        """
        return idle_pass(self._mover, self._keys)

    def start(self) -> ResidencyManager:
        """Run :meth:`maintain` every ``interval_s`` on a daemon thread."""
        self._worker.interval_s = self.interval_s
        self._worker.start()
        return self

    def close(self) -> None:
        """Stop the thread and free every entry's bytes, except persistent entries' copies on
        durable tiers, which a later manager over the same tiers finds again."""
        table = self._table
        with self._state:
            leased = [e.name for e in table.entries.values() if e.leases]
            if leased:
                raise EntryInUse(", ".join(leased), "leased; release every lease before closing the manager")
            self._models.close()  # no pressure answered, no model added or loaded from here on
        self._worker.stop()
        with self._state:
            table.wait_quiet()  # moves and registrations under way land (or are voided) first
            entries = list(table.entries.values())
            table.entries.clear()
        for entry in entries:
            if not (entry.policy.persistent and self.tiers[entry.tier].durable):
                self._keys.release(entry.group, entry.tier)
            with self._state:
                entry.group.release()
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> ResidencyManager:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pressure ------------------------------------------------------------------------
    def signal_pressure(self, ratio: float, device: Device | None = None) -> None:
        """Note that ``device`` (default: every memory tier) is ``ratio`` full, and return at once:
        the manager's own worker answers with :meth:`apply_pressure`, so a sampler that signals
        goes on sampling while entries move. Readings not answered yet are replaced by newer ones."""
        _check_ratio(ratio)
        with self._state:
            if self._models.closed:
                return  # a monitor still driving a closed manager: nothing is left to move
            self._pressure[device] = ratio
        self._worker.start()  # running already: nothing happens
        self._worker.wake()

    def _work(self) -> None:
        """The worker's pass: answer the pressure signalled since the last one, then clean up."""
        with self._state:
            if self._models.closed:  # a signal that raced close() started this worker again
                self._worker.stop()
                return
            pending, self._pressure = self._pressure, {}
        for device, ratio in pending.items():
            try:
                self.apply_pressure(ratio, device)
            except Exception as exc:  # the other devices' readings are still answered
                log.error(
                    "memplan residency: answering pressure on %s failed: %s",
                    device,
                    failure_text(exc, trace=True),
                )
        self.maintain()

    def apply_pressure(self, ratio: float, device: Device | None = None) -> PressureResponse:
        """Respond to ``device`` (default: every memory tier) being ``ratio`` full; recorded."""
        _check_ratio(ratio)
        response = respond(self._mover, ratio, device)
        if response.level != "none":
            self.responses.append(response)
        return response

    # -- reading -------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Entries whose stored copies no longer match their checksums (should be []).

        It checks the copies a tier keeps to itself (disk, remote, compressed host), against the
        checksum taken when they came to rest there; on addressable tiers the stored tensor is
        the live one a lease may write, so there is nothing fixed to compare. Needs ``dedup``
        (without it nothing is hashed). An entry moving meanwhile is checked once it lands.
        """
        table, bad = self._table, []
        with self._state:
            entries = list(table.entries.values())
        for entry in entries:
            try:
                with table.claimed(entry, "verify"):
                    tier = self.tiers[entry.tier]
                    if not tier.addressable and any(
                        r.digest is not None and digest_of(tier.get(r.key)) != r.digest
                        for r in entry.group.records
                    ):
                        bad.append(entry.name)
            except (EntryInUse, NoSuchEntry):
                continue  # leased (so on a tier it runs from) or gone meanwhile
        return bad

    def stats(self) -> ManagerStats:
        with self._state:
            saved = sum(
                self.tiers[i].size_of(key) * (n - 1)
                for i, refs in enumerate(self._keys.refs)
                for key, n in refs.items()
            )
            c, entries, routes = self._table.counts, self._table.entries, self._mover.routes
            return ManagerStats(
                len(entries), sum(1 for e in entries.values() if e.leases),
                c["hits"], c["misses"], c["promotions"], c["demotions"], c["evictions"],
                sum(routes.values()), dict(routes), saved, len(self.responses), c["failures"],
                tuple(t.stats() for t in self.tiers), loads=c["loads"], drops=c["drops"],
                bytes_loaded=c["bytes_loaded"],
            )  # fmt: skip

    def held_bytes(self, tier: str) -> int:
        """Bytes the entries on ``tier`` hold there (shared keys once), plus keys a failed drop
        left there: always ``tier.used`` when no move is under way."""
        with self._state:
            index = self._tier_index(tier)
            keys = self._keys
            # A busy key is being put or dropped right now: it is counted once that lands.
            held = (set(keys.refs[index]) | keys.orphans[index]) - keys.busy[index]
            return sum(self.tiers[index].size_of(key) for key in held)

    def orphans(self, tier: str) -> list[str]:
        """Keys a failed drop left on ``tier``; :meth:`maintain` retries freeing them."""
        with self._state:
            return sorted(self._keys.orphans[self._tier_index(tier)])


def _check_ratio(ratio: object) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not ratio >= 0:
        raise InvalidOption("pressure ratio", ratio, "be a number from 0 (used / total)")


def _release_load_budget(obj: Any) -> None:
    """A model from :func:`memplan.load` holds its device reservations for its lifetime; once
    its tensors live on the manager's tiers, the tiers charge them, so the load's go (all but
    the streaming arena its streamed layers still run through: the handle's ``hand_over``)."""
    # Read by name, not through memplan.loaders: the loaders' quantized cache is built on the
    # disk tier, and residency does not import them back.
    hand_over = getattr(getattr(obj, "memplan", None), "hand_over", None)
    if hand_over is not None:
        hand_over()
