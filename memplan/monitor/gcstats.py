"""Garbage-collector statistics through ``gc.callbacks``: collections and pause times per
generation, and an alert when one pause runs longer than a threshold."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GCPause", "GCStats", "GenerationStats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GCPause:
    generation: int
    seconds: float
    collected: int
    at: float


@dataclass
class GenerationStats:
    collections: int = 0
    collected: int = 0
    total_s: float = 0.0
    max_s: float = 0.0


@dataclass
class GCStats:
    """Install with :meth:`install` (or ``with``); ``alert`` hears pauses above ``alert_ms``."""

    alert_ms: float = 100.0
    alert: Callable[[GCPause], Any] | None = None
    generations: dict[int, GenerationStats] = field(
        default_factory=lambda: {g: GenerationStats() for g in range(3)}
    )
    long_pauses: list[GCPause] = field(default_factory=list)
    _started: dict[int, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        key = threading.get_ident()
        if phase == "start":
            self._started[key] = time.perf_counter()
            return
        began = self._started.pop(key, None)
        if began is None:
            return  # installed mid-collection
        pause = GCPause(
            int(info.get("generation", 0)),
            time.perf_counter() - began,
            int(info.get("collected", 0)),
            time.time(),
        )
        with self._lock:
            g = self.generations.setdefault(pause.generation, GenerationStats())
            g.collections += 1
            g.collected += pause.collected
            g.total_s += pause.seconds
            g.max_s = max(g.max_s, pause.seconds)
            if pause.seconds * 1000 < self.alert_ms:
                return
            self.long_pauses.append(pause)
        log.warning("gc generation %d paused %.1f ms", pause.generation, pause.seconds * 1000)
        if self.alert is not None:
            self.alert(pause)

    def install(self) -> GCStats:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def __enter__(self) -> GCStats:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()
