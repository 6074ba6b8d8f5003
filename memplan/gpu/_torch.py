"""CUDA and MPS figures from torch, read only from a torch the process already imported.

``probe()`` must not be what initialises CUDA (that costs a context of several hundred MiB per
device and breaks ``fork``), so the CUDA probe speaks only when torch already did it. MPS has no
NVML; on macOS the probe imports torch to ask Metal, which is harmless there.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from memplan._torch_imported import imported_torch
from memplan.gpu._base import Probe, ProbeResult, register_probe
from memplan.gpu.device import Device, DeviceMemory

__all__ = ["MpsProbe", "TorchCudaProbe"]


def _torch_on_macos() -> Any:
    if sys.platform != "darwin":
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch


class TorchCudaProbe(Probe):
    """``torch.cuda.mem_get_info`` per device, when torch has already initialised CUDA."""

    name = "torch.cuda"

    def __init__(self, *, torch: Any | None = None, find_torch: Callable[[], Any] = imported_torch) -> None:
        self.torch = torch if torch is not None else find_torch()

    def measure(self) -> ProbeResult:
        result = ProbeResult()
        torch = self.torch
        if torch is None:
            return result
        try:
            if not torch.cuda.is_initialized():
                return result
            count = int(torch.cuda.device_count())
        except Exception as exc:
            result.problem(self.name, f"cannot query CUDA: {exc}")
            return result
        for index in range(count):
            device = Device("cuda", index)
            try:
                free, total = torch.cuda.mem_get_info(index)
                name = str(torch.cuda.get_device_name(index))
                result.memories.append(
                    DeviceMemory(device, int(total), min(int(free), int(total)), "torch", name=name)
                )
            except Exception as exc:
                result.problem(self.name, f"{device}: {exc}")
        return result


class MpsProbe(Probe):
    """Apple's Metal device: the recommended working-set size and what the driver holds."""

    name = "mps"

    def __init__(self, *, torch: Any | None = None, find_torch: Callable[[], Any] = _torch_on_macos) -> None:
        self.torch = torch if torch is not None else find_torch()

    def measure(self) -> ProbeResult:
        result = ProbeResult()
        torch = self.torch
        if torch is None:
            return result
        try:
            if not torch.backends.mps.is_available():
                return result
            total = int(torch.mps.recommended_max_memory())
            used = int(torch.mps.driver_allocated_memory())
        except Exception as exc:
            result.problem(self.name, f"MPS backend is broken: {exc}")
            return result
        result.memories.append(
            DeviceMemory(Device("mps"), total, max(0, total - used), "torch", name="Apple MPS")
        )
        return result


register_probe(TorchCudaProbe.name, TorchCudaProbe)
register_probe(MpsProbe.name, MpsProbe)
