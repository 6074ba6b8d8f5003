"""A memory timeline PNG: each device's used/total over time, the thresholds, the state changes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from memplan.errors import MissingDependency

__all__ = ["plot_timeline"]


def plot_timeline(
    samples: Sequence[Any], path: str | os.PathLike[str], *, thresholds: Any, events: Sequence[Any] = ()
) -> None:
    """Write the timeline of ``samples`` (from a MemoryMonitor) to ``path`` as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window or need a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependency("matplotlib", "monitor", "timeline plots") from None
    start = samples[0].at if samples else 0.0
    fig, ax = plt.subplots(figsize=(9, 4), dpi=100)
    try:
        devices = sorted({d for s in samples for d in s.readings})
        for device in devices:
            points = [(s.at - start, s.readings[device].ratio * 100) for s in samples if device in s.readings]
            ax.plot(*zip(*points, strict=True), label=str(device), linewidth=1.5)
        for name in ("warning", "critical", "emergency"):
            ax.axhline(thresholds.level(name) * 100, linestyle="--", linewidth=0.8, color="grey")
            ax.text(0, thresholds.level(name) * 100 + 0.5, name, fontsize=7, color="grey")
        for event in events:
            ax.axvline(event.at - start, color="red", linewidth=0.8, alpha=0.6)
            ax.text(event.at - start, 2, f"{event.device}: {event.new}", rotation=90, fontsize=7, color="red")
        ax.set(xlabel="seconds", ylabel="memory used (%)", ylim=(0, 100), title="memplan memory timeline")
        if devices:
            ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.fspath(path), format="png")
    finally:
        plt.close(fig)
