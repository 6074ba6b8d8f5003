"""The residency manager: named tensor groups kept on the fastest tier where they pay.

Tiers are given fastest first (e.g. gpu, host, disk, remote). Every entry lives on exactly one
tier; a move copies its tensors down or up and then frees them where they were, so a failure
halfway leaves the entry whole where it was. Identical tensors are stored once on the tiers
that decode a fresh copy on every read (content-addressed keys with reference counts); on
addressable tiers, where a lease's writes land in the stored tensor, each entry has its own.
Each tier's ``used`` always equals the bytes of the keys its entries hold there, plus keys a
failed drop left behind (``orphans``), which are retried.

Two locks: ``_lock`` orders every change of placement (moves, registration, pins) and is held
across their tier I/O; ``_state`` guards the table and is never held across I/O. An entry being
moved is marked ``moving``: a lease waits for it to land, and a lease of an entry that needs no
move takes only ``_state``, so it never waits behind another entry's slow disk or hung remote.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from memplan._periodic import Periodic
from memplan._torch_imported import imported_torch
from memplan.errors import (
    AlreadyManaged,
    DoesNotFit,
    EntryExists,
    EntryInUse,
    InvalidEntry,
    InvalidOption,
    MemplanError,
    NoSuchEntry,
    PinViolation,
    TierError,
    TierFull,
)
from memplan.gpu import Device
from memplan.planner import Workload
from memplan.residency._groups import Group, digest_of
from memplan.residency._keystore import KeyStore
from memplan.residency.eviction import GDSF, Candidate, Eviction
from memplan.residency.models import ModelSource, Room, model_loader
from memplan.residency.policy import RetentionPolicy
from memplan.residency.pressure import ACTIONS, PressureLevel, PressureResponse, level_for, rank
from memplan.residency.tiers.base import Tier

__all__ = ["EntryInUse", "EntryInfo", "ManagerStats", "Move", "ResidencyManager"]

log = logging.getLogger(__name__)


def _taken(group: Group, tensor: Any) -> bool:
    """Whether ``group`` was registered with ``tensor`` itself (not an equal one)."""
    held = group.taken.get(id(tensor))
    return held is not None and held() is tensor


@dataclass(frozen=True)
class Move:
    """One entry moving between tiers, and why."""

    entry: str
    source: str
    target: str
    nbytes: int  # bytes written to the target (keys it already held cost nothing)
    reason: str
    at: float


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


@dataclass
class _Entry:
    name: str
    group: Group
    policy: RetentionPolicy
    needs: tuple[str, ...]
    tier: int
    last_use: float
    leases: int = 0
    uses: int = 0
    pinned: int | None = None
    moving: bool = False


class ResidencyManager:
    """Entries on ``tiers`` (fastest first), evicted by ``eviction`` (GDSF by default).

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
        self.moves: deque[Move] = deque(maxlen=1000)
        self.responses: deque[PressureResponse] = deque(maxlen=100)
        self._entries: dict[str, _Entry] = {}
        # Models added by name: their sources, kept after loading (the name stays taken), and
        # one lock each so that concurrent first uses load a model once.
        self._models: dict[str, tuple[ModelSource, RetentionPolicy]] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.RLock()
        self._state = threading.Condition(threading.RLock())
        self._counts: Counter[str] = Counter()
        self._keys = KeyStore(self.tiers, self._state, self._counts, dedup=dedup)
        self._routes: Counter[str] = Counter()
        self._worker = Periodic("memplan-residency", interval_s, self._work)
        self._pressure: dict[Device | None, float] = {}  # the latest reading per device, not yet answered
        self._closed = False

    # -- lookup --------------------------------------------------------------------------
    def _tier_index(self, name: str) -> int:
        for i, tier in enumerate(self.tiers):
            if tier.name == name:
                return i
        raise TierError(
            name, None, f"not one of this manager's tiers ({', '.join(t.name for t in self.tiers)})"
        )

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise NoSuchEntry(name) from None

    def __contains__(self, name: object) -> bool:
        with self._state:
            return name in self._entries or name in self._models

    def names(self) -> list[str]:
        with self._state:
            return list(self._entries)

    def tier_of(self, name: str) -> Tier:
        with self._state:
            return self.tiers[self._entry(name).tier]

    def info(self, name: str) -> EntryInfo:
        with self._state:
            e = self._entry(name)
            pinned = self.tiers[e.pinned].name if e.pinned is not None else None
            return EntryInfo(
                e.name, self.tiers[e.tier].name, e.group.nbytes, e.leases, e.uses, e.last_use,
                pinned, e.needs, e.policy,
            )  # fmt: skip

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
        *, added: tuple[ModelSource, RetentionPolicy] | None,
    ) -> EntryInfo:  # fmt: skip
        """:meth:`register`; ``added``: what :meth:`add_model` kept for the model ``obj`` is,
        which must still be what the name means (not unregistered or added again meanwhile)."""
        policy = policy or RetentionPolicy()
        with self._lock:
            with self._state:
                if name in self._entries or (name in self._models and added is None):
                    raise EntryExists(name)
                if added is not None and self._models.get(name) is not added:
                    raise NoSuchEntry(name)  # forgotten (or closed) while it loaded: this load is void
                for need in needs:
                    self._entry(need)
            # Keys of its own: one a failed registration could not free is never read again.
            group = Group(name, obj, dedup=self.dedup, salt=uuid.uuid4().hex)
            with self._state:
                self._refuse_managed(name, group)
            entry = _Entry(name, group, policy, tuple(needs), tier=-1, last_use=self.clock())
            target = tier or policy.pinned_tier
            if target:
                order = [self._tier_index(target)]
            else:  # newcomers take free room only; they evict nobody
                fits = [i for i, t in enumerate(self.tiers) if t.available >= self._needed(entry, i)]
                order = fits or [len(self.tiers) - 1]
            pinned = self._tier_index(policy.pinned_tier) if policy.pinned_tier else None
            try:
                self._place_new(entry, order)
                with self._state:
                    entry.pinned = pinned
                    self._entries[name] = entry
            except BaseException:
                with self._state:
                    published = self._entries.get(name) is entry
                if not published:
                    self._abandon(entry)
                raise
            group.drop_originals()
            _release_load_budget(obj)
            return self.info(name)

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
        _check_model_args(name, source, policy, workload, revision, model_cls)
        with self._state:
            if self._closed:
                raise InvalidEntry(name, "the manager is closed")
            if name in self._entries or name in self._models:
                raise EntryExists(name)
            added = ModelSource(source, workload, revision, model_cls)
            self._models[name] = (added, policy or RetentionPolicy())
            self._loading[name] = threading.Lock()

    def _load_if_added(self, name: str) -> None:
        """Load model ``name`` if it was added and is not loaded yet; concurrent callers wait
        for the one loading it."""
        with self._state:
            if name in self._entries or name not in self._models:
                return
            added = self._models[name]
            lock = self._loading[name]
        with lock:
            with self._state:
                if name in self._entries:
                    return
            model, tier = self._load_model(name, added[0])
            self._register(name, model, added[1], (), tier, added=added)

    def _load_model(self, name: str, source: ModelSource) -> tuple[Any, str]:
        """The model, loaded for the fastest addressable tier that holds it: in its free room, or
        in room made by demoting idle entries (as a promotion would), or else on the next tier."""
        loader, host = model_loader(), self._host_room()
        refused: DoesNotFit | None = None
        for index, tier in enumerate(self.tiers):
            if not tier.addressable:
                continue
            try:
                return loader(source, Room(tier.name, tier.device, tier.available, host)), tier.name
            except DoesNotFit as exc:
                refused = refused or exc  # the fastest tier's shortfall says most
                if not self._made_room(index, exc.needed, name):
                    continue
            try:
                return loader(source, Room(tier.name, tier.device, tier.available, host)), tier.name
            except DoesNotFit:
                continue  # taken meanwhile by another move
        if refused is None:
            raise InvalidOption("tiers", [t.name for t in self.tiers], "include one a model can run from")
        raise refused

    def _made_room(self, index: int, needed: int, name: str) -> bool:
        """Demote idle entries from tier ``index`` until ``needed`` bytes are free there; False,
        and nothing moved, where evicting everything movable would not free enough."""
        with self._lock:
            try:
                self._make_room(index, needed, set(), f"room for {name}")
            except TierFull:
                return False
        return True

    def _host_room(self) -> int | None:
        """Free bytes on the first host tier, where a load stages what it reads; None: no such tier."""
        hosts = [t for t in self.tiers if t.addressable and not t.device.is_accelerator]
        return hosts[0].available if hosts else None

    def _refuse_managed(self, name: str, group: Group) -> None:
        """Refuse a group holding a module (the same one, a submodule or a parent of one) or a
        tensor an entry already manages: demoting that entry would empty the other's module
        under its lease. Caller holds the state lock."""
        owners = {id(slot.owner) for r in group.records for slot in r.slots if slot.owner is not None}
        tensors = {id(tensor) for tensor in group.originals.values()}
        for other in self._entries.values():
            shared = [t for t in group.originals.values() if _taken(other.group, t)]
            if shared:  # tied to a tensor the other entry was registered with
                path = next(r.path for r in group.records if group.originals[r.private_key] is shared[0])
                raise AlreadyManaged(name, other.name, path)
            for record in other.group.records:
                for slot in record.slots:
                    if slot.owner is None:
                        continue
                    if id(slot.owner) in owners or id(getattr(slot.owner, slot.attr, None)) in tensors:
                        raise AlreadyManaged(name, other.name, record.path)

    def _place_new(self, entry: _Entry, order: Sequence[int]) -> None:
        """Onto the first tier of ``order`` that takes the newcomer's tensors and hands them back;
        where one fails, what was written there goes again before the next is tried."""
        last: TierError | None = None
        for index in order:
            try:
                self._keys.copy_in(entry.group, index, entry.group.originals)
                entry.tier = index
                self._bind(entry, self._keys.read_back(entry.group, index))
                return
            except BaseException as exc:
                if entry.tier >= 0 and isinstance(exc, MemplanError):
                    self._counts["failures"] += 1  # the read-back failed (copy_in counts its own)
                self._abandon(entry)
                if not isinstance(exc, TierError):
                    raise
                last = exc
        raise last or TierFull(self.tiers[-1].name, entry.name, entry.group.nbytes, 0)

    def _abandon(self, entry: _Entry) -> None:
        """Undo an unpublished registration: free the keys it holds on its tier and give the
        caller's module its own tensors back. Never raises an ``Exception``: the failure that
        brought it here is the one the caller sees."""
        index, entry.tier = entry.tier, -1
        try:
            entry.group.restore()
        except Exception:
            log.exception("could not give %s its own tensors back", entry.name)
        if index >= 0:
            self._keys.release_quietly(entry.group, index)

    def unregister(self, name: str) -> None:
        """Forget ``name`` and free its bytes on every tier. Its module is left with meta tensors.
        A model added by name is forgotten too, loaded or not."""
        with self._lock:
            with self._state:
                if name in self._models and name not in self._entries:
                    del self._models[name], self._loading[name]
                    return
                entry = self._entry(name)
                if entry.pinned is not None:
                    raise PinViolation(name, "unpin it before unregistering")
                dependants = [e.name for e in self._entries.values() if name in e.needs]
                if dependants:
                    raise EntryInUse(name, f"needed by {', '.join(dependants)}")
            with self._moving(entry, "unregister"):
                self._keys.release(entry.group, entry.tier)
                with self._state:
                    entry.group.release()
                    del self._entries[name]
                    self._models.pop(name, None)
                    self._loading.pop(name, None)
            self.eviction.forgotten(name)

    # -- moving data ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _moving(self, entry: _Entry, what: str) -> Iterator[None]:
        """Mark ``entry`` as moving for the block: leases wait until it lands; a leased entry is
        refused, since leased means never moved."""
        with self._state:
            if entry.leases:
                raise EntryInUse(entry.name, f"leased; cannot {what} it")
            entry.moving = True
        try:
            yield
        finally:
            with self._state:
                entry.moving = False
                self._state.notify_all()

    def _bind(self, entry: _Entry, tensors: dict[str, Any] | None) -> None:
        """Plug what the key store's ``read_back`` gave into the entry's module, or unplug it."""
        if tensors is not None:
            entry.group.attach(tensors)
        else:
            entry.group.release()

    def _move(self, entry: _Entry, target: int, reason: str) -> None:
        """Copy down or up, read back, publish, then free the old copy (the caller marked it
        moving). If the copy or the read-back fails, the entry stays whole where it was and
        nothing it wrote stays on ``target``."""
        source = entry.tier
        if source == target:
            return
        written = self._keys.copy_in(entry.group, target, source)
        try:
            tensors = self._keys.read_back(entry.group, target)
        except BaseException as exc:
            self._keys.release_quietly(entry.group, target)
            if isinstance(exc, MemplanError):
                self._counts["failures"] += 1
            raise
        with self._state:
            entry.tier = target
            self._bind(entry, tensors)  # before the release, so no module still holds what is freed
        self._keys.release(entry.group, source)
        route = f"{self.tiers[source].name}->{self.tiers[target].name}"
        self._routes[route] += written
        self._counts["promotions" if target < source else "demotions"] += 1
        self.moves.append(
            Move(entry.name, self.tiers[source].name, self.tiers[target].name, written, reason, time.time())
        )

    # -- room ----------------------------------------------------------------------------
    def _needed(self, entry: _Entry, index: int) -> int:
        return self._keys.needed(entry.group, index)

    def _blocked(self, entry: _Entry, index: int) -> str | None:
        """Why ``entry`` cannot leave tier ``index`` now, or None."""
        if entry.leases:
            return "leased"
        if entry.pinned is not None:
            return f"pinned to {self.tiers[entry.pinned].name}"
        for other in self._entries.values():
            if entry.name in other.needs and other.tier <= index:
                return f"needed by {other.name}, resident on {self.tiers[other.tier].name}"
        return None

    def _candidate(self, entry: _Entry) -> Candidate:
        below = self.tiers[min(entry.tier + 1, len(self.tiers) - 1)]
        cost = below.latency_s + entry.group.nbytes / below.bandwidth
        return Candidate(
            entry.name, entry.group.nbytes, entry.last_use, entry.uses, entry.policy.priority, cost
        )

    def _room_for(self, entry: _Entry, index: int, protect: set[str]) -> None:
        self._make_room(index, self._needed(entry, index), protect, f"room for {entry.name}")

    def _evictable_bytes(self, index: int, protect: set[str]) -> int:
        """Bytes evicting every movable entry would free on tier ``index`` (shared keys excluded)."""
        tier, refs = self.tiers[index], self._keys.refs[index]
        return sum(
            tier.size_of(key)
            for e in self._entries.values()
            if e.tier == index and e.name not in protect and self._blocked(e, index) is None
            for key in e.group.sizes(tier.addressable)
            if refs[key] == 1
        )

    def _make_room(self, index: int, needed: int, protect: set[str], reason: str) -> None:
        """Demote evictable entries from tier ``index`` until ``needed`` bytes are free there."""
        tier, stuck = self.tiers[index], set(protect)
        if tier.available + self._evictable_bytes(index, protect) < needed:
            raise TierFull(tier.name, None, needed, tier.available)  # evicting would only waste moves
        while tier.available < needed:
            movable = [
                e for e in self._entries.values()
                if e.tier == index and e.name not in stuck and self._blocked(e, index) is None
            ]  # fmt: skip
            if not movable or index + 1 >= len(self.tiers):
                raise TierFull(tier.name, None, needed, tier.available)
            chosen = self.eviction.order([self._candidate(e) for e in movable])[0]
            try:
                self._demote(self._entries[chosen.name], protect | {chosen.name}, reason)
            except (TierError, EntryInUse):
                stuck.add(chosen.name)  # nowhere below has room for it, or it was just leased
                continue
            self._counts["evictions"] += 1
            self.eviction.evicted(chosen)

    def _demote(self, entry: _Entry, protect: set[str], reason: str) -> None:
        """One tier down, or further down where that one has no room."""
        with self._moving(entry, "demote"):
            last: TierError | None = None
            for target in range(entry.tier + 1, len(self.tiers)):
                try:
                    self._room_for(entry, target, protect | {entry.name})
                    self._move(entry, target, reason)
                    return
                except TierError as exc:
                    last = exc
            raise last or TierError(self.tiers[entry.tier].name, entry.name, "already on the slowest tier")

    def _promote(self, entry: _Entry, protect: set[str]) -> None:
        """Onto the fastest addressable tier that can make room without breaking pins or leases.

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
        for target in range(0, entry.tier):
            if not self.tiers[target].addressable:
                continue
            try:
                self._room_for(entry, target, protect)
                self._move(entry, target, "use")
                return
            except TierFull:
                continue
            except TierError as exc:
                cause = cause or exc
        if not self.tiers[entry.tier].addressable:
            raise cause or TierFull(
                self.tiers[0].name, entry.name, entry.group.nbytes, self.tiers[0].available
            )
        if cause is not None:
            log.warning("%s stays on %s: %s", entry.name, self.tiers[entry.tier].name, cause)

    # -- leases, pins, explicit moves ------------------------------------------------------
    def _closure(self, entry: _Entry) -> list[_Entry]:
        """``entry`` and everything it needs, transitively; needed entries first."""
        seen: dict[str, _Entry] = {}

        def visit(e: _Entry) -> None:
            if e.name in seen:
                return
            seen[e.name] = e
            for need in e.needs:
                visit(self._entry(need))

        visit(entry)
        return list(reversed(seen.values()))

    def _settled(self, entry: _Entry) -> bool:
        """A lease of ``entry`` moves nothing: it is leased already, or it can run where it is
        and is pinned there or on the fastest tier it could run on."""
        if entry.leases:
            return True
        if not self.tiers[entry.tier].addressable:
            return False
        first = next(i for i, t in enumerate(self.tiers) if t.addressable)
        return entry.pinned is not None or entry.tier == first

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[Any]:
        """Lease ``name`` (and what it needs) on the fastest tier with room; yields the module
        or a mapping of its tensors. Leased entries are never moved, by anything."""
        self._load_if_added(name)
        group, handle = self._lease_settled(name)
        if group is None:
            group, handle = self._lease_moving(name)
        try:
            yield handle
        finally:
            with self._state:
                for e in group:
                    e.leases -= 1
                    e.last_use = self.clock()

    def _lease_settled(self, name: str) -> tuple[list[_Entry] | None, Any]:
        """Lease without taking the move lock when nothing has to move (the common case)."""
        with self._state:
            while True:
                group = self._closure(self._entry(name))
                if not any(e.moving for e in group):
                    break
                self._state.wait()  # it lands soon; then decide afresh
            if not all(self._settled(e) for e in group):
                return None, None
            self._lease(group, hit=True)
            return group, group[-1].group.handle()

    def _lease_moving(self, name: str) -> tuple[list[_Entry], Any]:
        with self._lock:
            with self._state:
                entry = self._entry(name)
                group = self._closure(entry)
                before = entry.tier
                moving = [e for e in group if not self._settled(e)]
                for e in group:
                    e.leases += 1
                for e in moving:
                    e.moving = True  # no other lease may take it while it moves
            try:
                for e in moving:
                    self._promote(e, {g.name for g in group})
            finally:
                with self._state:
                    for e in group:
                        e.leases -= 1
                    for e in moving:
                        e.moving = False
                    self._state.notify_all()
            with self._state:
                self._lease(group, hit=entry.tier == before)
                return group, entry.group.handle()

    def _lease(self, group: list[_Entry], *, hit: bool) -> None:
        self._counts["hits" if hit else "misses"] += 1
        for e in group:
            e.leases += 1
            self._touch(e)

    def _touch(self, entry: _Entry) -> None:
        entry.uses += 1
        entry.last_use = self.clock()
        self.eviction.touched(entry.name)

    def pin(self, name: str, tier: str | None = None) -> None:
        """Keep ``name`` on ``tier`` (default: where it is now) until :meth:`unpin`."""
        with self._lock:
            with self._state:
                entry = self._entry(name)
            target = self._tier_index(tier) if tier else entry.tier
            if entry.pinned is not None and entry.pinned != target:
                raise PinViolation(name, f"already pinned to {self.tiers[entry.pinned].name}")
            if target != entry.tier:
                with self._moving(entry, "pin"):
                    try:
                        self._room_for(entry, target, {name})
                        self._move(entry, target, "pin")
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
            self._entry(name).pinned = None

    def demote(self, name: str, tier: str | None = None, *, reason: str = "demote") -> None:
        """Move ``name`` down to ``tier`` (default: one tier down)."""
        with self._lock:
            with self._state:
                entry = self._entry(name)
                if entry.pinned is not None:
                    raise PinViolation(name, f"pinned to {self.tiers[entry.pinned].name}")
                why = self._blocked(entry, entry.tier)
            if entry.leases:
                raise EntryInUse(name, "leased; cannot demote it")
            if why:
                raise EntryInUse(name, why)
            if tier is None:
                self._demote(entry, {name}, reason)
                return
            target = self._tier_index(tier)
            with self._moving(entry, "demote"):
                self._room_for(entry, target, {name})
                self._move(entry, target, reason)

    # -- idle cleanup --------------------------------------------------------------------
    def maintain(self) -> list[str]:
        """One idle-cleanup pass: demote entries idle past their ``max_idle_s`` by one tier, and
        retry freeing keys a failed drop left behind.

        Leased ones are skipped and retried on the next pass. Returns the entries demoted.
        """
        demoted = []
        with self._lock:
            self._keys.retry_orphans()
            now = self.clock()
            for entry in list(self._entries.values()):
                limit = entry.policy.max_idle_s
                if limit is None or now - entry.last_use < limit or entry.tier + 1 >= len(self.tiers):
                    continue
                if self._blocked(entry, entry.tier) is not None:
                    self._counts["idle_retries"] += 1
                    continue
                try:
                    self._demote(entry, {entry.name}, f"idle past its {limit}s limit")
                    entry.last_use = now  # the next step down waits another max_idle_s
                    demoted.append(entry.name)
                except EntryInUse:
                    self._counts["idle_retries"] += 1
                except TierError as exc:
                    log.warning("idle demotion of %s failed: %s", entry.name, exc)
        return demoted

    def start(self) -> ResidencyManager:
        """Run :meth:`maintain` every ``interval_s`` on a daemon thread."""
        self._worker.interval_s = self.interval_s
        self._worker.start()
        return self

    def close(self) -> None:
        """Stop the thread and free every entry's bytes, except persistent entries' copies on
        durable tiers, which a later manager over the same tiers finds again."""
        with self._state:
            leased = [e.name for e in self._entries.values() if e.leases]
            if leased:
                raise EntryInUse(", ".join(leased), "leased; release every lease before closing the manager")
            self._closed = True  # no pressure answered, no model added or loaded from here on
            self._models.clear()
            self._loading.clear()
        self._worker.stop()
        with self._lock:
            for entry in list(self._entries.values()):
                keep = entry.policy.persistent and self.tiers[entry.tier].durable
                if not keep:
                    self._keys.release(entry.group, entry.tier)
                with self._state:
                    entry.group.release()
            with self._state:
                self._entries.clear()
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
            if self._closed:
                return  # a monitor still driving a closed manager: nothing is left to move
            self._pressure[device] = ratio
        self._worker.start()  # running already: nothing happens
        self._worker.wake()

    def _work(self) -> None:
        """The worker's pass: answer the pressure signalled since the last one, then clean up."""
        with self._state:
            if self._closed:  # a signal that raced close() started this worker again
                self._worker.stop()
                return
            pending, self._pressure = self._pressure, {}
        for device, ratio in pending.items():
            try:
                self.apply_pressure(ratio, device)
            except Exception:  # the other devices' readings are still answered
                log.exception("memplan residency: answering pressure on %s failed", device)
        self.maintain()

    def apply_pressure(self, ratio: float, device: Device | None = None) -> PressureResponse:
        """Respond to ``device`` (default: every memory tier) being ``ratio`` full; recorded."""
        _check_ratio(ratio)
        level = level_for(ratio)
        with self._lock:
            pressured = [i for i, t in enumerate(self.tiers) if _pressured(t, device)]
            before = sum(self.tiers[i].used for i in pressured)
            actions: list[str] = []
            freed_cache = 0
            if rank(level) >= rank("low"):
                freed_cache = sum(self.tiers[i].trim() for i in pressured)
                actions.append(ACTIONS["low"])
            demoted = self._demote_for_pressure(level, pressured) if rank(level) >= rank("medium") else []
            if rank(level) >= rank("medium"):
                actions.append(ACTIONS["medium"])
            if rank(level) >= rank("high"):
                gc.collect()
                _empty_cuda_cache()
                actions.append(ACTIONS["high"])
            if level == "critical":
                actions.append(ACTIONS["critical"])
            freed = before - sum(self.tiers[i].used for i in pressured) + freed_cache
            response = PressureResponse(level, ratio, device, tuple(actions), freed, tuple(demoted))
            if level != "none":
                self.responses.append(response)
            return response

    def _demote_for_pressure(self, level: PressureLevel, pressured: list[int]) -> list[str]:
        demoted = []
        for entry in sorted(self._entries.values(), key=lambda e: (-e.tier, e.last_use)):
            stays = rank(entry.policy.max_pressure) >= rank(level) and level != "critical"
            last = entry.tier + 1 >= len(self.tiers)
            if entry.tier not in pressured or stays or last or self._blocked(entry, entry.tier) is not None:
                continue
            try:
                self._demote(entry, {entry.name}, f"{level} pressure")
                demoted.append(entry.name)
            except EntryInUse:
                continue  # leased since it was picked
            except TierError as exc:
                log.warning("could not demote %s under %s pressure: %s", entry.name, level, exc)
        return demoted

    # -- reading -------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Entries whose stored copies no longer match their checksums (should be []).

        It checks the copies a tier keeps to itself (disk, remote, compressed host), against the
        checksum taken when they came to rest there; on addressable tiers the stored tensor is
        the live one a lease may write, so there is nothing fixed to compare. Needs ``dedup``
        (without it nothing is hashed).
        """
        bad = []
        with self._lock:
            for entry in list(self._entries.values()):
                tier = self.tiers[entry.tier]
                if tier.addressable:
                    continue
                if any(
                    r.digest is not None and digest_of(tier.get(r.key)) != r.digest
                    for r in entry.group.records
                ):
                    bad.append(entry.name)
        return bad

    def stats(self) -> ManagerStats:
        with self._state:
            saved = sum(
                self.tiers[i].size_of(key) * (n - 1)
                for i, refs in enumerate(self._keys.refs)
                for key, n in refs.items()
            )
            c = self._counts
            return ManagerStats(
                len(self._entries), sum(1 for e in self._entries.values() if e.leases),
                c["hits"], c["misses"], c["promotions"], c["demotions"], c["evictions"],
                sum(self._routes.values()), dict(self._routes), saved, len(self.responses), c["failures"],
                tuple(t.stats() for t in self.tiers),
            )  # fmt: skip

    def held_bytes(self, tier: str) -> int:
        """Bytes the entries on ``tier`` hold there (shared keys once), plus keys a failed drop
        left there: always ``tier.used``."""
        with self._state:
            index = self._tier_index(tier)
            held = set(self._keys.refs[index]) | self._keys.orphans[index]
            return sum(self.tiers[index].size_of(key) for key in held)

    def orphans(self, tier: str) -> list[str]:
        """Keys a failed drop left on ``tier``; :meth:`maintain` retries freeing them."""
        with self._state:
            return sorted(self._keys.orphans[self._tier_index(tier)])


def _check_ratio(ratio: object) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not ratio >= 0:
        raise InvalidOption("pressure ratio", ratio, "be a number from 0 (used / total)")


def _check_model_args(
    name: object, source: object, policy: object, workload: object, revision: object, model_cls: object
) -> None:
    """What :meth:`ResidencyManager.add_model` takes, checked when it is given rather than at the
    first use (when a bad name would already be taken)."""
    if not isinstance(name, str) or not name:
        raise InvalidOption("name", name, "be a non-empty string")
    if not isinstance(source, str | os.PathLike):
        raise InvalidOption("source", source, "be a path or a Hugging Face repo id")
    if policy is not None and not isinstance(policy, RetentionPolicy):
        raise InvalidOption("policy", policy, "be a RetentionPolicy")
    if workload is not None and not isinstance(workload, Workload):
        raise InvalidOption("workload", workload, "be a memplan.Workload")
    if revision is not None and not isinstance(revision, str):
        raise InvalidOption("revision", revision, "be a branch, tag or commit")
    if model_cls is not None and not callable(model_cls):
        raise InvalidOption("model_cls", model_cls, "be a model class or a factory")


def _release_load_budget(obj: Any) -> None:
    """A model from :func:`memplan.load` holds its device reservations for its lifetime; once
    its tensors live on the manager's tiers, the tiers charge them, so the load's go."""
    # Read by name, not through memplan.loaders: the loaders' quantized cache is built on the
    # disk tier, and residency does not import them back.
    placement = getattr(getattr(obj, "memplan", None), "placement", None)
    if placement is not None:
        placement.release()


def _pressured(tier: Tier, device: Device | None) -> bool:
    if device is None:
        return tier.device.kind in ("cuda", "mps", "cpu")
    return tier.device == device


def _empty_cuda_cache() -> None:
    torch = imported_torch(cuda="initialized")  # never import torch (and so CUDA) just to free its cache
    if torch is not None:
        torch.cuda.empty_cache()
