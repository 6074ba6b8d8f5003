"""Host RAM: psutil, capped by the cgroup (v2, else v1) the process runs in.

Inside a container psutil reports the host's RAM, but the kernel kills the process at the
cgroup's limit, so the limit is the figure that matters. Limits can sit on any ancestor cgroup,
so every level from the process's own cgroup up to the root is read and the tightest one wins.
Usage is the working set (usage minus inactive page cache), as the kubelet and ``docker stats``
count it: page cache is reclaimed before the OOM killer acts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from memplan.gpu._base import Probe, ProbeResult, register_probe
from memplan.gpu.device import Device, DeviceMemory

__all__ = ["CgroupLimit", "HostProbe", "read_cgroup_limit"]

_V1_UNLIMITED = 2**62  # v1 writes "no limit" as a page-rounded 2**63 - 1


@dataclass(frozen=True)
class CgroupLimit:
    """The tightest memory limit on the process's cgroup path, and the room left under it."""

    limit: int
    headroom: int
    path: Path
    version: int


class _CgroupReadError(Exception):
    pass


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise _CgroupReadError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _read_int(path: Path) -> int | None:
    text = _read_text(path).strip()
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        raise _CgroupReadError(f"{path} holds {text[:40]!r}, not a byte count") from None


def _inactive_file(stat_path: Path, key: str) -> int:
    if not stat_path.exists():
        return 0
    for line in _read_text(stat_path).splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _cgroup_paths(proc_cgroup: Path) -> dict[str, PurePosixPath]:
    """Map "v2" and "memory" (v1) to the process's cgroup path from /proc/self/cgroup."""
    paths: dict[str, PurePosixPath] = {}
    for line in _read_text(proc_cgroup).splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            paths["v2"] = PurePosixPath(path)
        elif "memory" in controllers.split(","):
            paths["memory"] = PurePosixPath(path)
    return paths


def _levels(mount: Path, path: PurePosixPath) -> list[Path]:
    """The cgroup directories from the process's own up to the mount root that exist here."""
    rel = path.relative_to("/") if path.is_absolute() else path
    chain = [rel, *rel.parents]
    return [mount / p for p in chain if (mount / p).is_dir()] or [mount]


def _tightest(
    levels: list[Path], limit_file: str, usage_file: str, stat_key: str, version: int
) -> CgroupLimit | None:
    found: list[CgroupLimit] = []
    for level in levels:
        if not (level / limit_file).exists():
            continue
        limit = _read_int(level / limit_file)
        if limit is None or limit >= _V1_UNLIMITED:
            continue
        usage = _read_int(level / usage_file) or 0
        working_set = max(0, usage - _inactive_file(level / "memory.stat", stat_key))
        found.append(CgroupLimit(limit, max(0, limit - working_set), level, version))
    if not found:
        return None
    binding = min(found, key=lambda c: c.limit)
    return CgroupLimit(binding.limit, min(c.headroom for c in found), binding.path, version)


def read_cgroup_limit(cgroup_root: Path, proc_cgroup: Path) -> CgroupLimit | None:
    """The memory limit cgroups put on this process, or None when there is none.

    Raises ``_CgroupReadError`` (caught by the probe) when a file exists but cannot be read.
    """
    if not proc_cgroup.exists():
        return None
    paths = _cgroup_paths(proc_cgroup)
    if "v2" in paths:
        found = _tightest(
            _levels(cgroup_root, paths["v2"]), "memory.max", "memory.current", "inactive_file", 2
        )
        if found is not None:
            return found
    if "memory" in paths:
        mount = cgroup_root / "memory"
        levels = _levels(mount, paths["memory"])
        return _tightest(levels, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file", 1)
    return None


def _psutil_virtual_memory() -> Any:
    import psutil

    return psutil.virtual_memory()


class HostProbe(Probe):
    """Host RAM as ``Device("cpu")``; roots are parameters so tests hand in fake trees."""

    name = "host"

    def __init__(
        self,
        *,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        proc_cgroup: Path = Path("/proc/self/cgroup"),
        virtual_memory: Callable[[], Any] = _psutil_virtual_memory,
    ) -> None:
        self.cgroup_root = cgroup_root
        self.proc_cgroup = proc_cgroup
        self.virtual_memory = virtual_memory

    def measure(self) -> ProbeResult:
        result = ProbeResult()
        try:
            vm = self.virtual_memory()
            total, available = int(vm.total), int(vm.available)
        except Exception as exc:  # psutil raising means no host figure at all; say so, go on
            result.problem("psutil", f"cannot read host memory: {exc}")
            return result
        try:
            cap = read_cgroup_limit(self.cgroup_root, self.proc_cgroup)
        except _CgroupReadError as exc:
            result.problem("cgroup", f"{exc}; using psutil's figures")
            cap = None
        if cap is not None and cap.limit < total:
            memory = DeviceMemory(Device("cpu"), cap.limit, min(available, cap.headroom, cap.limit), "cgroup")
        else:
            memory = DeviceMemory(Device("cpu"), total, min(available, total), "psutil")
        result.memories.append(memory)
        return result


register_probe(HostProbe.name, HostProbe)
