"""``memplan monitor`` and ``memplan doctor``."""

from __future__ import annotations

import argparse
import json
import time

from memplan.gpu import Allocator, probe
from memplan.monitor.doctor import Finding, diagnose, model_findings
from memplan.monitor.sampler import AllocatorProbe, MemoryMonitor, Sample, default_sources
from memplan.units import format_size

__all__ = ["cmd_doctor", "cmd_monitor"]

_MARK = {"ok": "  ok", "warn": "WARN", "fail": "FAIL"}


def _sample_line(sample: Sample, monitor: MemoryMonitor) -> str:
    cells = [f"{time.strftime('%H:%M:%S', time.localtime(sample.at))}", f"rss {format_size(sample.rss)}"]
    for device, r in sorted(sample.readings.items()):
        state = monitor.states.get(device, "normal")
        cells.append(f"{device} {format_size(r.used)}/{format_size(r.total)} {r.ratio:.0%} {state}")
    return "  ".join(cells)


def _sample_json(sample: Sample) -> str:
    devices = {
        str(d): {"used": r.used, "total": r.total, "ratio": round(r.ratio, 4)}
        for d, r in sample.readings.items()
    }
    problems = list(sample.problems)
    return json.dumps({"at": sample.at, "rss": sample.rss, "devices": devices, "problems": problems})


def cmd_monitor(args: argparse.Namespace) -> int:
    sources = [AllocatorProbe(Allocator(probe(args.simulate)))] if args.simulate else default_sources()
    monitor = MemoryMonitor(sources, interval_s=args.interval, history=args.history)
    monitor.on_sample(lambda s: print(_sample_json(s) if args.json else _sample_line(s, monitor), flush=True))
    if args.prometheus:
        from memplan.monitor.prometheus import serve

        serve(args.prometheus, monitor=monitor)
        print(f"serving Prometheus metrics at http://{args.prometheus}/metrics", flush=True)
    deadline = time.monotonic() + args.duration if args.duration else None
    with monitor:
        try:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(min(0.1, args.interval))
        except KeyboardInterrupt:
            pass
    if args.plot:
        from memplan.monitor.plot import plot_timeline

        plot_timeline(
            list(monitor.samples), args.plot, thresholds=monitor.thresholds, events=list(monitor.events)
        )
        print(f"wrote {args.plot}")
    return 0


def _render(findings: list[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append(f"[{_MARK[f.status]}] {f.check:14} {f.detail}")
        if f.advice:
            lines.append(f"       {'':14} -> {f.advice}")
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace) -> int:
    findings = diagnose()
    if args.model:
        findings += model_findings(args.model, args.simulate)
    if args.json:
        print(json.dumps([f.__dict__ for f in findings], indent=2))
    else:
        print(_render(findings))
    return 1 if any(f.status == "fail" for f in findings) else 0
