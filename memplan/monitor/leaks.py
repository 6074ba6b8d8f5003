"""Leak detection: snapshots over a window; growth above a threshold gives a report with the
suspects (residency entries that grew, live tensors by device, gc object counts by type) and
advice a user can act on."""

from __future__ import annotations

import gc
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memplan._torch_imported import imported_torch

__all__ = ["LeakDetector", "LeakReport", "Snapshot"]


@dataclass(frozen=True)
class Snapshot:
    at: float
    used: dict[str, int]  # device -> bytes in use (RSS for the host)
    tensors: dict[str, tuple[int, int]]  # device -> (live tensors, bytes)
    objects: dict[str, int]  # type name -> live gc-tracked objects
    entries: dict[str, int]  # residency entry -> bytes


@dataclass(frozen=True)
class LeakReport:
    device: str
    growth_bytes: int
    seconds: float
    suspects: tuple[str, ...]
    advice: tuple[str, ...]

    @property
    def rate_bytes_per_s(self) -> float:
        return self.growth_bytes / self.seconds if self.seconds else 0.0

    def explain(self) -> str:
        from memplan.units import format_size

        head = (
            f"{self.device} grew {format_size(self.growth_bytes)} in {self.seconds:.1f} s "
            f"({format_size(int(self.rate_bytes_per_s))}/s)"
        )
        return "\n".join(
            [head, *(f"  suspect: {s}" for s in self.suspects), *(f"  advice: {a}" for a in self.advice)]
        )


def _tensor_census() -> dict[str, tuple[int, int]]:
    torch = imported_torch()
    census: dict[str, list[int]] = {}
    if torch is None:
        return {}
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance reads __class__, which some lazy modules warn on.
        if issubclass(type(obj), torch.Tensor) and not obj.is_meta:
            entry = census.setdefault(str(obj.device), [0, 0])
            entry[0] += 1
            entry[1] += obj.numel() * obj.element_size()
    return {d: (n, b) for d, (n, b) in census.items()}


def _object_census() -> dict[str, int]:
    return dict(Counter(type(o).__name__ for o in gc.get_objects()))


class LeakDetector:
    """Call :meth:`snapshot` periodically (or hook it to a monitor); :meth:`check` reports."""

    def __init__(
        self,
        used: Callable[[], dict[str, int]],
        *,
        window_s: float = 60.0,
        threshold_bytes: int = 50_000_000,
        manager: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.used = used
        self.window_s = window_s
        self.threshold_bytes = threshold_bytes
        self.manager = manager
        self.clock = clock
        self.snapshots: deque[Snapshot] = deque()

    def snapshot(self) -> Snapshot:
        entries = {}
        if self.manager is not None:
            entries = {name: self.manager.info(name).nbytes for name in self.manager.names()}
        snap = Snapshot(self.clock(), dict(self.used()), _tensor_census(), _object_census(), entries)
        self.snapshots.append(snap)
        while self.snapshots and snap.at - self.snapshots[0].at > self.window_s:
            self.snapshots.popleft()
        return snap

    def check(self) -> list[LeakReport]:
        """A report per device whose use grew more than the threshold across the window."""
        if len(self.snapshots) < 2:
            return []
        first, last = self.snapshots[0], self.snapshots[-1]
        reports = []
        for device, now in last.used.items():
            growth = now - first.used.get(device, now)
            if growth > self.threshold_bytes and self._monotone(device):
                suspects = self._suspects(first, last)
                reports.append(LeakReport(device, growth, last.at - first.at, suspects, _advice(suspects)))
        return reports

    def _monotone(self, device: str) -> bool:
        # A leak keeps growing; a workload that rises and falls back within the window does not.
        values = [s.used.get(device, 0) for s in self.snapshots]
        return min(values[len(values) // 2 :]) >= values[0] + self.threshold_bytes // 2

    def _suspects(self, first: Snapshot, last: Snapshot) -> tuple[str, ...]:
        from memplan.units import format_size

        found = []
        for name, nbytes in last.entries.items():
            if nbytes > first.entries.get(name, 0):
                found.append(
                    f"residency entry {name!r} grew {format_size(nbytes - first.entries.get(name, 0))}"
                )
        for device, (count, nbytes) in last.tensors.items():
            before = first.tensors.get(device, (0, 0))
            if nbytes - before[1] > 0:
                found.append(
                    f"live tensors on {device}: +{count - before[0]} ({format_size(nbytes - before[1])} more)"
                )
        grown = Counter({t: n - first.objects.get(t, 0) for t, n in last.objects.items()})
        found += [f"{t} objects: +{n}" for t, n in grown.most_common(3) if n > 0]
        return tuple(found)


def _advice(suspects: tuple[str, ...]) -> tuple[str, ...]:
    advice = []
    if any(s.startswith("live tensors") for s in suspects):
        advice.append(
            "tensors are being kept alive: look for lists or caches that append outputs, "
            "and call .detach() / .item() on values you keep across steps"
        )
    if any(s.startswith("residency entry") for s in suspects):
        advice.append(
            "an entry grew after registration: register a fresh copy instead of mutating one in place"
        )
    if any("dict objects" in s or "list objects" in s for s in suspects):
        advice.append(
            "plain Python containers are growing: check per-request logs or histories that are never trimmed"
        )
    advice.append("run with `memplan monitor --plot timeline.png` to see when the growth starts")
    return tuple(advice)
