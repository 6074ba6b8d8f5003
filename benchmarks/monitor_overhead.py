"""What the memory monitor costs: CPU time at 10 samples/s, against the same workload without it.

The workload is fixed work (float32 matmuls on one thread); each run measures the process's CPU
time. The monitor uses its default sources (host RAM with cgroups, NVML, torch.cuda, MPS).
Goal: <= 1% of one core.

    python benchmarks/monitor_overhead.py
    python benchmarks/monitor_overhead.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from memplan.monitor import MemoryMonitor


def workload(steps: int) -> None:
    a = torch.randn(256, 256)
    for _ in range(steps):
        a = torch.tanh(a @ a / 256)


def cpu_run(steps: int, monitor: MemoryMonitor | None) -> tuple[float, float]:
    if monitor is not None:
        monitor.start()
    wall, cpu = time.perf_counter(), time.process_time()
    workload(steps)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if monitor is not None:
        monitor.stop()
    return cpu, wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps, rounds = (200, 2) if args.quick else (3000, 5)
    workload(20)
    without, with_monitor, samples, per_sample = [], [], 0, []
    for _ in range(rounds):
        without.append(cpu_run(steps, None))
        monitor = MemoryMonitor(interval_s=0.1)
        with_monitor.append(cpu_run(steps, monitor))
        samples += monitor.counters.samples
        per_sample.append(monitor.counters.sample_seconds / max(1, monitor.counters.samples))
    base_cpu = statistics.median(c for c, _ in without)
    mon_cpu = statistics.median(c for c, _ in with_monitor)
    wall = statistics.median(w for _, w in with_monitor)
    extra = (mon_cpu - base_cpu) / wall
    print(f"workload alone:     {base_cpu:.2f} s CPU")
    print(f"with monitor 10/s:  {mon_cpu:.2f} s CPU over {wall:.2f} s ({samples} samples in all)")
    print(f"one sample:         {statistics.median(per_sample) * 1e3:.2f} ms")
    print(f"monitor cost:       {extra:.2%} of one core (goal <= 1%); "
          f"{statistics.median(per_sample) * 10:.2%} from sample time alone")  # fmt: skip


if __name__ == "__main__":
    main()
