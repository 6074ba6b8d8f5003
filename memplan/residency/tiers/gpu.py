"""``gpu``: tensors on an accelerator, charged to an :class:`~memplan.Allocator` budget.

On a simulated inventory the accelerator is a budget: the bytes stay in host memory and the
allocator enforces the device's size, so the tier behaves on CPU CI as on the GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memplan.errors import DeviceOutOfMemory, TierError, TierFull
from memplan.gpu import Allocator, Device
from memplan.residency import _wire
from memplan.residency.tiers.base import Tier
from memplan.units import parse_size

if TYPE_CHECKING:
    import torch

__all__ = ["GpuTier"]


def _first_accelerator(allocator: Allocator) -> Device:
    for device in allocator.devices():
        if device.is_accelerator:
            return device
    raise TierError(
        "gpu", None, "no CUDA or MPS device here; simulate one with MEMPLAN_SIMULATE=cuda:0=24GiB"
    )


class GpuTier(Tier):
    """An accelerator's memory, within ``capacity`` and the allocator's budget for ``device``."""

    kind = "gpu"
    addressable = True

    def __init__(
        self,
        capacity: int | str | None = None,
        *,
        allocator: Allocator | None = None,
        device: Device | None = None,
        bandwidth: float = 20e9,
        name: str | None = None,
    ) -> None:
        if allocator is None:
            from memplan.gpu import probe

            allocator = Allocator(probe())
        device = device or _first_accelerator(allocator)
        budget = allocator.available(device)
        cap = min(parse_size(capacity), budget) if capacity is not None else budget
        super().__init__(device=device, capacity=cap, bandwidth=bandwidth, name=name)
        self.allocator = allocator

    def _store(self, key: str, tensor: torch.Tensor, room: int) -> tuple[Any, int]:
        nbytes = tensor.numel() * tensor.element_size()
        self._check_room(key, nbytes, room)
        try:
            placed = self.allocator.place(_wire.raw_bytes(tensor), self.device, copy=True)
        except DeviceOutOfMemory as exc:
            raise TierFull(self.name, key, nbytes, exc.available or 0) from exc
        # Keep the placed tensor itself: the allocator's budget is tied to its lifetime.
        return (placed, _wire.same_dtype_view(placed, tensor)), nbytes

    def _fetch(self, key: str, handle: Any) -> torch.Tensor:
        return handle[1]  # type: ignore[no-any-return]

    def _discard(self, key: str, handle: Any) -> None:
        pass  # the allocator gives the budget back when the last reference goes
