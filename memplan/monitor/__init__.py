"""Watch memory while models run: sampler, pressure states, leaks, gc pauses, Prometheus, plots,
and ``memplan doctor``. Importing this package imports neither torch nor matplotlib."""

from memplan.monitor.doctor import Environment, Finding, diagnose, model_findings
from memplan.monitor.gcstats import GCPause, GCStats
from memplan.monitor.leaks import LeakDetector, LeakReport
from memplan.monitor.plot import plot_timeline
from memplan.monitor.prometheus import MemplanCollector, parse_address, serve
from memplan.monitor.sampler import (
    AllocatorProbe,
    DeviceReading,
    MemoryMonitor,
    Sample,
    StateChange,
    Thresholds,
    default_sources,
)

__all__ = [
    "AllocatorProbe",
    "DeviceReading",
    "Environment",
    "Finding",
    "GCPause",
    "GCStats",
    "LeakDetector",
    "LeakReport",
    "MemoryMonitor",
    "MemplanCollector",
    "Sample",
    "StateChange",
    "Thresholds",
    "default_sources",
    "diagnose",
    "model_findings",
    "parse_address",
    "plot_timeline",
    "serve",
]
