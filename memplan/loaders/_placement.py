"""Every byte a load puts somewhere is charged to the allocator here, and given back in one call."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from memplan.gpu import Device
from memplan.gpu.allocator import Allocator, Reservation, mapped_oom

if TYPE_CHECKING:
    import torch

__all__ = ["Placement"]

T = TypeVar("T")


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
        reservation = Reservation(self.allocator, device, nbytes, label)
        # Kept before it is charged, so release() gives it back wherever a Ctrl-C lands.
        with self._lock:
            self._held.append(reservation)
        return reservation.acquire()

    def place(self, device: Device, nbytes: int, label: str, make: Callable[[str], T]) -> T:
        """``make(torch device)`` under a charge of ``nbytes`` on ``device``, made before it runs (so
        what will not fit fails before it copies), with a real OOM mapped; nothing held if it fails."""
        reservation = self.charge(device, nbytes, label)
        try:
            with mapped_oom(device, nbytes):
                return make(self.torch_device(device))
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise

    def put(self, tensor: torch.Tensor, device: Device, label: str) -> torch.Tensor:
        """``tensor`` on ``device`` (charged), converted there; the source is left to the caller."""
        return self.place(device, tensor.numel() * tensor.element_size(), label, tensor.to)

    @property
    def held(self) -> dict[Device, int]:
        with self._lock:
            totals: dict[Device, int] = {}
            for r in self._held:
                if not r.released:
                    totals[r.device] = totals.get(r.device, 0) + r.nbytes
            return totals

    def release(self, *, keep: frozenset[str] = frozenset()) -> None:
        """Give back every charge but those labelled in ``keep`` (which stay held)."""
        with self._lock:
            held = [r for r in self._held if r.label not in keep]
            self._held = [r for r in self._held if r.label in keep]
        for reservation in held:
            reservation.release()
