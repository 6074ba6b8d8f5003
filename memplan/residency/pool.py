"""Reusable host buffers in size classes, pinned when CUDA is there.

Pinning is slow (a ``cudaHostAlloc`` is a page-locking syscall) and pinned memory is what makes
host→GPU copies run at full speed and asynchronously, so buffers are kept and reused rather
than freed. Requests fall in size classes (up to 64 KiB, 1 MiB, 16 MiB, and above) and are
rounded up within their class to 1/16 of the class below (4 KiB, 4 KiB, 64 KiB, 1 MiB), so a
buffer wastes at most 1/16 of its size (plus one page for tiny ones) yet recurs often
enough to be reused: a model's layers ask for the same sizes over and over.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memplan._torch_imported import imported_torch

if TYPE_CHECKING:
    import torch

__all__ = ["SIZE_CLASSES", "ClassStats", "HostPool", "PoolStats", "class_of", "size_class"]

KiB, MiB = 1 << 10, 1 << 20
SIZE_CLASSES = (64 * KiB, MiB, 16 * MiB)


PAGE = 4 * KiB


def class_of(nbytes: int) -> int:
    """The size class (64 KiB, 1 MiB, 16 MiB, or 0 for above) a request belongs to."""
    return next((size for size in SIZE_CLASSES if nbytes <= size), 0)


def size_class(nbytes: int) -> int:
    """The buffer size a request of ``nbytes`` is served from."""
    below = max((size for size in SIZE_CLASSES if size < nbytes), default=PAGE * 16)
    step = max(PAGE, below // 16)
    return -(-nbytes // step) * step


@dataclass(frozen=True)
class ClassStats:
    size: int  # the class's upper bound; 0 for "above 16 MiB"
    hits: int
    misses: int
    in_use: int
    cached: int


@dataclass(frozen=True)
class PoolStats:
    pinned: bool
    classes: tuple[ClassStats, ...]
    cached_bytes: int
    in_use_bytes: int

    @property
    def hits(self) -> int:
        return sum(c.hits for c in self.classes)

    @property
    def misses(self) -> int:
        return sum(c.misses for c in self.classes)

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0


def cuda_present() -> bool:
    # Only ask torch when it is already imported: this must not initialise CUDA on its own.
    return imported_torch(cuda="available") is not None


class HostPool:
    """Buffers by size class; ``release`` keeps up to ``max_cached`` bytes for reuse."""

    def __init__(
        self, *, pinned: bool | None = None, max_cached: int = 1 << 30, zero_on_release: bool = False
    ) -> None:
        self.pinned = cuda_present() if pinned is None else pinned
        self.max_cached = max_cached
        self.zero_on_release = zero_on_release
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._hits: dict[int, int] = defaultdict(int)
        self._misses: dict[int, int] = defaultdict(int)
        self._in_use: dict[int, int] = defaultdict(int)
        self._cached_bytes = 0
        self._in_use_bytes = 0
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A ``uint8`` buffer of at least ``nbytes`` (rounded by :func:`size_class`); contents unspecified."""
        size, band = size_class(nbytes), class_of(nbytes)
        with self._lock:
            self._in_use[band] += 1
            self._in_use_bytes += size
            if self._free[size]:
                self._hits[band] += 1
                self._cached_bytes -= size
                return self._free[size].pop()
            self._misses[band] += 1
        import torch

        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)

    def release(self, buffer: torch.Tensor) -> None:
        """Give ``buffer`` back: cached for reuse while the cache has room, else freed."""
        size = buffer.numel()
        if self.zero_on_release:
            buffer.zero_()  # the next owner must never see this owner's bytes
        with self._lock:
            self._in_use[class_of(size)] -= 1
            self._in_use_bytes -= size
            if self._cached_bytes + size <= self.max_cached:
                self._free[size].append(buffer)
                self._cached_bytes += size

    def forget(self, buffer: torch.Tensor) -> None:
        """``buffer`` leaves the pool for good (someone else still holds it): not reused, not counted."""
        size = buffer.numel()
        with self._lock:
            self._in_use[class_of(size)] -= 1
            self._in_use_bytes -= size

    def trim(self) -> int:
        """Free every cached buffer; return the bytes given back."""
        with self._lock:
            freed = self._cached_bytes
            self._free.clear()
            self._cached_bytes = 0
            return freed

    def stats(self) -> PoolStats:
        with self._lock:
            cached: dict[int, int] = defaultdict(int)
            for size, buffers in self._free.items():
                cached[class_of(size)] += len(buffers)
            bands = sorted(set(self._hits) | set(self._misses), key=lambda b: b or 1 << 62)
            classes = tuple(
                ClassStats(b, self._hits[b], self._misses[b], self._in_use[b], cached[b]) for b in bands
            )
            return PoolStats(self.pinned, classes, self._cached_bytes, self._in_use_bytes)
