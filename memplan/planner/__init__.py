"""Planning, pure: a checkpoint's shape and a machine's inventory in, a plan out.

No tensor data is read and torch is never imported here. This is the planner's front door:
other packages import its names from here, not from its modules.
"""

from memplan._dtypes import compute_dtype, dtype_name
from memplan.planner.corrections import Corrections, default_corrections_path
from memplan.planner.decisions import Decision
from memplan.planner.estimate import DeviceEstimate, Estimate, estimate
from memplan.planner.inspect import inspect
from memplan.planner.model import Architecture, Checkpoint, LayerInfo, Stack, TensorInfo, in_module
from memplan.planner.plan import FailedPlan, Plan, plan
from memplan.planner.policy import CANDIDATES, Policy
from memplan.planner.quantization import INT8_THRESHOLD, QUANT_STATE_SUFFIXES, is_quant_state
from memplan.planner.strategies import (
    READ_AHEAD_BYTES,
    Full,
    Quantized,
    Sharded,
    Strategy,
    Streamed,
    describe,
    strategy_key,
)
from memplan.planner.weights import SLOT_ALIGN, is_quantizable, quantized_bytes
from memplan.planner.workload import DEFAULT_CONTEXT, Overheads, Workload

__all__ = [
    "CANDIDATES",
    "DEFAULT_CONTEXT",
    "INT8_THRESHOLD",
    "QUANT_STATE_SUFFIXES",
    "READ_AHEAD_BYTES",
    "SLOT_ALIGN",
    "Architecture",
    "Checkpoint",
    "Corrections",
    "Decision",
    "DeviceEstimate",
    "Estimate",
    "FailedPlan",
    "Full",
    "LayerInfo",
    "Overheads",
    "Plan",
    "Policy",
    "Quantized",
    "Sharded",
    "Stack",
    "Strategy",
    "Streamed",
    "TensorInfo",
    "Workload",
    "compute_dtype",
    "default_corrections_path",
    "describe",
    "dtype_name",
    "estimate",
    "in_module",
    "inspect",
    "is_quant_state",
    "is_quantizable",
    "plan",
    "quantized_bytes",
    "strategy_key",
]
