"""memplan: plan, load and keep PyTorch models resident within the memory a machine has.

Importing memplan is cheap: it never imports torch or initialises CUDA. Parts that need torch
import it when they are used.
"""

from memplan.errors import (
    CheckpointError,
    DeviceOutOfMemory,
    DoesNotFit,
    InvalidDevice,
    InvalidSize,
    MemplanError,
    PinViolation,
    RemoteTierError,
    SimulationSpecError,
    TierError,
)
from memplan.gpu import Allocator, Device, DeviceMemory, Inventory, probe
from memplan.units import format_size, parse_size

__version__ = "0.1.0"

__all__ = [
    "Allocator",
    "CheckpointError",
    "Device",
    "DeviceMemory",
    "DeviceOutOfMemory",
    "DoesNotFit",
    "InvalidDevice",
    "InvalidSize",
    "Inventory",
    "MemplanError",
    "PinViolation",
    "RemoteTierError",
    "SimulationSpecError",
    "TierError",
    "__version__",
    "format_size",
    "parse_size",
    "probe",
]
