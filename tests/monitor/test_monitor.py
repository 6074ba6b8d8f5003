"""The monitor, leak detector, gc stats, Prometheus endpoint, timeline PNG and doctor."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from memplan import Device, ResidencyManager, get_tier
from memplan.gpu import DeviceMemory, Probe, ProbeResult
from memplan.monitor import (
    Environment,
    GCStats,
    LeakDetector,
    MemoryMonitor,
    Thresholds,
    diagnose,
    model_findings,
    plot_timeline,
    serve,
)
from tests.conftest import free_port

GPU = Device("cuda", 0)
GiB = 1 << 30


class SteppingProbe(Probe):
    """A GPU whose used/total ratio steps through ``ratios``; ``None`` makes a sample fail."""

    name = "stepping"

    def __init__(self, ratios: list[float | None]) -> None:
        self.ratios = list(ratios)

    def measure(self) -> ProbeResult:
        ratio = self.ratios.pop(0) if len(self.ratios) > 1 else self.ratios[0]
        if ratio is None:
            raise RuntimeError("NVML went away")
        return ProbeResult(memories=[DeviceMemory(GPU, 100 * GiB, int((1 - ratio) * 100 * GiB), "nvml")])


def test_states_rise_at_thresholds_fall_with_hysteresis_and_callbacks_hear_each_change() -> None:
    ratios = [0.5, 0.76, 0.74, 0.69, 0.91, 0.96, 0.93, 0.89, 0.5]
    monitor = MemoryMonitor([SteppingProbe(ratios)], thresholds=Thresholds())
    heard: list[tuple[str, str]] = []
    monitor.on_state_change(lambda c: heard.append((c.old, c.new)))
    monitor.on_state_change(lambda c: 1 / 0)  # a broken callback must not stop the others
    states = []
    for _ in ratios:
        monitor.sample_once()
        states.append(monitor.states[GPU])
    assert states == [
        "normal", "warning", "warning", "normal", "critical", "emergency", "emergency", "critical", "normal",
    ]  # fmt: skip
    assert heard[0] == ("normal", "warning") and len(heard) == 6
    assert monitor.counters.callback_errors == 6


def test_a_failing_source_is_reported_and_sampling_goes_on() -> None:
    monitor = MemoryMonitor([SteppingProbe([0.5, None, 0.6])], interval_s=0.01)
    samples = [monitor.sample_once() for _ in range(3)]
    assert samples[1].problems and "NVML went away" in samples[1].problems[0]
    assert GPU not in samples[1].readings and samples[2].readings[GPU].ratio == pytest.approx(0.6)
    assert monitor.counters.source_problems == 1


def test_history_is_a_ring_buffer_and_stop_is_prompt() -> None:
    monitor = MemoryMonitor([SteppingProbe([0.1])], interval_s=0.5, history=5)
    with monitor:
        time.sleep(0.05)
    for _ in range(10):
        monitor.sample_once()
    assert len(monitor.samples) == 5
    monitor.start()
    time.sleep(0.05)
    began = time.perf_counter()
    monitor.stop()
    assert time.perf_counter() - began < 0.5 and monitor._worker.thread is not None
    monitor._worker.thread.join(timeout=0.5)  # past its last pass, the thread only has to exit
    assert not monitor._worker.thread.is_alive()


def test_the_monitor_drives_the_residency_managers_pressure_levels() -> None:
    rm = ResidencyManager([get_tier("memory", name="gpu", device=GPU), get_tier("memory", name="host")])
    rm.register("m", {"w": torch.randn(8)})
    monitor = MemoryMonitor([SteppingProbe([0.5, 0.85])])
    monitor.drive(rm)
    monitor.sample_once()
    assert not rm.responses
    monitor.sample_once()
    deadline = time.monotonic() + 10  # answered on the manager's own worker, soon
    while not rm.responses and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rm.responses[-1].level == "medium" and rm.tier_of("m").name == "host"
    rm.close()


def test_a_slow_move_under_pressure_does_not_stop_the_sampling() -> None:
    """The demotion pressure asks for runs on the manager's worker: a tier that takes seconds to
    write delays that worker, never the sampler (which used to run the moves itself)."""
    import threading

    from memplan.residency.tiers.memory import MemoryTier

    release = threading.Event()

    class SlowTier(MemoryTier):
        def put(self, key: str, tensor: torch.Tensor) -> int:
            release.wait(10)
            return super().put(key, tensor)

    rm = ResidencyManager([get_tier("memory", name="gpu", device=GPU), SlowTier(name="host")])
    rm.register("m", {"w": torch.randn(8)})
    monitor = MemoryMonitor([SteppingProbe([0.85] * 10)])
    monitor.drive(rm)
    began = time.perf_counter()
    for _ in range(5):
        monitor.sample_once()
    assert time.perf_counter() - began < 2  # the move is stuck in the slow put meanwhile
    assert rm.tier_of("m").name == "gpu"
    release.set()
    deadline = time.monotonic() + 10
    while rm.tier_of("m").name != "host" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rm.tier_of("m").name == "host"
    rm.close()


def test_an_injected_leak_is_found_and_a_steady_workload_is_not() -> None:
    kept: list[torch.Tensor] = []
    clock = SimpleNamespace(now=0.0)
    used = {"cpu": 1 * GiB}
    leaky = LeakDetector(lambda: dict(used), window_s=60, threshold_bytes=50_000_000, clock=lambda: clock.now)
    for _ in range(8):
        kept.append(torch.ones(3_000_000))  # 12 MB a step, never let go: the leak
        used["cpu"] += 12_000_000
        clock.now += 5
        leaky.snapshot()
    (report,) = leaky.check()
    assert report.growth_bytes == 84_000_000 and report.rate_bytes_per_s == pytest.approx(84e6 / 35)
    assert any("live tensors on cpu" in s for s in report.suspects)
    assert any(".detach()" in a for a in report.advice)
    assert "grew" in report.explain()

    steady_used = {"cpu": 1 * GiB}
    steady = LeakDetector(lambda: dict(steady_used), threshold_bytes=50_000_000, clock=lambda: clock.now)
    for step in range(8):  # a workload that allocates and frees 200 MB each step
        steady_used["cpu"] = 1 * GiB + (200_000_000 if step % 2 else 0)
        clock.now += 5
        steady.snapshot()
    assert steady.check() == []


def test_gc_stats_count_collections_and_alert_on_long_pauses() -> None:
    alerts = []
    with GCStats(alert_ms=0.0, alert=alerts.append) as stats:
        gc.collect()
    assert stats.generations[2].collections >= 1 and stats.generations[2].total_s > 0
    assert alerts and alerts[0].generation == 2
    before = stats.generations[2].collections
    gc.collect()
    assert stats.generations[2].collections == before  # uninstalled


def test_prometheus_endpoint_serves_device_and_tier_metrics() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    rm = ResidencyManager(
        [get_tier("memory", 1 << 20, name="gpu", device=GPU), get_tier("memory", name="host")]
    )
    rm.register("m", {"w": torch.randn(1000)})
    rm.demote("m")
    monitor = MemoryMonitor([SteppingProbe([0.8])])
    monitor.sample_once()
    port = free_port()
    server, _ = serve(f"127.0.0.1:{port}", monitor=monitor, manager=rm)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip
    assert samples[
        ("memplan_device_memory_used_bytes", (("device", "cuda:0"), ("source", "nvml")))
    ] == pytest.approx(80 * GiB, abs=1)
    assert samples[("memplan_pressure_state", (("device", "cuda:0"),))] == 1  # warning
    assert samples[("memplan_tier_used_bytes", (("tier", "host"),))] == 4000
    assert samples[("memplan_bytes_moved_total", (("route", "gpu->host"),))] == 4000


def test_timeline_png_is_written(tmp_path: Path) -> None:
    monitor = MemoryMonitor([SteppingProbe([0.2, 0.5, 0.8, 0.92, 0.97, 0.6])])
    for _ in range(6):
        monitor.sample_once()
    path = tmp_path / "timeline.png"
    plot_timeline(list(monitor.samples), path, thresholds=monitor.thresholds, events=list(monitor.events))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert int.from_bytes(data[16:20], "big") == 900  # width: 9 in at 100 dpi


def test_monitor_cli_plots_a_simulated_machine(tmp_path: Path) -> None:
    png = tmp_path / "t.png"
    out = subprocess.run(
        [sys.executable, "-m", "memplan", "monitor", "--duration", "0.5", "--interval", "0.1", "--plot", str(png),
         "--simulate", "cuda:0=24GiB,cpu=64GiB"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "cuda:0 0 B/24.0 GiB 0% normal" in out.stdout and png.read_bytes()[:4] == b"\x89PNG"


class FakeNvml:
    def __init__(self, count: int) -> None:
        self.count = count

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54"


def fake_torch(cuda: int) -> Any:
    return SimpleNamespace(
        __version__="2.13.0+cpu", version=SimpleNamespace(cuda=None),
        cuda=SimpleNamespace(is_available=lambda: cuda > 0, device_count=lambda: cuda),
        backends=SimpleNamespace(mps=SimpleNamespace(is_available=lambda: False)),
    )  # fmt: skip


def broken_bnb() -> str:
    raise OSError("libbitsandbytes_cpu.so: cannot open shared object file")


def test_doctor_on_a_broken_machine_says_what_to_fix(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    spill.mkdir(mode=0o755)
    env = Environment(
        nvml=lambda: FakeNvml(2), torch=lambda: fake_torch(0), cgroup_limit=lambda: 8 * GiB,
        physical_ram=lambda: 64 * GiB, swap=lambda: (8 * GiB, 7 * GiB), bitsandbytes=broken_bnb,
        memlock=lambda: 64 << 10, spill_dir=spill,
    )  # fmt: skip
    found = {f.check: f for f in diagnose(env)}
    assert found["nvml"].status == "ok" and "2 GPU(s)" in found["nvml"].detail
    assert found["torch"].status == "fail" and "CUDA build" in found["torch"].advice
    assert found["cgroup"].status == "warn" and "8.0 GiB" in found["cgroup"].detail
    assert found["swap"].status == "warn"
    assert found["spill dir"].status == "warn" and "chmod 700" in found["spill dir"].advice
    assert found["bitsandbytes"].status == "warn" and "memplan[quant]" in found["bitsandbytes"].advice
    assert found["pinned memory"].status == "warn"
    healthy = Environment(
        nvml=lambda: FakeNvml(1), torch=lambda: fake_torch(1), cgroup_limit=lambda: None,
        physical_ram=lambda: 64 * GiB, swap=lambda: (0, 0), bitsandbytes=lambda: "0.50",
        memlock=lambda: -1, spill_dir=tmp_path / "new",
    )  # fmt: skip
    assert all(f.status == "ok" for f in diagnose(healthy)), diagnose(healthy)


def test_doctor_with_a_model_says_what_would_load_it_better(hollow_70b: Path) -> None:
    findings = model_findings(hollow_70b, "cuda:0=80GiB,cpu=256GiB,disk=2TiB")
    assert findings[0].status == "ok" and findings[0].check == "plan"
    assert any(f.check == "for full" and "free or add" in f.advice for f in findings)
    out = subprocess.run(
        [sys.executable, "-m", "memplan", "doctor", str(hollow_70b), "--simulate", "cuda:0=80GiB,cpu=256GiB,disk=2TiB"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "[  ok] plan" in out.stdout and "for full" in out.stdout


def test_threads_see_consistent_samples() -> None:
    monitor = MemoryMonitor([SteppingProbe([0.3])], interval_s=0.001, history=50)
    with monitor:
        reads = [len(monitor.history(GPU)) for _ in range(200)]
        threading.Event().wait(0.05)
    assert max(reads) <= 50 and monitor.counters.samples > 0


def test_a_callback_that_stops_its_monitor_ends_it_and_a_later_stop_returns() -> None:
    monitor = MemoryMonitor(interval_s=0.02)
    monitor.on_sample(lambda _: monitor.stop())
    monitor.start()
    assert monitor._worker.thread is not None
    monitor._worker.thread.join(timeout=5)
    assert not monitor._worker.thread.is_alive()
    stopper = threading.Thread(target=monitor.stop, daemon=True)
    stopper.start()
    stopper.join(timeout=5)
    assert not stopper.is_alive(), "stop() hung after the monitor's own callback stopped it"
