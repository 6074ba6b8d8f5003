"""The device model: typed device keys, per-device memory figures and the inventory of a machine."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Literal, cast, get_args

from memplan.errors import InvalidDevice, InvalidInventory
from memplan.units import format_size

__all__ = [
    "ACCELERATOR_KINDS",
    "Device",
    "DeviceKind",
    "DeviceMemory",
    "Inventory",
    "MemorySource",
    "ProbeProblem",
]

DeviceKind = Literal["cuda", "mps", "cpu", "disk", "remote"]
MemorySource = Literal["nvml", "torch", "cgroup", "psutil", "disk", "simulated"]

_KINDS: tuple[str, ...] = get_args(DeviceKind)
_SOURCES: tuple[str, ...] = get_args(MemorySource)
ACCELERATOR_KINDS: frozenset[str] = frozenset({"cuda", "mps"})
# Kinds a machine has at most one of; they print without an index, as torch prints "cpu".
_SINGLETON_KINDS: frozenset[str] = frozenset({"mps", "cpu", "disk", "remote"})


@dataclass(frozen=True)
class Device:
    """A place bytes can live: ``Device("cuda", 0)``, ``Device("cpu")``. Hashable, ordered."""

    kind: DeviceKind
    index: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise InvalidDevice(str(self.kind), f"unknown kind; expected one of {', '.join(_KINDS)}")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise InvalidDevice(f"{self.kind}:{self.index}", "index must be an integer >= 0")

    @classmethod
    def parse(cls, text: str) -> Device:
        """Parse ``"cuda:1"``, ``"cuda"`` (index 0), ``"cpu"``, ``"mps"``, ``"disk"``."""
        kind, sep, index_text = text.strip().lower().partition(":")
        if kind not in _KINDS:
            raise InvalidDevice(text, f"unknown kind {kind!r}; expected one of {', '.join(_KINDS)}")
        if not sep:
            return cls(cast(DeviceKind, kind))
        if not index_text.isdigit():
            raise InvalidDevice(text, "index must be an integer >= 0")
        return cls(cast(DeviceKind, kind), int(index_text))

    @property
    def is_accelerator(self) -> bool:
        return self.kind in ACCELERATOR_KINDS

    @property
    def torch_name(self) -> str:
        """The string ``torch.device`` takes for this device."""
        if self.kind in ("disk", "remote"):
            raise InvalidDevice(str(self), "not a torch device; tensors there live in files")
        return str(self)

    def sort_key(self) -> tuple[int, int]:
        return (_KINDS.index(self.kind), self.index)

    def __lt__(self, other: Device) -> bool:
        return self.sort_key() < other.sort_key()

    def __str__(self) -> str:
        if self.kind in _SINGLETON_KINDS and self.index == 0:
            return self.kind
        return f"{self.kind}:{self.index}"


@dataclass(frozen=True)
class DeviceMemory:
    """Memory on one device, in bytes, and where the figures came from.

    ``free`` is what this process could still allocate; ``reserved_by_others`` is what other
    processes hold there (already excluded from ``free``).
    """

    device: Device
    total: int
    free: int
    source: MemorySource
    reserved_by_others: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        if self.source not in _SOURCES:
            raise InvalidInventory(f"unknown memory source {self.source!r}", self.device)
        for label, value in (("total", self.total), ("free", self.free)):
            if value < 0:
                raise InvalidInventory(f"{label} memory cannot be negative ({value})", self.device)
        if self.free > self.total:
            free, total = format_size(self.free), format_size(self.total)
            raise InvalidInventory(f"free {free} exceeds total {total}", self.device)

    @property
    def used(self) -> int:
        return self.total - self.free

    @property
    def used_ratio(self) -> float:
        return self.used / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "total": self.total,
            "free": self.free,
            "used": self.used,
            "reserved_by_others": self.reserved_by_others,
            "source": self.source,
            "name": self.name,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceMemory:
        return cls(
            device=Device.parse(data["device"]),
            total=int(data["total"]),
            free=int(data["free"]),
            source=cast(MemorySource, data["source"]),
            reserved_by_others=int(data.get("reserved_by_others", 0)),
            name=str(data.get("name", "")),
        )


@dataclass(frozen=True)
class ProbeProblem:
    """A probe source that failed; the inventory still holds what the others measured."""

    source: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


@dataclass(frozen=True)
class Inventory:
    """What memory a machine has, device by device. Build it with :func:`memplan.probe`."""

    devices: tuple[DeviceMemory, ...]
    problems: tuple[ProbeProblem, ...] = ()
    simulated: bool = False
    # This process's resident bytes when probed, if it had imported torch by then: the runtime a
    # load would otherwise add is in use already, and so out of the host's free memory.
    runtime_in_use: int | None = None
    _index: dict[Device, DeviceMemory] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.devices, key=lambda m: m.device.sort_key()))
        index = {m.device: m for m in ordered}
        if len(index) != len(ordered):
            twice = next(a.device for a, b in pairwise(ordered) if a.device == b.device)
            raise InvalidInventory("listed twice; an inventory lists each device once", twice)
        object.__setattr__(self, "devices", ordered)
        object.__setattr__(self, "_index", index)

    def __getitem__(self, device: Device) -> DeviceMemory:
        try:
            return self._index[device]
        except KeyError:
            have = ", ".join(str(d) for d in self._index) or "none"
            raise InvalidDevice(str(device), f"not in this inventory (devices: {have})") from None

    def get(self, device: Device) -> DeviceMemory | None:
        return self._index.get(device)

    def __contains__(self, device: object) -> bool:
        return device in self._index

    def __iter__(self) -> Iterator[DeviceMemory]:
        return iter(self.devices)

    def __len__(self) -> int:
        return len(self.devices)

    def of_kind(self, kind: DeviceKind) -> tuple[DeviceMemory, ...]:
        return tuple(m for m in self.devices if m.device.kind == kind)

    @property
    def accelerators(self) -> tuple[DeviceMemory, ...]:
        return tuple(m for m in self.devices if m.device.is_accelerator)

    def total(self, kind: DeviceKind) -> int:
        return sum(m.total for m in self.of_kind(kind))

    def free(self, kind: DeviceKind) -> int:
        return sum(m.free for m in self.of_kind(kind))

    def to_dict(self) -> dict[str, Any]:
        return {
            "simulated": self.simulated,
            "runtime_in_use": self.runtime_in_use,
            "devices": [m.to_dict() for m in self.devices],
            "problems": [{"source": p.source, "message": p.message} for p in self.problems],
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Inventory:
        return cls(
            devices=tuple(DeviceMemory.from_dict(d) for d in data["devices"]),
            problems=tuple(ProbeProblem(p["source"], p["message"]) for p in data.get("problems", [])),
            simulated=bool(data.get("simulated", False)),
            runtime_in_use=_optional_bytes(data.get("runtime_in_use")),
        )

    @classmethod
    def from_json(cls, text: str) -> Inventory:
        return cls.from_dict(json.loads(text))


def _optional_bytes(value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise InvalidInventory(f"runtime_in_use must be a byte count, got {value!r}")
    return value
