"""Free space where spill files go (the disk tier)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from memplan.gpu._base import Probe, ProbeResult, register_probe
from memplan.gpu.device import Device, DeviceMemory

__all__ = ["DiskProbe", "default_spill_dir"]


def default_spill_dir() -> Path:
    """``$MEMPLAN_SPILL_DIR``, else memplan's folder in the user's cache dir."""
    configured = os.environ.get("MEMPLAN_SPILL_DIR")
    if configured:
        return Path(configured).expanduser()
    from platformdirs import user_cache_path

    return user_cache_path("memplan") / "spill"


def _nearest_existing(path: Path) -> Path:
    # The spill dir is created on first spill; until then its filesystem is its nearest parent's.
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return path


class DiskProbe(Probe):
    """``Device("disk")``: total and free bytes of the filesystem holding ``spill_dir``."""

    name = "disk"

    def __init__(self, *, spill_dir: Path | None = None) -> None:
        self.spill_dir = spill_dir if spill_dir is not None else default_spill_dir()

    def measure(self) -> ProbeResult:
        result = ProbeResult()
        target = _nearest_existing(self.spill_dir)
        try:
            usage = shutil.disk_usage(target)
        except OSError as exc:
            result.problem(self.name, f"cannot stat spill dir {self.spill_dir}: {exc.strerror or exc}")
            return result
        result.memories.append(
            DeviceMemory(
                Device("disk"),
                usage.total,
                min(usage.free, usage.total),
                "disk",
                name=str(self.spill_dir),
            )
        )
        return result


register_probe(DiskProbe.name, DiskProbe)
