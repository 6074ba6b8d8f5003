"""Planning, pure: a checkpoint's shape and a machine's inventory in, a plan out.

No tensor data is read and torch is never imported here.
"""

from memplan.planner.checkpoint import Architecture, Checkpoint, LayerInfo, TensorInfo, inspect
from memplan.planner.corrections import Corrections, default_corrections_path
from memplan.planner.estimate import (
    DeviceEstimate,
    Estimate,
    Overheads,
    Workload,
    compute_dtype,
    dtype_name,
    estimate,
)
from memplan.planner.plan import CANDIDATES, Decision, Plan, Policy, plan
from memplan.planner.strategies import Full, Quantized, Sharded, Strategy, Streamed, describe

__all__ = [
    "CANDIDATES",
    "Architecture",
    "Checkpoint",
    "Corrections",
    "Decision",
    "DeviceEstimate",
    "Estimate",
    "Full",
    "LayerInfo",
    "Overheads",
    "Plan",
    "Policy",
    "Quantized",
    "Sharded",
    "Strategy",
    "Streamed",
    "TensorInfo",
    "Workload",
    "compute_dtype",
    "default_corrections_path",
    "describe",
    "dtype_name",
    "estimate",
    "inspect",
    "plan",
]
