"""The keys an entry's tensors have on each tier, counted: identical tensors share one key (and
one copy) where the tier decodes a fresh copy per read, and a key is freed when its last holder
lets go. Keys whose drop failed are kept as orphans and retried.

Tier I/O runs outside the state lock; the counts change under it. The manager holds its move lock
around calls that write (so no two calls write one key at once); reads of the counts take the
state lock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from memplan.errors import MemplanError, TierError
from memplan.residency._groups import Group, TensorRecord
from memplan.residency.tiers.base import Tier

__all__ = ["KeyStore"]

log = logging.getLogger("memplan.residency")


class KeyStore:
    """Per-tier reference counts of keys, and the keys a failed drop left behind."""

    def __init__(
        self, tiers: Sequence[Tier], state: threading.Condition, counts: Counter[str], *, dedup: bool
    ) -> None:
        self.tiers = list(tiers)
        self.state = state  # the manager's state lock: counts change under it, I/O never does
        self.counts = counts  # the manager's counters ("failures")
        self.dedup = dedup
        self.refs: list[Counter[str]] = [Counter() for _ in self.tiers]
        self.orphans: list[set[str]] = [set() for _ in self.tiers]

    def needed(self, group: Group, index: int) -> int:
        """Bytes ``group`` would add on tier ``index`` (keys already there are shared)."""
        tier, refs = self.tiers[index], self.refs[index]
        return sum(tier.footprint(n) for key, n in group.sizes(tier.addressable).items() if refs[key] == 0)

    def _source_tensor(self, record: TensorRecord, source: dict[str, Any] | int) -> Any:
        if isinstance(source, dict):
            return source[record.private_key]
        tier = self.tiers[source]
        return tier.get(record.key_on(tier.addressable))

    def copy_in(self, group: Group, index: int, source: dict[str, Any] | int) -> int:
        """Put the group's keys on tier ``index`` (those it lacks) from ``source`` (the caller's
        tensors, or the index of the tier it is on); all or nothing."""
        tier, refs = self.tiers[index], self.refs[index]
        # Leaving a tier where leases write in place: key the content as it is now.
        rekey = self.dedup and not tier.addressable and isinstance(source, int)
        rekey = rekey and self.tiers[source].addressable  # type: ignore[index]
        written, counted = 0, set()
        putting: str | None = None  # a key this call is writing, not yet counted
        try:
            for record in group.records:
                fetched = self._source_tensor(record, source) if rekey else None
                if fetched is not None:
                    record.rekey(fetched)
                key = record.key_on(tier.addressable)
                if key in counted:  # identical tensors of this group share one key and one reference
                    continue
                if refs[key] == 0:
                    tensor = fetched if fetched is not None else self._source_tensor(record, source)
                    self._drop_orphan(index, key)
                    putting = None if key in tier else key  # a key it found there is not its own
                    written += tier.put(key, tensor)
                with self.state:
                    refs[key] += 1
                counted.add(key)
                putting = None
        except BaseException as exc:  # a Ctrl-C too: the keys taken here go again
            if putting is not None and putting not in counted:  # interrupted just after its put
                if refs[putting]:
                    counted.add(putting)
                elif putting in tier:
                    self.unref_quietly(index, [putting], held=False)
            self.unref_quietly(index, counted)
            if isinstance(exc, MemplanError):
                self.counts["failures"] += 1
            raise
        return written

    def release(self, group: Group, index: int) -> None:
        """Take the group's references off tier ``index``, freeing keys nothing else holds."""
        self.unref(index, group.sizes(self.tiers[index].addressable))

    def release_quietly(self, group: Group, index: int) -> None:
        """:meth:`release` while a failure is raised: what cannot be freed stays an orphan."""
        self.unref_quietly(index, group.sizes(self.tiers[index].addressable))

    def unref(self, index: int, keys: Iterable[str]) -> None:
        """Take one reference off each of ``keys`` on tier ``index``; free those nothing holds now."""
        refs = self.refs[index]
        for key in keys:
            with self.state:
                refs[key] -= 1
                gone = refs[key] == 0
                if gone:
                    del refs[key]
            if gone:
                self._drop_quietly(index, key)

    def unref_quietly(self, index: int, keys: Iterable[str], *, held: bool = True) -> None:
        """:meth:`unref` (or, not ``held``, just the drop) key by key while a failure is raised:
        a key whose drop fails in any way stays an orphan, retried later, and nothing is raised."""
        for key in keys:
            try:
                if held:
                    self.unref(index, [key])
                else:
                    self._drop_quietly(index, key)
            except Exception as exc:
                present = key in self.tiers[index]
                with self.state:
                    if present and not self.refs[index][key]:
                        self.orphans[index].add(key)
                log.warning("could not free %s on tier %s: %s", key, self.tiers[index].name, exc)

    def _drop_quietly(self, index: int, key: str) -> None:
        try:
            self.tiers[index].drop(key)
        except TierError as exc:  # the copy elsewhere is whole; the stray key is retried later
            with self.state:
                self.orphans[index].add(key)
            self.counts["failures"] += 1
            log.warning("could not free %s on tier %s: %s", key, self.tiers[index].name, exc)

    def _drop_orphan(self, index: int, key: str) -> None:
        """Free ``key`` left behind by a failed drop before it is written again (raises if it cannot)."""
        if key in self.orphans[index]:
            self.tiers[index].drop(key)
            with self.state:
                self.orphans[index].discard(key)

    def retry_orphans(self) -> None:
        for index, orphans in enumerate(self.orphans):
            for key in list(orphans):
                with contextlib.suppress(TierError):
                    self._drop_orphan(index, key)

    def read_back(self, group: Group, index: int) -> dict[str, Any] | None:
        """The tensors tier ``index`` holds for ``group``, by private key, if a module can run
        from them there (tier I/O: never under ``_state``)."""
        tier = self.tiers[index]
        if not tier.addressable:
            return None
        return {key: tier.get(key) for key in group.sizes(True)}
