"""Prometheus metrics from the monitor, residency manager and load reports.

A custom collector reads the live objects at scrape time, so nothing is copied between scrapes
and a scrape always shows the current figures.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from memplan.errors import InvalidAddress, MissingDependency

__all__ = ["MemplanCollector", "parse_address", "serve"]

_STATE_VALUE = {"normal": 0, "warning": 1, "critical": 2, "emergency": 3}


def _client() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError:
        raise MissingDependency("prometheus-client", "monitor", "Prometheus metrics") from None
    return prometheus_client


class MemplanCollector:
    """Yields memplan's metrics from ``monitor``, ``manager`` and ``loads`` (any may be None)."""

    def __init__(self, monitor: Any = None, manager: Any = None, loads: Sequence[Any] = ()) -> None:
        self.monitor, self.manager, self.loads = monitor, manager, loads

    def collect(self) -> Iterator[Any]:
        core = _client().core
        yield from self._device_metrics(core)
        yield from self._residency_metrics(core)
        seconds = core.GaugeMetricFamily(
            "memplan_load_seconds", "Seconds the last load of a model took", labels=["model", "strategy"]
        )
        for report in self.loads:
            seconds.add_metric([str(report.model), str(report.strategy.kind)], report.seconds)
        yield seconds

    def _device_metrics(self, core: Any) -> Iterator[Any]:
        used = core.GaugeMetricFamily(
            "memplan_device_memory_used_bytes", "Bytes in use per device", labels=["device", "source"]
        )
        total = core.GaugeMetricFamily(
            "memplan_device_memory_total_bytes", "Bytes per device", labels=["device", "source"]
        )
        state = core.GaugeMetricFamily(
            "memplan_pressure_state", "0 normal, 1 warning, 2 critical, 3 emergency", labels=["device"]
        )
        if self.monitor is not None and self.monitor.samples:
            for device, r in self.monitor.samples[-1].readings.items():
                used.add_metric([str(device), r.source], r.used)
                total.add_metric([str(device), r.source], r.total)
            for device, s in self.monitor.states.items():
                state.add_metric([str(device)], _STATE_VALUE[s])
        yield from (used, total, state)

    def _residency_metrics(self, core: Any) -> Iterator[Any]:
        tier_used = core.GaugeMetricFamily("memplan_tier_used_bytes", "Bytes held per tier", labels=["tier"])
        tier_cap = core.GaugeMetricFamily("memplan_tier_capacity_bytes", "Capacity per tier", labels=["tier"])
        evictions = core.CounterMetricFamily("memplan_evictions", "Entries demoted to make room")
        moved = core.CounterMetricFamily("memplan_bytes_moved", "Bytes moved between tiers", labels=["route"])
        if self.manager is not None:
            stats = self.manager.stats()
            for t in stats.tiers:
                tier_used.add_metric([t.name], t.used)
                tier_cap.add_metric([t.name], t.capacity)
            evictions.add_metric([], stats.evictions)
            for route, nbytes in stats.bytes_by_route.items():
                moved.add_metric([route], nbytes)
        yield from (tier_used, tier_cap, evictions, moved)


def parse_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (or ``":PORT"`` for 127.0.0.1) as (host, port); :class:`InvalidAddress` if not."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit():
        raise InvalidAddress(address, "expected HOST:PORT, e.g. 127.0.0.1:9400")
    if not 1 <= int(port) <= 65535:
        raise InvalidAddress(address, f"port {port} is outside 1-65535")
    return host or "127.0.0.1", int(port)


def serve(address: str, *, monitor: Any = None, manager: Any = None, loads: Sequence[Any] = ()) -> Any:
    """Serve the metrics over HTTP at ``host:port``; returns (server, thread).

    Raises :class:`InvalidAddress` for a malformed address or one the OS will not listen on.
    """
    host, port = parse_address(address)
    client = _client()
    registry = client.CollectorRegistry()
    registry.register(MemplanCollector(monitor, manager, loads))
    try:
        return client.start_http_server(port, addr=host, registry=registry)
    except OSError as exc:  # the OS's message names neither the host nor the port
        raise InvalidAddress(address, f"cannot listen there: {exc.strerror or exc}") from exc
