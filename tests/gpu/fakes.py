"""Fakes of the NVML module and of torch's CUDA/MPS calls, for probes on a machine with no GPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

GiB = 2**30


class FakeNVMLError(Exception):
    def __init__(self, value: int, text: str = "") -> None:
        self.value = value
        super().__init__(text or f"NVML error {value}")


@dataclass
class FakeGpu:
    uuid: str
    total: int = 80 * GiB
    free: int = 79 * GiB
    name: str = "NVIDIA H100 80GB HBM3"
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    fail_memory: bool = False
    fail_processes: bool = False


class FakeNvml:
    """The parts of ``pynvml`` the probe calls, over a list of fake GPUs."""

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        init_error: int | None = None,
        count_error: bool = False,
        shutdown_error: bool = False,
    ) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.count_error = count_error
        self.shutdown_error = shutdown_error
        self.initialised = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1
        if self.shutdown_error:
            raise FakeNVMLError(999, "shutdown hiccup")

    def nvmlDeviceGetCount(self) -> int:
        if self.count_error:
            raise FakeNVMLError(15, "GPU is lost")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        return handle.uuid

    def nvmlDeviceGetName(self, handle: FakeGpu) -> bytes:
        return handle.name.encode()  # old nvidia-ml-py releases return bytes

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> Any:
        if handle.fail_memory:
            raise FakeNVMLError(15, "GPU is lost")
        return SimpleNamespace(total=handle.total, free=handle.free, used=handle.total - handle.free)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGpu) -> list[Any]:
        if handle.fail_processes:
            raise FakeNVMLError(3, "Not Supported")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in handle.processes]


class FakeTorchCuda:
    def __init__(
        self, devices: list[tuple[int, int]], *, initialised: bool = True, broken: bool = False
    ) -> None:
        self.devices = devices  # (free, total) per device
        self.initialised = initialised
        self.broken = broken

    def is_initialized(self) -> bool:
        return self.initialised

    def device_count(self) -> int:
        if self.broken:
            raise RuntimeError("CUDA driver version is insufficient")
        return len(self.devices)

    def mem_get_info(self, index: int) -> tuple[int, int]:
        return self.devices[index]

    def get_device_name(self, index: int) -> str:
        return "NVIDIA A10G"


def fake_torch(
    cuda: FakeTorchCuda | None = None,
    mps: tuple[int, int] | None = None,
    mps_error: str | None = None,
) -> Any:
    """A torch-shaped namespace; ``mps`` is (recommended_max, driver_allocated) or None."""

    def recommended() -> int:
        if mps_error:
            raise RuntimeError(mps_error)
        assert mps is not None
        return mps[0]

    return SimpleNamespace(
        cuda=cuda or FakeTorchCuda([], initialised=False),
        backends=SimpleNamespace(
            mps=SimpleNamespace(is_available=lambda: mps is not None or bool(mps_error))
        ),
        mps=SimpleNamespace(
            recommended_max_memory=recommended,
            driver_allocated_memory=lambda: mps[1] if mps else 0,
        ),
    )
