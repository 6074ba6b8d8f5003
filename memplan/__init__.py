"""memplan: plan, load and keep PyTorch models resident within the memory a machine has.

Importing memplan is cheap: it never imports torch or initialises CUDA. Parts that need torch
import it when they are used.
"""

from memplan.errors import (
    AlreadyManaged,
    CheckpointError,
    ContextTooLong,
    DeviceOutOfMemory,
    DoesNotFit,
    EntryInUse,
    InvalidDevice,
    InvalidSize,
    MemplanError,
    MissingDependency,
    PinViolation,
    PlanFormatError,
    PlanMismatch,
    RemoteTierError,
    SimulationSpecError,
    TierError,
    TierFull,
)
from memplan.gpu import Allocator, Device, DeviceMemory, Inventory, probe
from memplan.loaders import Fallback, LoadReport, load
from memplan.planner import (
    Checkpoint,
    Corrections,
    Estimate,
    Full,
    Overheads,
    Plan,
    Policy,
    Quantized,
    Sharded,
    Streamed,
    Workload,
    estimate,
    inspect,
    plan,
)
from memplan.residency import ResidencyManager, RetentionPolicy, get_tier
from memplan.units import format_size, parse_size

__version__ = "0.1.0"

__all__ = [
    "Allocator",
    "AlreadyManaged",
    "Checkpoint",
    "CheckpointError",
    "ContextTooLong",
    "Corrections",
    "Device",
    "DeviceMemory",
    "DeviceOutOfMemory",
    "DoesNotFit",
    "EntryInUse",
    "Estimate",
    "Fallback",
    "Full",
    "InvalidDevice",
    "InvalidSize",
    "Inventory",
    "LoadReport",
    "MemplanError",
    "MissingDependency",
    "Overheads",
    "PinViolation",
    "Plan",
    "PlanFormatError",
    "PlanMismatch",
    "Policy",
    "Quantized",
    "RemoteTierError",
    "ResidencyManager",
    "RetentionPolicy",
    "Sharded",
    "SimulationSpecError",
    "Streamed",
    "TierError",
    "TierFull",
    "Workload",
    "__version__",
    "estimate",
    "format_size",
    "get_tier",
    "inspect",
    "load",
    "parse_size",
    "plan",
    "probe",
]
