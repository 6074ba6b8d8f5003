"""Prometheus metrics from the monitor, residency manager and load reports.

A custom collector reads the live objects at scrape time, so nothing is copied between scrapes
and a scrape always shows the current figures. A server adds what only it sees: each request's
latency, per model (:meth:`MemplanCollector.observe_request`).
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from memplan.errors import InvalidAddress, MissingDependency, NoSuchEntry

__all__ = ["LATENCY_BUCKETS", "MemplanCollector", "parse_address", "serve"]

_STATE_VALUE = {"normal": 0, "warning": 1, "critical": 2, "emergency": 3}

# Seconds: prometheus_client's default buckets, and 30 s for a request that waits for a first load.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0)


def _client() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError:
        raise MissingDependency("prometheus-client", "monitor", "Prometheus metrics") from None
    return prometheus_client


class MemplanCollector:
    """Yields memplan's metrics from ``monitor``, ``manager`` and ``loads`` (any may be None).

    With a manager, each of its entries (a model) has its tier, bytes and leases, and counters of
    its loads, promotions and demotions. ``models``: names to show from the first scrape, at
    zero (models a server added and has not loaded yet). :meth:`observe_request` fills a
    request-latency histogram per model, with ``buckets`` (seconds).
    """

    def __init__(
        self,
        monitor: Any = None,
        manager: Any = None,
        loads: Sequence[Any] = (),
        *,
        models: Iterable[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        self.monitor, self.manager, self.loads = monitor, manager, loads
        self._declared = tuple(models)
        self._tally = _Tally()
        self._latency = _Latency(buckets, self._declared)

    def observe_request(self, model: str, seconds: float) -> None:
        """Count one request to ``model`` that took ``seconds`` in its latency histogram.

        Only pass names the server knows: each name is a series. The manager's moves since the
        last call are tallied too, so the per-model counters stay exact however rarely
        Prometheus scrapes (the manager keeps only its last 1000 moves)."""
        self._latency.observe(model, seconds)
        if self.manager is not None:
            self._tally.update(self.manager)

    def collect(self) -> Iterator[Any]:
        core = _client().core
        yield from self._device_metrics(core)
        yield from self._residency_metrics(core)
        yield from self._model_metrics(core)
        yield self._latency.family(core)
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

    def _model_metrics(self, core: Any) -> Iterator[Any]:
        labels = ["model"]
        tier = core.GaugeMetricFamily(
            "memplan_model_tier", "1 on the tier the model is on, 0 on the others", labels=["model", "tier"]
        )
        nbytes = core.GaugeMetricFamily("memplan_model_bytes", "Bytes of the model's tensors", labels=labels)
        leases = core.GaugeMetricFamily("memplan_model_leases", "Leases of the model held now", labels=labels)
        counters = {
            "loads": core.CounterMetricFamily(
                "memplan_model_loads", "Times the manager took the model in (loaded by a use, or registered)",
                labels=labels,
            ),
            "promotions": core.CounterMetricFamily(
                "memplan_model_promotions", "Moves of the model to a faster tier", labels=labels
            ),
            "demotions": core.CounterMetricFamily(
                "memplan_model_demotions", "Moves of the model to a slower tier", labels=labels
            ),
        }  # fmt: skip
        if self.manager is not None:
            self._tally.update(self.manager)
            for info in _infos(self.manager):
                for t in self.manager.tiers:
                    tier.add_metric([info.name, t.name], 1 if t.name == info.tier else 0)
                nbytes.add_metric([info.name], info.nbytes)
                leases.add_metric([info.name], info.leases)
            counts = self._tally.counts()
            for model in sorted(set(self._declared).union(*counts.values())):
                for what, family in counters.items():
                    family.add_metric([model], counts[what][model])
        yield from (tier, nbytes, leases, *counters.values())


def _infos(manager: Any) -> Iterator[Any]:
    """Each entry's ``EntryInfo``, in name order; one unregistered meanwhile is left out."""
    for name in sorted(manager.names()):
        try:
            yield manager.info(name)
        except NoSuchEntry:
            continue


class _Tally:
    """Per-model counts read off a manager: entries taken in (loads), moves up and down.

    A load is a name that was not among the manager's entries at the last update and is now. The
    manager keeps its last 1000 moves (``manager.moves``); an update counts those appended since
    the last one, found by the identity of the last move counted, so the counts stay exact while
    fewer than 1000 moves happen between two updates."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: Any = None  # the last Move counted (held, so its identity is never reused)
        self._present: set[str] = set()
        self._counts: dict[str, Counter[str]] = {w: Counter() for w in ("loads", "promotions", "demotions")}

    def update(self, manager: Any) -> None:
        with self._lock:
            present = set(manager.names())
            self._counts["loads"].update(present - self._present)
            self._present = present
            rank = {t.name: i for i, t in enumerate(manager.tiers)}
            for move in self._since_last(_snapshot(manager.moves)):
                up = rank[move.target] < rank[move.source]
                self._counts["promotions" if up else "demotions"][move.entry] += 1

    def _since_last(self, moves: list[Any]) -> list[Any]:
        """The moves after the last one counted (all of them if it has left the window)."""
        start = 0
        if self._last is not None:
            start = next((i + 1 for i in range(len(moves) - 1, -1, -1) if moves[i] is self._last), 0)
        if moves:
            self._last = moves[-1]
        return moves[start:]

    def counts(self) -> dict[str, Counter[str]]:
        with self._lock:
            return {what: Counter(c) for what, c in self._counts.items()}


def _snapshot(moves: Iterable[Any]) -> list[Any]:
    """A copy of the manager's ``moves`` deque while other threads append to it (copying a deque
    in C holds the GIL throughout; the retry covers an interpreter where it does not)."""
    while True:
        try:
            return list(moves)
        except RuntimeError:  # "deque mutated during iteration"
            continue


class _Latency:
    """A histogram of request seconds per model: counts per bucket and their sum, under a lock."""

    def __init__(self, buckets: Sequence[float], models: Iterable[str]) -> None:
        self.bounds = tuple(sorted(buckets))
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {m: [0] * (len(self.bounds) + 1) for m in models}
        self._sums: dict[str, float] = dict.fromkeys(self._counts, 0.0)

    def observe(self, model: str, seconds: float) -> None:
        index = bisect.bisect_left(self.bounds, seconds)  # a bucket counts values <= its bound
        with self._lock:
            self._counts.setdefault(model, [0] * (len(self.bounds) + 1))[index] += 1
            self._sums[model] = self._sums.get(model, 0.0) + seconds

    def family(self, core: Any) -> Any:
        histogram = core.HistogramMetricFamily(
            "memplan_request_seconds", "Seconds a request to the model took, waits and loads included",
            labels=["model"],
        )  # fmt: skip
        with self._lock:
            counts = {m: list(c) for m, c in self._counts.items()}
            sums = dict(self._sums)
        for model in sorted(counts):
            cumulative = list(itertools.accumulate(counts[model]))
            buckets = [(repr(float(b)), n) for b, n in zip(self.bounds, cumulative[:-1], strict=True)]
            histogram.add_metric([model], [*buckets, ("+Inf", cumulative[-1])], sums[model])
        return histogram


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
