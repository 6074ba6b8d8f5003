"""Device budgets: the one place memplan code asks "can these bytes go there?".

An :class:`Allocator` holds a budget per device of an inventory (its free bytes when probed)
and charges every reservation and every placed tensor against it. Going over raises
:class:`~memplan.errors.DeviceOutOfMemory`, and so does a real ``torch.OutOfMemoryError`` while
placing a tensor, so callers handle one error for both.

On a simulated inventory the accelerators are not there: a tensor placed "on" ``cuda:0`` stays
in host memory and is only charged to ``cuda:0``'s budget, until it is garbage-collected. That
is what lets the planner, loaders and residency manager run on CPU CI as they would on a GPU.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memplan._torch_imported import imported_torch
from memplan.errors import DeviceOutOfMemory, InvalidDevice, InvalidSize
from memplan.gpu.device import Device, Inventory

if TYPE_CHECKING:
    import torch

__all__ = ["Allocator", "DeviceUsage", "Reservation", "mapped_oom"]


@dataclass(frozen=True)
class DeviceUsage:
    """Counters for one device's budget."""

    device: Device
    capacity: int
    used: int
    peak: int
    reservations: int
    failures: int

    @property
    def available(self) -> int:
        return self.capacity - self.used


class Reservation:
    """Bytes held on a device until :meth:`release` (idempotent) or the ``with`` block ends.

    Made holding nothing; :meth:`acquire` (or :meth:`Allocator.reserve`) charges it. The budget and
    the reservation's flag change together, so whoever keeps a reservation from before its charge
    can give back exactly what it holds, wherever a Ctrl-C landed.
    """

    def __init__(self, allocator: Allocator, device: Device, nbytes: int, label: str) -> None:
        if nbytes < 0:
            raise InvalidSize(nbytes, f"cannot reserve a negative size on {device}")
        self.allocator = allocator
        self.device = device
        self.nbytes = nbytes
        self.label = label
        self._held = False

    def acquire(self) -> Reservation:
        """Charge the bytes, or raise :class:`DeviceOutOfMemory` and hold nothing. Idempotent."""
        self.allocator._charge(self)
        return self

    def release(self) -> None:
        self.allocator._uncharge(self)

    @property
    def released(self) -> bool:
        """Whether it holds nothing (released, or never charged)."""
        return not self._held

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class _Budget:
    capacity: int
    used: int = 0
    peak: int = 0
    reservations: int = 0
    failures: int = 0


def _is_oom(exc: BaseException) -> bool:
    torch = imported_torch()
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    # MPS and older CUDA builds raise a plain RuntimeError with this text.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@contextmanager
def mapped_oom(device: Device, requested: int) -> Iterator[None]:
    """Turn a real accelerator OOM inside the block into :class:`DeviceOutOfMemory`."""
    try:
        yield
    except Exception as exc:
        if _is_oom(exc):
            raise DeviceOutOfMemory(device, requested) from exc
        raise


class Allocator:
    """Budgets for every device of ``inventory``; thread-safe."""

    def __init__(self, inventory: Inventory, *, capacities: dict[Device, int] | None = None) -> None:
        self.inventory = inventory
        self.simulated = inventory.simulated
        caps = {m.device: m.free for m in inventory}
        caps.update(capacities or {})
        self._budgets = {device: _Budget(capacity) for device, capacity in caps.items()}
        self._lock = threading.RLock()
        self._placed: dict[int, tuple[Device, int]] = {}  # storage address -> (device, tensors)

    def devices(self) -> list[Device]:
        return sorted(self._budgets)

    def _budget(self, device: Device) -> _Budget:
        try:
            return self._budgets[device]
        except KeyError:
            have = ", ".join(str(d) for d in sorted(self._budgets)) or "none"
            raise InvalidDevice(str(device), f"not in this allocator's inventory ({have})") from None

    def tracks(self, device: Device) -> bool:
        """Whether ``device`` has a budget here (a simulated inventory may leave the host out)."""
        return device in self._budgets

    def torch_device(self, device: Device) -> str:
        """Where tensors for ``device`` really live: the host, for a simulated accelerator."""
        return "cpu" if self.simulated else device.torch_name

    def available(self, device: Device) -> int:
        with self._lock:
            budget = self._budget(device)
            return budget.capacity - budget.used

    def usage(self, device: Device) -> DeviceUsage:
        with self._lock:
            b = self._budget(device)
            return DeviceUsage(device, b.capacity, b.used, b.peak, b.reservations, b.failures)

    def stats(self) -> list[DeviceUsage]:
        return [self.usage(device) for device in self.devices()]

    def reset_peak(self, device: Device) -> None:
        with self._lock:
            budget = self._budget(device)
            budget.peak = budget.used

    def _charge_locked(self, device: Device, nbytes: int, reservation: Reservation | None = None) -> None:
        """Charge ``nbytes`` (to ``reservation``, when given), or raise and charge nothing."""
        budget = self._budget(device)
        used = budget.used + nbytes
        if used > budget.capacity:
            budget.failures += 1
            raise DeviceOutOfMemory(device, nbytes, budget.capacity - budget.used)
        peak = max(budget.peak, used)
        # No call from here to the end: Python runs a signal handler (Ctrl-C) only at a call or a
        # loop, so the counters and the reservation's flag change all together or not at all.
        budget.used, budget.peak, budget.reservations = used, peak, budget.reservations + 1
        if reservation is not None:
            reservation._held = True

    def _charge(self, reservation: Reservation) -> None:
        with self._lock:
            if not reservation._held:
                self._charge_locked(reservation.device, reservation.nbytes, reservation)

    def _uncharge(self, reservation: Reservation) -> None:
        with self._lock:
            if reservation._held:
                self._uncharge_locked(reservation.device, reservation.nbytes, reservation)

    def _uncharge_locked(self, device: Device, nbytes: int, reservation: Reservation | None = None) -> None:
        budget = self._budgets[device]
        # No call here either: the flag changes with the counters (see _charge_locked).
        budget.used, budget.reservations = budget.used - nbytes, budget.reservations - 1
        if reservation is not None:
            reservation._held = False

    def reserve(self, device: Device, nbytes: int, *, label: str = "") -> Reservation:
        """Hold ``nbytes`` on ``device``, or raise :class:`DeviceOutOfMemory` and hold nothing."""
        reservation = Reservation(self, device, nbytes, label)
        try:
            return reservation.acquire()
        except BaseException:
            reservation.release()  # a Ctrl-C after the charge, before the caller has the reservation
            raise

    def place(self, tensor: torch.Tensor, device: Device, *, copy: bool = False) -> torch.Tensor:
        """``tensor`` on ``device``, charged to its budget for as long as the result lives.

        Simulated accelerators keep the data in host memory. Tensors sharing a storage are
        charged once, for the whole storage. ``copy`` makes the result never share the input's
        storage, even where it is already on ``device``.
        """
        moved = self._move(tensor, device, tensor.untyped_storage().nbytes(), copy)
        # A copied view owns only its own elements, so charge the result's storage.
        nbytes = moved.untyped_storage().nbytes()
        key = moved.untyped_storage().data_ptr()
        if nbytes == 0 or key == 0:
            return moved
        with self._lock:
            _, count = self._placed.get(key, (device, 0))
            if count == 0:
                self._charge_locked(device, nbytes)
            self._placed[key] = (device, count + 1)
        weakref.finalize(moved, self._forget, key, device, nbytes)
        return moved

    def _move(self, tensor: torch.Tensor, device: Device, nbytes: int, copy: bool) -> torch.Tensor:
        if not self.simulated:
            with mapped_oom(device, nbytes):
                return tensor.to(self.torch_device(device), copy=copy)
        moved = tensor.to("cpu", copy=copy)
        if not copy and self.device_of(moved) not in (None, device):
            # A real move to another device copies; so does a simulated one, to be charged apart.
            moved = moved.clone()
        return moved

    def _forget(self, key: int, device: Device, nbytes: int) -> None:
        with self._lock:
            owner, count = self._placed.get(key, (device, 1))
            if count > 1:
                self._placed[key] = (owner, count - 1)
                return
            self._placed.pop(key, None)
            self._uncharge_locked(device, nbytes)

    def device_of(self, tensor: Any) -> Device | None:
        """The device ``tensor`` was placed on through this allocator, if any."""
        with self._lock:
            placed = self._placed.get(tensor.untyped_storage().data_ptr())
        return placed[0] if placed else None
