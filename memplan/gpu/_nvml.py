"""CUDA devices through NVML (the ``pynvml`` module of ``nvidia-ml-py``).

NVML answers without creating a CUDA context, so probing costs no GPU memory and does not
initialise CUDA in a process that may fork. NVML numbers every GPU on the machine; CUDA numbers
only those ``CUDA_VISIBLE_DEVICES`` lets through, so the probe applies that variable to report
the indices torch will use. (With ``CUDA_DEVICE_ORDER`` left at FASTEST_FIRST on a machine of
mixed GPUs, CUDA may order them differently from NVML's PCI order; when torch has initialised
CUDA, the torch probe's figures replace these.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from memplan.gpu._base import Probe, ProbeResult, register_probe
from memplan.gpu.device import Device, DeviceMemory

__all__ = ["NvmlProbe", "visible_nvml_indices"]

# NVML's codes for "no library" and "no driver": a machine without NVIDIA GPUs, not a fault.
_ABSENT_CODES = frozenset({9, 12})


def _load_pynvml() -> Any:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def visible_nvml_indices(count: int, uuids: Sequence[str], visible: str | None) -> list[int]:
    """NVML indices in CUDA order under ``CUDA_VISIBLE_DEVICES``.

    Like the CUDA runtime, an entry that names no device ends the list, and an entry may be an
    index or a (prefix of a) UUID such as ``GPU-8c3f``.
    """
    if visible is None:
        return list(range(count))
    chosen: list[int] = []
    for raw in visible.split(","):
        entry = raw.strip()
        index = _match_entry(entry, count, uuids)
        if index is None or index in chosen:
            break
        chosen.append(index)
    return chosen


def _match_entry(entry: str, count: int, uuids: Sequence[str]) -> int | None:
    if entry.isdigit():
        return int(entry) if int(entry) < count else None
    if not entry:
        return None
    matches = [i for i, uuid in enumerate(uuids) if uuid.lower().startswith(entry.lower())]
    return matches[0] if len(matches) == 1 else None


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlProbe(Probe):
    """CUDA devices from NVML; ``nvml`` is the module (or a fake with the same functions)."""

    name = "nvml"

    def __init__(
        self,
        *,
        nvml: Any | None = None,
        load: Callable[[], Any] = _load_pynvml,
        visible_devices: str | None = None,
        read_env: bool = True,
        own_pid: int | None = None,
    ) -> None:
        self.nvml = nvml if nvml is not None else load()
        env = os.environ.get("CUDA_VISIBLE_DEVICES") if read_env else None
        self.visible_devices = visible_devices if visible_devices is not None else env
        self.own_pid = own_pid if own_pid is not None else os.getpid()

    def measure(self) -> ProbeResult:
        result = ProbeResult()
        nvml = self.nvml
        if nvml is None:
            return result
        try:
            nvml.nvmlInit()
        except Exception as exc:
            if getattr(exc, "value", None) not in _ABSENT_CODES:
                result.problem("nvml", f"cannot initialise NVML: {exc}")
            return result
        try:
            self._measure_devices(nvml, result)
        finally:
            try:
                nvml.nvmlShutdown()
            except Exception as exc:
                result.problem("nvml", f"nvmlShutdown failed: {exc}")
        return result

    def _measure_devices(self, nvml: Any, result: ProbeResult) -> None:
        try:
            count = int(nvml.nvmlDeviceGetCount())
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            uuids = [_as_str(nvml.nvmlDeviceGetUUID(h)) for h in handles]
        except Exception as exc:
            result.problem("nvml", f"cannot enumerate devices: {exc}")
            return
        for cuda_index, nvml_index in enumerate(visible_nvml_indices(count, uuids, self.visible_devices)):
            device = Device("cuda", cuda_index)
            try:
                result.memories.append(self._device_memory(nvml, handles[nvml_index], device, result))
            except Exception as exc:
                result.problem("nvml", f"{device} (NVML index {nvml_index}): {exc}")

    def _device_memory(self, nvml: Any, handle: Any, device: Device, result: ProbeResult) -> DeviceMemory:
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        total, free = int(info.total), int(info.free)
        name = _as_str(nvml.nvmlDeviceGetName(handle))
        return DeviceMemory(
            device,
            total,
            min(free, total),
            "nvml",
            self._others_usage(nvml, handle, device, result),
            name,
        )

    def _others_usage(self, nvml: Any, handle: Any, device: Device, result: ProbeResult) -> int:
        # Inside a PID namespace NVML reports host PIDs, so this process may be counted too;
        # its own usage is then part of "others", which errs on the side of less room.
        try:
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception as exc:
            result.problem("nvml", f"{device}: cannot list processes: {exc}")
            return 0
        return sum(int(p.usedGpuMemory or 0) for p in processes if p.pid != self.own_pid)


register_probe(NvmlProbe.name, NvmlProbe)
