"""``memory``: a plain in-process tier, public so users can test residency code without devices."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memplan.gpu import Device
from memplan.residency import _wire
from memplan.residency.tiers.base import Tier
from memplan.units import parse_size

if TYPE_CHECKING:
    import torch

__all__ = ["MemoryTier"]

UNBOUNDED = 2**62


class MemoryTier(Tier):
    """Tensors kept as private host copies, within ``capacity`` (a size like ``"1GiB"``).

    ``bandwidth`` is what eviction costs assume for it, so a stack of memory tiers with
    different bandwidths stands in for GPU, host, disk and remote in tests and simulations.
    """

    kind = "memory"
    addressable = True

    def __init__(
        self,
        capacity: int | str = UNBOUNDED,
        *,
        bandwidth: float = 10e9,
        device: Device | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            device=device or Device("cpu"), capacity=parse_size(capacity), bandwidth=bandwidth, name=name
        )

    def _store(self, key: str, tensor: torch.Tensor, room: int) -> tuple[Any, int]:
        nbytes = tensor.numel() * tensor.element_size()
        self._check_room(key, nbytes, room)
        copied = _wire.raw_bytes(tensor).to("cpu", copy=True)
        return _wire.same_dtype_view(copied, tensor), nbytes

    def _fetch(self, key: str, handle: Any) -> torch.Tensor:
        return handle  # type: ignore[no-any-return]

    def _discard(self, key: str, handle: Any) -> None:
        pass
