"""The keys an entry's tensors have on each tier, counted: identical tensors share one key (and
one copy) where the tier decodes a fresh copy per read, and a key is freed when its last holder
lets go. Keys whose drop failed are kept as orphans and retried.

Tier I/O runs outside the state lock; the counts change under it. Moves of different entries run
at once and may share a content key: a key being put or dropped is marked busy (under the state
lock) by the one thread doing it, and another thread that needs that key waits for it to land,
then shares it or writes it afresh. So no two threads ever write or free one key at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

from memplan._logtext import failure_text
from memplan.errors import MemplanError, TierError
from memplan.residency._entries import Table
from memplan.residency._groups import Group, TensorRecord

__all__ = ["KeyStore"]

log = logging.getLogger("memplan.residency")


class KeyStore:
    """Per-tier reference counts of keys, the keys a failed drop left behind, and the keys being
    written or freed right now."""

    def __init__(self, table: Table, *, dedup: bool) -> None:
        self.table = table
        self.tiers = table.tiers
        self.state = table.state  # counts change under it, I/O never does
        self.dedup = dedup
        self.refs: list[Counter[str]] = [Counter() for _ in self.tiers]
        self.orphans: list[set[str]] = [set() for _ in self.tiers]
        self.busy: list[set[str]] = [set() for _ in self.tiers]

    def needed(self, group: Group, index: int) -> int:
        """Bytes ``group`` would add on tier ``index`` (keys already there are shared); caller
        holds the state lock."""
        tier, refs = self.tiers[index], self.refs[index]
        return sum(tier.footprint(n) for key, n in group.sizes(tier.addressable).items() if refs[key] == 0)

    def _source_tensor(self, record: TensorRecord, source: dict[str, Any] | int) -> Any:
        if isinstance(source, dict):
            return source[record.private_key]
        tier = self.tiers[source]
        return tier.get(record.key_on(tier.addressable))

    def copy_in(self, group: Group, index: int, source: dict[str, Any] | int) -> int:
        """Put the group's keys on tier ``index`` (those it lacks) from ``source`` (the caller's
        tensors, or the index of the tier it is on); all or nothing, a Ctrl-C included."""
        tier = self.tiers[index]
        # Leaving a tier where leases write in place: key the content as it is now.
        rekey = self.dedup and not tier.addressable and isinstance(source, int)
        rekey = rekey and self.tiers[source].addressable  # type: ignore[index]
        written, counted = 0, set[str]()
        try:
            for record in group.records:
                fetched = self._source_tensor(record, source) if rekey else None
                if fetched is not None:
                    record.rekey(fetched)
                key = record.key_on(tier.addressable)
                if key in counted:  # identical tensors of this group share one key and one reference
                    continue
                if not self._share_or_claim(index, key, counted):
                    written += self._write(index, key, fetched, record, source, counted)
        except BaseException as exc:
            self.unref_quietly(index, counted)
            if isinstance(exc, MemplanError):
                self.table.count("failures")
            raise
        return written

    def _share_or_claim(self, index: int, key: str, counted: set[str]) -> bool:
        """Take a reference on ``key`` if tier ``index`` holds it (True; noted in ``counted`` in
        the same step), or claim it for this thread to write (False); a key another thread is
        writing or freeing is waited for."""
        with self.state:
            while key in self.busy[index]:
                self.state.wait()
            if self.refs[index][key]:
                self.refs[index][key] += 1
                counted.add(key)
                return True
            self.busy[index].add(key)
            return False

    def _write(
        self, index: int, key: str, fetched: Any, record: TensorRecord, source: dict[str, Any] | int,
        counted: set[str],
    ) -> int:  # fmt: skip
        """Put claimed ``key`` (``fetched``, or ``record``'s tensor read from ``source``): counted,
        and noted in ``counted``, once it is on the tier, even if interrupted just after; the
        claim goes however it ends."""
        tier = self.tiers[index]
        found = True  # until the tier is known not to hold it: what is there is not this put's
        try:
            self._drop_orphan(index, key)
            found = key in tier  # not its own (a durable tier's leftover): put refuses it
            tensor = fetched if fetched is not None else self._source_tensor(record, source)
            return tier.put(key, tensor)
        finally:
            stored = not found and key in tier
            with self.state:
                if stored:
                    self.refs[index][key] += 1
                    counted.add(key)
                self.busy[index].discard(key)
                self.state.notify_all()

    def release(self, group: Group, index: int) -> None:
        """Take the group's references off tier ``index``, freeing keys nothing else holds."""
        self.unref(index, group.sizes(self.tiers[index].addressable))

    def release_quietly(self, group: Group, index: int) -> None:
        """:meth:`release` while a failure is raised: what cannot be freed stays an orphan."""
        self.unref_quietly(index, group.sizes(self.tiers[index].addressable))

    def unref(self, index: int, keys: Iterable[str]) -> None:
        """Take one reference off each of ``keys`` on tier ``index`` (all in one step), then free
        those nothing holds now. A key whose drop fails, or that an interrupt leaves undropped,
        stays an orphan, retried later: never a key counted that nobody holds."""
        refs, tier, gone = self.refs[index], self.tiers[index], []
        with self.state:
            for key in keys:
                refs[key] -= 1
                if refs[key] <= 0:
                    del refs[key]
                    self.busy[index].add(key)
                    gone.append(key)
        try:
            for key in gone:
                try:
                    tier.drop(key)
                except TierError as exc:  # the copy elsewhere is whole; the stray key is retried later
                    self.table.count("failures")
                    log.warning("could not free %s on tier %s: %s", key, tier.name, failure_text(exc))
        finally:
            left = [key for key in gone if key in tier]
            with self.state:
                self.orphans[index].update(left)
                self.busy[index].difference_update(gone)
                self.state.notify_all()

    def unref_quietly(self, index: int, keys: Iterable[str]) -> None:
        """:meth:`unref` while a failure is raised: nothing is raised but a Ctrl-C."""
        try:
            self.unref(index, keys)
        except Exception as exc:
            name = self.tiers[index].name
            log.error("could not free keys on tier %s: %s", name, failure_text(exc, trace=True))

    def _drop_orphan(self, index: int, key: str) -> None:
        """Free ``key`` left behind by a failed drop before it is written again (raises if it
        cannot); the caller has claimed ``key``."""
        if key in self.orphans[index]:
            self.tiers[index].drop(key)
            with self.state:
                self.orphans[index].discard(key)

    def retry_orphans(self) -> None:
        for index in range(len(self.tiers)):
            with self.state:
                free = [k for k in self.orphans[index] if k not in self.busy[index]]
                self.busy[index].update(free)
            for key in free:
                try:
                    with contextlib.suppress(TierError):
                        self._drop_orphan(index, key)
                finally:
                    with self.state:
                        self.busy[index].discard(key)
                        self.state.notify_all()

    def read_back(self, group: Group, index: int) -> dict[str, Any] | None:
        """The tensors tier ``index`` holds for ``group``, by private key, if a module can run
        from them there (tier I/O: never under the state lock)."""
        tier = self.tiers[index]
        if not tier.addressable:
            return None
        return {key: tier.get(key) for key in group.sizes(True)}
