"""The residency manager: named tensor groups kept on the fastest tier where they pay.

Tiers are given fastest first (e.g. gpu, host, disk, remote). Every entry lives on exactly one
tier; a move copies its tensors down or up and then frees them where they were, so a failure
halfway leaves the entry whole where it was. Identical tensors are stored once per tier
(content-addressed keys with reference counts), and each tier's ``used`` always equals the
bytes of the keys its entries hold there.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from memplan._periodic import Periodic
from memplan.errors import MemplanError, PinViolation, TierError, TierFull
from memplan.gpu.device import Device
from memplan.residency._groups import Group, digest_of
from memplan.residency.eviction import GDSF, Candidate, Eviction
from memplan.residency.policy import RetentionPolicy
from memplan.residency.pressure import ACTIONS, PressureLevel, PressureResponse, level_for, rank
from memplan.residency.tiers.base import Tier

__all__ = ["EntryInUse", "EntryInfo", "ManagerStats", "Move", "ResidencyManager"]

log = logging.getLogger(__name__)


class EntryInUse(MemplanError):
    """The entry is leased, or needed by a resident entry, so it cannot be moved or removed."""

    def __init__(self, entry: str, reason: str) -> None:
        self.entry = entry
        self.reason = reason
        super().__init__(f"entry {entry!r} is in use: {reason}")


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
            raise MemplanError("a residency manager needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise MemplanError(f"tier names must differ: {names}")
        self.tiers = list(tiers)
        self.eviction = eviction or GDSF()
        self.dedup = dedup
        self.interval_s = interval_s
        self.clock = clock
        self.moves: deque[Move] = deque(maxlen=1000)
        self.responses: deque[PressureResponse] = deque(maxlen=100)
        self._entries: dict[str, _Entry] = {}
        self._refs: list[Counter[str]] = [Counter() for _ in self.tiers]
        self._lock = threading.RLock()
        self._counts: Counter[str] = Counter()
        self._routes: Counter[str] = Counter()
        self._worker = Periodic("memplan-residency", interval_s, self.maintain)

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
            raise MemplanError(f"no entry named {name!r} is registered") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def tier_of(self, name: str) -> Tier:
        with self._lock:
            return self.tiers[self._entry(name).tier]

    def info(self, name: str) -> EntryInfo:
        with self._lock:
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
        """
        policy = policy or RetentionPolicy()
        with self._lock:
            if name in self._entries:
                raise MemplanError(f"an entry named {name!r} is already registered")
            for need in needs:
                self._entry(need)
            group = Group(name, obj, dedup=self.dedup)
            entry = _Entry(name, group, policy, tuple(needs), tier=-1, last_use=self.clock())
            target = tier or policy.pinned_tier
            if target:
                order = [self._tier_index(target)]
            else:  # newcomers take free room only; they evict nobody
                fits = [i for i, t in enumerate(self.tiers) if t.available >= self._needed(entry, i)]
                order = fits or [len(self.tiers) - 1]
            self._place_new(entry, order)
            entry.pinned = self._tier_index(policy.pinned_tier) if policy.pinned_tier else None
            self._entries[name] = entry
            group.drop_originals()
            return self.info(name)

    def _place_new(self, entry: _Entry, order: Sequence[int]) -> None:
        last: TierError | None = None
        for index in order:
            try:
                self._copy_in(entry, index, entry.group.originals)
            except TierError as exc:
                last = exc
                continue
            entry.tier = index
            self._rebind(entry)
            return
        raise last or TierFull(self.tiers[-1].name, entry.name, entry.group.nbytes, 0)

    def unregister(self, name: str) -> None:
        """Forget ``name`` and free its bytes on every tier. Its module is left with meta tensors."""
        with self._lock:
            entry = self._entry(name)
            if entry.pinned is not None:
                raise PinViolation(name, "unpin it before unregistering")
            self._check_movable(entry, "unregister")
            dependants = [e.name for e in self._entries.values() if name in e.needs]
            if dependants:
                raise EntryInUse(name, f"needed by {', '.join(dependants)}")
            self._release_keys(entry, entry.tier)
            entry.group.release()
            del self._entries[name]
            self.eviction.forgotten(name)

    # -- moving data ---------------------------------------------------------------------
    def _copy_in(self, entry: _Entry, index: int, source: Any) -> int:
        """Put the entry's keys on tier ``index`` (those it lacks) from ``source``; all or nothing."""
        tier, refs = self.tiers[index], self._refs[index]
        written, counted, added = 0, [], []
        try:
            for key in entry.group.sizes():
                if refs[key] == 0:
                    tensor = source[key] if isinstance(source, dict) else source.get(key)
                    written += tier.put(key, tensor)
                    added.append(key)
                refs[key] += 1
                counted.append(key)
        except MemplanError:
            for key in counted:
                refs[key] -= 1
                if refs[key] == 0:
                    del refs[key]
            for key in added:
                self._drop_quietly(index, key)
            self._counts["failures"] += 1
            raise
        return written

    def _release_keys(self, entry: _Entry, index: int) -> None:
        refs = self._refs[index]
        for key in entry.group.sizes():
            refs[key] -= 1
            if refs[key] == 0:
                del refs[key]
                self._drop_quietly(index, key)

    def _drop_quietly(self, index: int, key: str) -> None:
        try:
            self.tiers[index].drop(key)
        except TierError as exc:  # the copy elsewhere is whole; a stray object only wastes room
            self._counts["failures"] += 1
            log.warning("could not free %s on tier %s: %s", key, self.tiers[index].name, exc)

    def _rebind(self, entry: _Entry) -> None:
        tier = self.tiers[entry.tier]
        if tier.addressable:
            entry.group.attach({key: tier.get(key) for key in entry.group.sizes()})
        else:
            entry.group.release()

    def _move(self, entry: _Entry, target: int, reason: str) -> None:
        source = entry.tier
        if source == target:
            return
        written = self._copy_in(entry, target, self.tiers[source])
        self._release_keys(entry, source)
        entry.tier = target
        self._rebind(entry)
        route = f"{self.tiers[source].name}->{self.tiers[target].name}"
        self._routes[route] += written
        self._counts["promotions" if target < source else "demotions"] += 1
        self.moves.append(
            Move(entry.name, self.tiers[source].name, self.tiers[target].name, written, reason, time.time())
        )

    # -- room ----------------------------------------------------------------------------
    def _needed(self, entry: _Entry, index: int) -> int:
        tier, refs = self.tiers[index], self._refs[index]
        return sum(tier.footprint(n) for key, n in entry.group.sizes().items() if refs[key] == 0)

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
        tier, refs = self.tiers[index], self._refs[index]
        return sum(
            tier.size_of(key)
            for e in self._entries.values()
            if e.tier == index and e.name not in protect and self._blocked(e, index) is None
            for key in e.group.sizes()
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
            except TierError:
                stuck.add(chosen.name)  # nowhere below has room for it; try the next one
                continue
            self._counts["evictions"] += 1
            self.eviction.evicted(chosen)

    def _demote(self, entry: _Entry, protect: set[str], reason: str) -> None:
        """One tier down, or further down where that one has no room."""
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
        """Onto the fastest addressable tier that can make room without breaking pins or leases."""
        if entry.pinned is not None:
            return
        for target in range(0, entry.tier):
            if not self.tiers[target].addressable:
                continue
            try:
                self._room_for(entry, target, protect)
                self._move(entry, target, "use")
                return
            except TierError:
                continue
        if not self.tiers[entry.tier].addressable:
            raise TierFull(self.tiers[0].name, entry.name, entry.group.nbytes, self.tiers[0].available)

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

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[Any]:
        """Lease ``name`` (and what it needs) on the fastest tier with room; yields the module
        or a mapping of its tensors. Leased entries are never evicted."""
        with self._lock:
            entry = self._entry(name)
            group = self._closure(entry)
            for e in group:
                e.leases += 1
            before = entry.tier
            try:
                for e in group:
                    self._promote(e, {g.name for g in group})
            except BaseException:
                for e in group:
                    e.leases -= 1
                raise
            self._counts["hits" if entry.tier == before else "misses"] += 1
            for e in group:
                self._touch(e)
            handle = entry.group.handle()
        try:
            yield handle
        finally:
            with self._lock:
                for e in group:
                    e.leases -= 1
                    e.last_use = self.clock()

    def _touch(self, entry: _Entry) -> None:
        entry.uses += 1
        entry.last_use = self.clock()
        self.eviction.touched(entry.name)

    def pin(self, name: str, tier: str | None = None) -> None:
        """Keep ``name`` on ``tier`` (default: where it is now) until :meth:`unpin`."""
        with self._lock:
            entry = self._entry(name)
            target = self._tier_index(tier) if tier else entry.tier
            if entry.pinned is not None and entry.pinned != target:
                raise PinViolation(name, f"already pinned to {self.tiers[entry.pinned].name}")
            if target != entry.tier:
                try:
                    self._room_for(entry, target, {name})
                    self._move(entry, target, "pin")
                except TierFull as exc:
                    raise PinViolation(
                        name,
                        f"{self.tiers[target].name} has no room without moving "
                        f"pinned or leased entries ({exc.reason})",
                    ) from exc
            entry.pinned = target

    def unpin(self, name: str) -> None:
        with self._lock:
            self._entry(name).pinned = None

    def _check_movable(self, entry: _Entry, what: str) -> None:
        if entry.leases:
            raise EntryInUse(entry.name, f"leased; cannot {what} it")

    def demote(self, name: str, tier: str | None = None, *, reason: str = "demote") -> None:
        """Move ``name`` down to ``tier`` (default: one tier down)."""
        with self._lock:
            entry = self._entry(name)
            if entry.pinned is not None:
                raise PinViolation(name, f"pinned to {self.tiers[entry.pinned].name}")
            self._check_movable(entry, "demote")
            why = self._blocked(entry, entry.tier)
            if why:
                raise EntryInUse(name, why)
            if tier is None:
                self._demote(entry, {name}, reason)
                return
            target = self._tier_index(tier)
            self._room_for(entry, target, {name})
            self._move(entry, target, reason)

    # -- idle cleanup --------------------------------------------------------------------
    def maintain(self) -> list[str]:
        """One idle-cleanup pass: demote entries idle past their ``max_idle_s`` by one tier.

        Leased ones are skipped and retried on the next pass. Returns the entries demoted.
        """
        demoted = []
        with self._lock:
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
        self._worker.stop()
        with self._lock:
            for entry in list(self._entries.values()):
                keep = entry.policy.persistent and self.tiers[entry.tier].durable
                if not keep:
                    self._release_keys(entry, entry.tier)
                entry.group.release()
            self._entries.clear()
            for tier in self.tiers:
                tier.close()

    def __enter__(self) -> ResidencyManager:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pressure ------------------------------------------------------------------------
    def apply_pressure(self, ratio: float, device: Device | None = None) -> PressureResponse:
        """Respond to ``device`` (default: every memory tier) being ``ratio`` full; recorded."""
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
            except TierError as exc:
                log.warning("could not demote %s under %s pressure: %s", entry.name, level, exc)
        return demoted

    # -- reading -------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Entries whose tensors no longer match their checksums at registration (should be [])."""
        bad = []
        with self._lock:
            for entry in self._entries.values():
                tier = self.tiers[entry.tier]
                if any(digest_of(tier.get(r.key)) != r.digest for r in entry.group.records):
                    bad.append(entry.name)
        return bad

    def stats(self) -> ManagerStats:
        with self._lock:
            saved = sum(
                self.tiers[i].size_of(key) * (n - 1)
                for i, refs in enumerate(self._refs)
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
        """Bytes the entries on ``tier`` hold there (shared keys once): always ``tier.used``."""
        with self._lock:
            index = self._tier_index(tier)
            return sum(self.tiers[index].size_of(key) for key in self._refs[index])


def _pressured(tier: Tier, device: Device | None) -> bool:
    if device is None:
        return tier.device.kind in ("cuda", "mps", "cpu")
    return tier.device == device


def _empty_cuda_cache() -> None:
    torch = sys.modules.get("torch")  # never import torch (and so CUDA) just to free its cache
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
