"""The tier contract: a place that holds tensors by key, within a capacity, with exact accounting.

Subclasses say how to store, fetch and discard one tensor; this base does the rest once:
locking, capacity, ``used``, missing keys and counters. Every tier passes
``tests/conformance/``.
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from memplan.errors import TierError, TierFull
from memplan.gpu import Device
from memplan.residency import _wire
from memplan.residency._wire import validate_key

if TYPE_CHECKING:
    import torch

__all__ = ["Tier", "TierStats"]


@dataclass(frozen=True)
class TierStats:
    """Counters of one tier. ``raw_bytes`` is what its tensors weigh uncompressed."""

    name: str
    kind: str
    device: Device
    capacity: int
    used: int
    entries: int
    raw_bytes: int
    puts: int
    gets: int
    drops: int
    bytes_written: int
    bytes_read: int
    failures: int
    bandwidth: float

    @property
    def compression_ratio(self) -> float:
        """Raw bytes over stored bytes: 1.0 without compression, above 1 when it pays."""
        return self.raw_bytes / self.used if self.used else 1.0


@dataclass
class _Held:
    handle: Any
    nbytes: int
    raw_nbytes: int


class Tier(ABC):
    """Holds tensors by key. ``put`` copies in, ``get`` hands back, ``drop`` frees.

    ``addressable`` tiers hand back the stored tensor itself from ``get``, so a module's
    parameters can point at it (and a write through it is a write to the stored copy); the
    others decode a fresh tensor on every ``get``. Either way a tensor handed out belongs to its
    holder: no later ``put``, ``drop`` or reuse of memory by the tier changes it.
    """

    kind: ClassVar[str]
    durable: ClassVar[bool] = False  # its contents outlive the process
    latency_s: ClassVar[float] = 0.0  # fixed cost of one fetch, on top of bytes / bandwidth
    addressable: bool = False

    def __init__(self, *, device: Device, capacity: int, bandwidth: float, name: str | None = None) -> None:
        self.name = name or self.kind
        self.device = device
        self.capacity = capacity
        self.bandwidth = bandwidth
        self._lock = threading.RLock()
        self._held: dict[str, _Held] = {}
        self._busy: set[str] = set()  # keys with a put or drop under way
        self._used = 0
        self._counts = {"puts": 0, "gets": 0, "drops": 0, "written": 0, "read": 0, "failures": 0}

    # -- what a subclass provides --------------------------------------------------------
    @abstractmethod
    def _store(self, key: str, tensor: torch.Tensor, room: int) -> tuple[Any, int]:
        """Keep a copy of ``tensor``; return a handle and the bytes it occupies.

        Raise :class:`TierFull` (see :meth:`_check_room`) before keeping anything when it
        needs more than ``room`` bytes.
        """

    @abstractmethod
    def _fetch(self, key: str, handle: Any) -> torch.Tensor: ...

    @abstractmethod
    def _discard(self, key: str, handle: Any) -> None: ...

    def _check_room(self, key: str, nbytes: int, room: int) -> None:
        if nbytes > room:
            raise TierFull(self.name, key, nbytes, room)

    def _adopt(self, key: str, handle: Any, nbytes: int, raw_nbytes: int) -> None:
        """Count an entry found at start (a durable tier recovering its files)."""
        self._held[key] = _Held(handle, nbytes, raw_nbytes)
        self._used += nbytes

    # -- the contract --------------------------------------------------------------------
    # The lock guards the table and counters only; a subclass's I/O runs outside it, with the
    # key marked busy, so a slow disk or a hung remote never blocks other keys.
    def put(self, key: str, tensor: torch.Tensor) -> int:
        """Store a copy of ``tensor`` under a new ``key``; return the bytes it occupies here."""
        validate_key(self.name, key)
        _wire.dtype_name(self.name, key, tensor)  # every tier refuses what bytes cannot hold
        with self._lock:
            if key in self._held:
                raise TierError(self.name, key, "already holds this key; drop it first")
            self._claim(key)
            room = self.capacity - self._used
        with self._failures_counted(key):
            handle, nbytes = self._store(key, tensor, room)
        with self._lock:
            room = self.capacity - self._used  # other puts may have landed meanwhile
            if nbytes <= room:
                self._busy.discard(key)
                self._held[key] = _Held(handle, nbytes, tensor.numel() * tensor.element_size())
                self._used += nbytes
                self._counts["puts"] += 1
                self._counts["written"] += nbytes
                return nbytes
            self._counts["failures"] += 1
        try:
            with contextlib.suppress(TierError):
                self._discard(key, handle)
        finally:
            with self._lock:
                self._busy.discard(key)
        raise TierFull(self.name, key, nbytes, room)

    def get(self, key: str) -> torch.Tensor:
        """The tensor under ``key``, which belongs to the caller: no later put or drop changes it."""
        with self._lock:
            held = self._entry(key)
        with self._failures_counted(None):
            tensor = self._fetch(key, held.handle)
        with self._lock:
            self._counts["gets"] += 1
            self._counts["read"] += held.nbytes
        return tensor

    def drop(self, key: str) -> int:
        """Forget ``key`` and free its bytes; return how many.

        When freeing fails (a read-only spill directory, an unreachable remote), the key stays
        here and stays charged, as it really is, and the :class:`TierError` says why; a later
        ``drop`` can finish the job.
        """
        with self._lock:
            held = self._entry(key)
            self._claim(key)
        with self._failures_counted(key):
            self._discard(key, held.handle)
        with self._lock:
            self._busy.discard(key)
            del self._held[key]
            self._used -= held.nbytes
            self._counts["drops"] += 1
            return held.nbytes

    def _claim(self, key: str) -> None:
        if key in self._busy:
            raise TierError(self.name, key, "busy: another put or drop of this key is under way")
        self._busy.add(key)

    @contextlib.contextmanager
    def _failures_counted(self, claimed: str | None) -> Iterator[None]:
        """Run a subclass's I/O and count its TierErrors; if it raises, free the claim on ``claimed``."""
        try:
            yield
        except BaseException as exc:
            with self._lock:
                self._busy.discard(claimed or "")
                self._counts["failures"] += isinstance(exc, TierError)
            raise

    def _entry(self, key: str) -> _Held:
        try:
            return self._held[key]
        except (KeyError, TypeError):
            raise TierError(self.name, str(key), "no such key") from None

    def size_of(self, key: str) -> int:
        with self._lock:
            return self._entry(key).nbytes

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._held

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    @property
    def available(self) -> int:
        with self._lock:
            return self.capacity - self._used

    def footprint(self, nbytes: int) -> int:
        """About how many bytes a tensor of ``nbytes`` takes here, before it is stored."""
        return nbytes

    def trim(self) -> int:
        """Give back cached memory that holds no entry; return the bytes freed."""
        return 0

    def close(self) -> None:  # noqa: B027 - most tiers hold nothing outside their entries
        """Release what the tier holds in this process; durable tiers keep their files."""

    def stats(self) -> TierStats:
        with self._lock:
            c = self._counts
            raw = sum(h.raw_nbytes for h in self._held.values())
            return TierStats(
                self.name, self.kind, self.device, self.capacity, self._used, len(self._held), raw,
                c["puts"], c["gets"], c["drops"], c["written"], c["read"], c["failures"], self.bandwidth,
            )  # fmt: skip

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.used}/{self.capacity} bytes, {len(self)} keys>"
