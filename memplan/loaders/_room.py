"""Loading a model the residency manager was given by name, for the room one of its tiers has."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from memplan.gpu import Allocator, Device, DeviceMemory, Inventory, probe
from memplan.loaders.load import load
from memplan.planner import Overheads, Policy
from memplan.residency.models import ModelSource, Room

if TYPE_CHECKING:
    from torch import nn

__all__ = ["load_into_room"]

# Whole, in its own dtype: the manager moves whole entries between tiers, and a quantized copy
# would answer differently from the model the user added. A tier's room is what its entries may
# hold: the process's runtimes (CUDA context, interpreter, bitsandbytes) are paid once, outside it.
_PER_MODEL = Overheads(
    cuda_context=0, mps_runtime=0, host_runtime=0, bnb_runtime=0, load_runtime=0, cpu_4bit_repack=0
)
# No headroom either: a tier's capacity is a budget the manager keeps exactly, and the room it
# makes for a model is the model's need as planned here.
_WHOLE = Policy(order=("full",), overheads=_PER_MODEL, headroom=0.0)


def load_into_room(source: ModelSource, room: Room) -> nn.Module:
    """The model at ``source`` loaded whole, planned for ``room``'s free bytes on its device
    (and the host's beside it); ``DoesNotFit`` where it does not fit there.

    The budget is ``room``'s, enforced as on a simulated device: the tensors land in host memory,
    and the tier the manager registers the model on takes them to its device from there."""
    inventory = Inventory(_room_devices(room), simulated=True)
    return load(
        os.fspath(source.source), revision=source.revision, model_cls=source.model_cls,
        workload=source.workload, policy=_WHOLE, allocator=Allocator(inventory), progress=False,
    )  # fmt: skip


def _room_devices(room: Room) -> tuple[DeviceMemory, ...]:
    host = Device("cpu")
    if not room.device.is_accelerator:
        return (DeviceMemory(host, room.available, room.available, "simulated"),)
    free = room.host_available
    if free is None:
        measured = probe().get(host)
        free = measured.free if measured is not None else 0
    return (
        DeviceMemory(room.device, room.available, room.available, "simulated"),
        DeviceMemory(host, free, free, "simulated"),
    )
