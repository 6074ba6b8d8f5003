"""Models added by name: their sources, kept after loading (the name stays taken), and the load
a first use does, planned for the room the manager has on its fastest tier that can run it."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from memplan.errors import DoesNotFit, EntryExists, InvalidOption, ManagerClosed, NoSuchEntry, TierFull
from memplan.planner import Workload
from memplan.residency._entries import Entry, Move
from memplan.residency._keystore import KeyStore
from memplan.residency._moves import Mover
from memplan.residency.models import ModelSource, Room, model_loader
from memplan.residency.policy import RetentionPolicy

__all__ = ["Added", "AddedModels", "check_model_args"]

Added = tuple[ModelSource, RetentionPolicy]
# Registers a loaded model as the entry (name, model, policy, tier, what was added).
Register = Callable[[str, Any, RetentionPolicy, str | None, Added], Any]


class AddedModels:
    """Sources by name, and one lock each so that concurrent first uses load a model once; what
    each load took (for the cost of dropping a model rather than demoting it)."""

    def __init__(self, mover: Mover, keys: KeyStore) -> None:
        self.mover, self.table, self.keys = mover, mover.table, keys
        self.sources: dict[str, Added] = {}
        self.loading: dict[str, threading.Lock] = {}
        self.load_seconds: dict[str, float] = {}  # each model's last load, measured
        self.closed = False
        mover.drop = self.drop

    def add(self, name: str, source: ModelSource, policy: RetentionPolicy) -> None:
        with self.table.state:
            if self.closed:
                raise ManagerClosed(name, "add")
            if name in self.table.entries or name in self.table.pending or name in self.sources:
                raise EntryExists(name)
            self.sources[name] = (source, policy)
            self.loading[name] = threading.Lock()

    def forget(self, name: str) -> None:
        """Caller holds the state lock."""
        self.sources.pop(name, None)
        self.loading.pop(name, None)

    def close(self) -> None:
        """No model added or loaded from here on (caller holds the state lock)."""
        self.closed = True
        self.sources.clear()
        self.loading.clear()

    def unloaded(self) -> list[str]:
        with self.table.state:
            return [n for n in self.sources if n not in self.table.entries]

    def load_if_added(self, name: str, register: Register) -> None:
        """Load model ``name`` if it was added and is not loaded; concurrent callers wait for
        the one loading it."""
        with self.table.state:
            if name in self.table.entries or name not in self.sources:
                return
            added, lock = self.sources[name], self.loading[name]
        with lock:
            with self.table.state:
                if name in self.table.entries:
                    return
            started = time.perf_counter()
            model, tier = self._load(name, added[0])
            report = getattr(getattr(model, "memplan", None), "report", None)
            with self.table.state:  # before it is registered: from then on it may be dropped
                self.load_seconds[name] = getattr(report, "seconds", time.perf_counter() - started)
                self.table.counts["loads"] += 1
                self.table.counts["bytes_loaded"] += getattr(report, "bytes_read", 0)
            try:
                register(name, model, added[1], tier, added)
            except TierFull:  # its room was taken meanwhile: the next tier with free room
                register(name, model, added[1], None, added)

    def drop(self, entry: Entry, keep_seconds: float | None, reason: str) -> bool:
        """Drop ``entry`` (claimed by the caller) if it is a model added by name whose policy
        allows it and loading it again is measured to cost less than ``keep_seconds`` (None:
        nowhere below has room); its next use loads it again. True if it was dropped."""
        name = entry.name
        with self.table.state:
            if not entry.policy.drop or name not in self.sources or self.table.entries.get(name) is not entry:
                return False
            if any(name in other.needs for other in self.table.entries.values()):
                return False  # an entry that needs it would find it gone
            reload_s = self.load_seconds.get(name)
            if keep_seconds is not None and (reload_s is None or reload_s > keep_seconds):
                return False
            del self.table.entries[name]
        self.keys.release(entry.group, entry.tier)
        with self.table.state:
            entry.group.release()
            self.table.counts["drops"] += 1
            self.table.eviction.forgotten(name)
        why = f"{reason}: loading it again ({reload_s or 0:.2f} s) costs less than keeping it below"
        self.mover.moves.append(Move(name, self.mover.tiers[entry.tier].name, "dropped", 0, why, time.time()))
        return True

    def _load(self, name: str, source: ModelSource) -> tuple[Any, str]:
        """The model, loaded for the fastest addressable tier that holds it: in its free room, or
        in room made by demoting idle entries (as a promotion would), or else on the next tier."""
        loader, refused = model_loader(), None
        for index, tier in enumerate(self.mover.tiers):
            if not tier.addressable:
                continue
            try:
                return loader(source, self._room(index)), tier.name
            except DoesNotFit as exc:
                refused = refused or exc  # the fastest tier's shortfall says most
                try:
                    self.mover.make_room(name, index, exc.needed, f"room for {name}")
                except TierFull:
                    continue
            try:
                return loader(source, self._room(index)), tier.name
            except DoesNotFit:
                continue  # taken meanwhile by another move
        if refused is None:
            names = [t.name for t in self.mover.tiers]
            raise InvalidOption("tiers", names, "include one a model can run from")
        raise refused

    def _room(self, index: int) -> Room:
        tier = self.mover.tiers[index]
        with self.table.state:
            return Room(tier.name, tier.device, self.mover.free(index), self._host_room())

    def _host_room(self) -> int | None:
        """Free bytes on the first host tier, where a load stages what it reads; None: no such
        tier. Caller holds the state lock."""
        tiers = self.mover.tiers
        hosts = [i for i, t in enumerate(tiers) if t.addressable and not t.device.is_accelerator]
        return self.mover.free(hosts[0]) if hosts else None

    def check_current(self, name: str, added: Added | None) -> None:
        """Refuse registering what a load of ``added`` gave where the name no longer means it
        (unregistered or added again meanwhile): that load is void. Caller holds the state lock."""
        if added is not None and self.sources.get(name) is not added:
            raise NoSuchEntry(name)


def check_model_args(
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
