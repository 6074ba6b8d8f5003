"""Simulated devices: an inventory written as a spec instead of measured.

Grammar: ``ENTRY(,ENTRY)*`` with ``ENTRY := KIND[:INDEX]=TOTAL[@FREE]``, for example
``cuda:0=24GiB@20GiB,cuda:1=24GiB,cpu=64GiB,disk=2TiB``. The spec describes a machine that could
exist, so it is held to the rules a real one follows: CUDA devices are numbered 0..N-1, there is
one host, one MPS device at most and never MPS beside CUDA.
"""

from __future__ import annotations

import os

from memplan.errors import InvalidDevice, InvalidSize, SimulationSpecError
from memplan.gpu.device import Device, DeviceMemory, Inventory
from memplan.units import parse_size

__all__ = ["SIMULATE_ENV", "parse_simulation", "simulation_from_env"]

SIMULATE_ENV = "MEMPLAN_SIMULATE"
_INDEXED_KINDS = frozenset({"cuda"})


def _parse_device(spec: str, entry: str, name: str) -> Device:
    try:
        device = Device.parse(name)
    except InvalidDevice as exc:
        raise SimulationSpecError(spec, entry, exc.reason) from None
    if device.kind not in _INDEXED_KINDS and device.index != 0:
        raise SimulationSpecError(spec, entry, f"a machine has one {device.kind}; drop the index")
    return device


def _parse_entry(spec: str, entry: str) -> DeviceMemory:
    name, sep, sizes = entry.partition("=")
    if not sep or not name.strip():
        raise SimulationSpecError(spec, entry, "expected KIND[:INDEX]=TOTAL[@FREE]")
    device = _parse_device(spec, entry, name)
    total_text, at, free_text = sizes.partition("@")
    if at and not free_text.strip():
        raise SimulationSpecError(spec, entry, "'@' must be followed by the free size")
    try:
        total = parse_size(total_text)
        free = parse_size(free_text) if at else total
    except InvalidSize as exc:
        raise SimulationSpecError(spec, entry, f"bad size {exc.value!r}: {exc.reason}") from None
    if free > total:
        raise SimulationSpecError(spec, entry, "FREE is larger than TOTAL")
    return DeviceMemory(device, total, free, "simulated", name=f"simulated {device.kind}")


def _check_machine(spec: str, memories: list[DeviceMemory]) -> None:
    kinds = {m.device.kind for m in memories}
    if {"cuda", "mps"} <= kinds:
        raise SimulationSpecError(spec, spec, "a machine has CUDA or MPS devices, not both")
    cuda = sorted(m.device.index for m in memories if m.device.kind == "cuda")
    if cuda != list(range(len(cuda))):
        missing = min(set(range(len(cuda) + 1)) - set(cuda))
        raise SimulationSpecError(
            spec, f"cuda:{missing}", f"CUDA numbers devices 0..N-1; cuda:{missing} is missing"
        )


def parse_simulation(spec: str) -> Inventory:
    """The inventory ``spec`` describes; :class:`SimulationSpecError` points at a bad entry."""
    if not isinstance(spec, str) or not spec.strip():
        raise SimulationSpecError(str(spec), "", "the spec is empty")
    memories: list[DeviceMemory] = []
    seen: set[Device] = set()
    for position, raw in enumerate(spec.split(","), start=1):
        entry = raw.strip()
        if not entry:
            where = f"<entry {position}>"
            raise SimulationSpecError(spec, where, "it is empty (two commas, or a trailing comma?)")
        memory = _parse_entry(spec, entry)
        if memory.device in seen:
            raise SimulationSpecError(spec, entry, f"{memory.device} is listed twice")
        seen.add(memory.device)
        memories.append(memory)
    _check_machine(spec, memories)
    return Inventory(tuple(memories), simulated=True)


def simulation_from_env() -> str | None:
    """The spec in ``MEMPLAN_SIMULATE``, or None when it is unset or blank."""
    spec = os.environ.get(SIMULATE_ENV, "")
    return spec if spec.strip() else None
