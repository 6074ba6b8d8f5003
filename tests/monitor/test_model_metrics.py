"""Per-model Prometheus series for a server: where each model is, its loads and moves, and how
long its requests took."""

from __future__ import annotations

import pytest
import torch

from memplan import Device, ResidencyManager, get_tier
from memplan.monitor import MemplanCollector

GPU = Device("cuda", 0)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(collector: MemplanCollector) -> Samples:
    """What Prometheus reads off ``collector``: sample name and sorted labels to value."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def model(samples: Samples, name: str, value: str) -> float:
    return samples[(name, (("model", value),))]


def manager() -> ResidencyManager:
    return ResidencyManager(
        [get_tier("memory", 1 << 20, name="gpu", device=GPU), get_tier("memory", name="host")]
    )


def test_each_model_has_its_tier_bytes_leases_loads_and_moves() -> None:
    rm = manager()
    rm.register("chat", {"w": torch.randn(1000)})
    rm.register("embed", {"w": torch.randn(500)})
    collector = MemplanCollector(manager=rm, models=["chat", "embed", "later"])
    rm.demote("chat")
    with rm.use("chat"):  # back up: a promotion
        leased = scrape(collector)
    rm.demote("embed")
    samples = scrape(collector)

    assert samples[("memplan_model_tier", (("model", "chat"), ("tier", "gpu")))] == 1
    assert samples[("memplan_model_tier", (("model", "chat"), ("tier", "host")))] == 0
    assert samples[("memplan_model_tier", (("model", "embed"), ("tier", "host")))] == 1
    assert model(samples, "memplan_model_bytes", "chat") == 4000
    assert model(leased, "memplan_model_leases", "chat") == 1
    assert model(samples, "memplan_model_leases", "chat") == 0
    assert model(samples, "memplan_model_promotions_total", "chat") == 1
    assert model(samples, "memplan_model_demotions_total", "chat") == 1
    assert model(samples, "memplan_model_promotions_total", "embed") == 0
    assert model(samples, "memplan_model_demotions_total", "embed") == 1
    assert model(samples, "memplan_model_loads_total", "chat") == 1
    # Added to the server, not loaded yet: its counters are there from the start, at zero.
    assert model(samples, "memplan_model_loads_total", "later") == 0
    assert ("memplan_model_tier", (("model", "later"), ("tier", "gpu"))) not in samples


def test_request_latency_is_a_histogram_per_model() -> None:
    collector = MemplanCollector(models=["chat", "idle"])
    for seconds in (0.003, 0.2, 0.25, 12.0):
        collector.observe_request("chat", seconds)
    samples = scrape(collector)

    def bucket(le: str) -> float:
        return samples[("memplan_request_seconds_bucket", (("le", le), ("model", "chat")))]

    assert bucket("0.005") == 1
    assert bucket("0.25") == 3  # a bucket counts values up to and including its bound
    assert bucket("10.0") == 3 and bucket("30.0") == 4 and bucket("+Inf") == 4
    assert model(samples, "memplan_request_seconds_count", "chat") == 4
    assert model(samples, "memplan_request_seconds_sum", "chat") == pytest.approx(12.453)
    assert model(samples, "memplan_request_seconds_count", "idle") == 0


def test_move_counts_stay_exact_past_the_managers_window_of_moves() -> None:
    """The manager keeps its last 1000 moves; a server observing each request counts them all,
    however rarely Prometheus scrapes."""
    rm = manager()
    rm.register("chat", {"w": torch.randn(100)})
    collector = MemplanCollector(manager=rm, models=["chat"])
    for _ in range(600):
        rm.demote("chat")
        with rm.use("chat"):
            pass
        collector.observe_request("chat", 0.001)
    assert len(rm.moves) == rm.moves.maxlen  # 1200 moves: the first 200 have left the window
    samples = scrape(collector)
    assert model(samples, "memplan_model_promotions_total", "chat") == 600
    assert model(samples, "memplan_model_demotions_total", "chat") == 600
    assert model(samples, "memplan_model_loads_total", "chat") == 1
