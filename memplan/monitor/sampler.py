"""``MemoryMonitor``: a sampling thread over the same probes ``memplan probe`` uses.

Each sample holds, per device, used and total bytes (NVML, torch, cgroup or psutil, or a
simulated allocator's budgets), the process RSS, and torch's allocated/reserved bytes when
torch already initialised CUDA. Samples go into a ring buffer; each device has a state
(normal / warning / critical / emergency) that rises at a threshold and falls only once the
ratio is ``hysteresis`` below it, so a ratio hovering at a threshold does not flap. Callbacks
hear every state change; one that raises is logged and counted and the monitor goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from memplan._logtext import failure_text
from memplan._periodic import Periodic
from memplan._torch_imported import imported_torch
from memplan.gpu import (
    Allocator,
    Device,
    DeviceMemory,
    Probe,
    ProbeResult,
    get_probe,
    measure,
    probe,
    simulation_from_env,
)
from memplan.residency import level_for

__all__ = [
    "AllocatorProbe",
    "DeviceReading",
    "MemoryMonitor",
    "MonitorState",
    "Sample",
    "StateChange",
    "Thresholds",
    "default_sources",
]

log = logging.getLogger(__name__)

MonitorState = Literal["normal", "warning", "critical", "emergency"]
STATES: tuple[MonitorState, ...] = ("normal", "warning", "critical", "emergency")


@dataclass(frozen=True)
class Thresholds:
    warning: float = 0.75
    critical: float = 0.90
    emergency: float = 0.95
    hysteresis: float = 0.05

    def level(self, state: MonitorState) -> float:
        return {
            "normal": 0.0,
            "warning": self.warning,
            "critical": self.critical,
            "emergency": self.emergency,
        }[state]

    def next_state(self, current: MonitorState, ratio: float) -> MonitorState:
        """Up as soon as a threshold is reached; down only below it by ``hysteresis``."""
        reached = max((s for s in STATES if ratio >= self.level(s)), key=STATES.index)
        if STATES.index(reached) >= STATES.index(current):
            return reached
        still = [s for s in STATES if s != "normal" and ratio >= self.level(s) - self.hysteresis]
        held: MonitorState = max(still, key=STATES.index, default="normal")
        return held if STATES.index(held) <= STATES.index(current) else current


@dataclass(frozen=True)
class DeviceReading:
    device: Device
    total: int
    used: int
    source: str
    allocated: int | None = None  # torch.cuda.memory_allocated
    reserved: int | None = None  # torch.cuda.memory_reserved

    @property
    def ratio(self) -> float:
        return self.used / self.total if self.total else 0.0


@dataclass(frozen=True)
class Sample:
    at: float
    readings: dict[Device, DeviceReading]
    rss: int
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class StateChange:
    device: Device
    old: MonitorState
    new: MonitorState
    ratio: float
    at: float


class AllocatorProbe(Probe):
    """The budgets of an :class:`~memplan.Allocator` as memory figures: what a simulated device
    "uses" is what memplan placed on it."""

    name = "allocator"

    def __init__(self, allocator: Allocator) -> None:
        self.allocator = allocator

    def measure(self) -> ProbeResult:
        result = ProbeResult()
        for usage in self.allocator.stats():
            free = max(0, usage.capacity - usage.used)
            result.memories.append(DeviceMemory(usage.device, usage.capacity, free, "simulated"))
        return result


def default_sources(allocator: Allocator | None = None) -> list[Probe]:
    """Host, NVML, torch.cuda and MPS; or an allocator's budgets (for simulated devices)."""
    if allocator is None and simulation_from_env() is not None:
        allocator = Allocator(probe())  # MEMPLAN_SIMULATE: watch the simulated budgets
    if allocator is not None:
        return [AllocatorProbe(allocator)]
    return [get_probe(name) for name in ("host", "nvml", "torch.cuda", "mps")]


def _torch_counters(device: Device) -> tuple[int | None, int | None]:
    torch = imported_torch(cuda="initialized")  # never import torch (or start CUDA) just to watch it
    if device.kind != "cuda" or torch is None:
        return None, None
    return int(torch.cuda.memory_allocated(device.index)), int(torch.cuda.memory_reserved(device.index))


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


@dataclass
class _Counters:
    samples: int = 0
    callback_errors: int = 0
    source_problems: int = 0
    sample_seconds: float = 0.0


class MemoryMonitor:
    """Samples every ``interval_s`` into a ring buffer of ``history`` samples."""

    def __init__(
        self,
        sources: Sequence[Probe] | None = None,
        *,
        interval_s: float = 0.5,
        history: int = 100,
        thresholds: Thresholds | None = None,
        allocator: Allocator | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sources = list(sources) if sources is not None else default_sources(allocator)
        self.interval_s = interval_s
        self.thresholds = thresholds or Thresholds()
        self.samples: deque[Sample] = deque(maxlen=history)
        self.events: deque[StateChange] = deque(maxlen=history)
        self.states: dict[Device, MonitorState] = {}
        self.counters = _Counters()
        self.clock = clock
        self._callbacks: list[Callable[[StateChange], Any]] = []
        self._sample_listeners: list[Callable[[Sample], Any]] = []
        self._lock = threading.Lock()
        self._worker = Periodic(
            "memplan-monitor", interval_s, self.sample_once, immediately=True, on_error=self._sample_failed
        )

    def on_state_change(self, callback: Callable[[StateChange], Any]) -> None:
        self._callbacks.append(callback)

    def on_sample(self, callback: Callable[[Sample], Any]) -> None:
        self._sample_listeners.append(callback)

    def sample_once(self) -> Sample:
        """Take one sample now, update states and call the callbacks."""
        start = time.perf_counter()
        inventory = measure(self.sources)
        readings = {}
        for m in inventory:
            allocated, reserved = _torch_counters(m.device)
            readings[m.device] = DeviceReading(
                m.device, m.total, m.total - m.free, m.source, allocated, reserved
            )
        sample = Sample(self.clock(), readings, _rss(), tuple(str(p) for p in inventory.problems))
        changes = self._record(sample)
        self.counters.sample_seconds += time.perf_counter() - start
        for change in changes:
            self._notify(self._callbacks, change)
        for listener in self._sample_listeners:
            self._notify([listener], sample)
        return sample

    def _record(self, sample: Sample) -> list[StateChange]:
        changes = []
        with self._lock:
            self.samples.append(sample)
            self.counters.samples += 1
            self.counters.source_problems += len(sample.problems)
            for device, reading in sample.readings.items():
                old = self.states.get(device, "normal")
                new = self.thresholds.next_state(old, reading.ratio)
                self.states[device] = new
                if new != old:
                    change = StateChange(device, old, new, reading.ratio, sample.at)
                    self.events.append(change)
                    changes.append(change)
        return changes

    def _notify(self, callbacks: list[Callable[[Any], Any]], event: Any) -> None:
        for callback in callbacks:
            try:
                callback(event)
            except Exception as exc:  # a user's callback must not stop the monitor
                self.counters.callback_errors += 1
                log.error("memplan monitor callback %r failed: %s", callback, failure_text(exc, trace=True))

    def start(self) -> MemoryMonitor:
        self._worker.interval_s = self.interval_s
        self._worker.start()
        return self

    def _sample_failed(self, exc: Exception) -> None:
        # A failing probe is already a problem in the sample; reaching here is a bug.
        self.counters.source_problems += 1
        log.error("memplan monitor sample failed: %s", failure_text(exc, trace=True))

    def stop(self) -> None:
        """Stop sampling; returns within one interval, with the thread joined."""
        self._worker.stop()

    def __enter__(self) -> MemoryMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def drive(self, manager: Any) -> None:
        """Feed each sample's ratios to a residency manager's pressure levels. The manager answers
        on its own worker thread (``signal_pressure``): sampling goes on while entries move."""

        def respond(sample: Sample) -> None:
            for device, reading in sample.readings.items():
                if level_for(reading.ratio) != "none":  # the manager's own levels say when
                    manager.signal_pressure(reading.ratio, device)

        self.on_sample(respond)

    def history(self, device: Device) -> list[tuple[float, float]]:
        """(time, used/total) of ``device`` over the samples held."""
        with self._lock:
            return [(s.at, s.readings[device].ratio) for s in self.samples if device in s.readings]
