"""Every byte a load puts somewhere is charged to the allocator here, and given back in one call."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from memplan.gpu.allocator import Allocator, Reservation, mapped_oom
from memplan.gpu.device import Device

if TYPE_CHECKING:
    import torch

__all__ = ["Placement"]


class Placement:
    """The reservations of one loaded model. :meth:`release` returns them all (idempotent).

    Charging before moving means a load that will not fit fails before it copies, with the
    same :class:`~memplan.errors.DeviceOutOfMemory` on simulated and real devices.
    """

    def __init__(self, allocator: Allocator) -> None:
        self.allocator = allocator
        self._held: list[Reservation] = []
        self._lock = threading.Lock()

    def torch_device(self, device: Device) -> str:
        return self.allocator.torch_device(device)

    def charge(self, device: Device, nbytes: int, label: str) -> Reservation | None:
        """Hold ``nbytes`` on ``device`` for the model's lifetime; the host is free if unbudgeted."""
        if not self.allocator.tracks(device) and not device.is_accelerator:
            return None
        reservation = self.allocator.reserve(device, nbytes, label=label)
        with self._lock:
            self._held.append(reservation)
        return reservation

    def put(self, tensor: torch.Tensor, device: Device, label: str) -> torch.Tensor:
        """``tensor`` on ``device`` (charged), converted there; the source is left to the caller."""
        nbytes = tensor.numel() * tensor.element_size()
        reservation = self.charge(device, nbytes, label)
        try:
            with mapped_oom(device, nbytes):
                return tensor.to(self.torch_device(device))
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise

    @property
    def held(self) -> dict[Device, int]:
        with self._lock:
            totals: dict[Device, int] = {}
            for r in self._held:
                if not r.released:
                    totals[r.device] = totals.get(r.device, 0) + r.nbytes
            return totals

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, []
        for reservation in held:
            reservation.release()
