"""Weight bytes: each tensor in the compute dtype or as bitsandbytes stores it, summed per module
the device map places, per layer, and as laid out in a streaming slot.

A tensor's size in any format depends only on its dtype, shape and whether bitsandbytes
quantizes it, and decoder layers repeat a handful of those: each format sizes one tensor per
kind, not every tensor (100k layers plan in well under a second).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

from memplan._dtypes import TORCH_FLOATING, dtype_bytes
from memplan.planner.model import Checkpoint, TensorInfo
from memplan.planner.quantization import is_quant_state, is_skipped
from memplan.planner.strategies import Quantized, Strategy

__all__ = [
    "DOUBLE_QUANT_BLOCK",
    "NF4_BLOCK",
    "NF4_CODE_BYTES",
    "SLOT_ALIGN",
    "WeightFormat",
    "is_quantizable",
    "largest_quantized",
    "largest_read",
    "largest_slot_bytes",
    "layer_weight_bytes",
    "module_weight_bytes",
    "non_layer_weight_bytes",
    "quantized_bytes",
    "quantized_count",
    "same_dtypes",
    "tensor_bytes",
]

NF4_BLOCK = 64
DOUBLE_QUANT_BLOCK = 256
NF4_CODE_BYTES = 16 * 4  # the 16 fp32 NF4 levels each quantised weight keeps

# Each tensor in a streaming slot starts on this boundary (vectorised kernels want aligned rows):
# a layer of many small tensors takes more slot than its bytes.
SLOT_ALIGN = 256

# Weights bitsandbytes leaves alone though they sit in a layer as 2-D ``.weight``s: embeddings (T5's
# relative_attention_bias) and single experts, which transformers 5 fuses into 3-D expert tensors
# (``experts.gate_up_proj``) that are no ``nn.Linear``.
_NOT_LINEAR = re.compile(r"(?:^|\.)(?:experts\.\d+|[^.]*embed[^.]*|relative_attention_bias)(?:\.|$)")


def is_quantizable(tensor: TensorInfo, skip: tuple[str, ...] | None = None) -> bool:
    """bitsandbytes replaces the layers' ``nn.Linear`` (and ``Conv1D``) modules; embeddings, norms,
    experts fused by transformers, lm_head and the ``skip`` modules (llm_int8_skip_modules) stay.

    From names alone this is the repeated blocks' Linears: transformers also converts Linears
    outside the blocks (projectors, poolers) and keeps a class's ``_keep_in_fp32_modules`` (T5's
    ``wo``), which only the model class knows; the load report says what was converted.
    """
    return (
        tensor.layer is not None
        and len(tensor.shape) == 2
        and tensor.name.endswith(".weight")
        and _NOT_LINEAR.search(tensor.module) is None
        and not is_skipped(tensor.module, skip)
    )


def tensor_bytes(tensor: TensorInfo, dtype: str) -> int:
    """Bytes of ``tensor`` once cast to ``dtype``; integer tensors and the quantization states
    stored beside pre-quantized weights keep their own type."""
    if tensor.dtype not in TORCH_FLOATING or is_quant_state(tensor.name):
        return tensor.nbytes
    return tensor.numel * dtype_bytes(dtype)


def quantized_bytes(
    tensor: TensorInfo, method: str, dtype: str, double_quant: bool, skip: tuple[str, ...] | None = None
) -> int:
    """bnb's storage for one Linear weight, or ``dtype`` bytes for a module that stays."""
    if not is_quantizable(tensor, skip):
        return tensor_bytes(tensor, dtype)
    rows, numel = tensor.shape[0], tensor.numel
    if method == "int8":
        return numel + rows * 4  # int8 weights + one fp32 scale per output row (SCB)
    blocks = math.ceil(numel / NF4_BLOCK)
    absmax = blocks * 4  # one fp32 absmax per block
    if double_quant:  # absmax as 8 bits + fp32 absmax per 256 blocks, a 256-entry code, an fp32 offset
        absmax = blocks + math.ceil(blocks / DOUBLE_QUANT_BLOCK) * 4 + 256 * 4 + 4
    return math.ceil(numel / 2) + absmax + NF4_CODE_BYTES


@dataclass(frozen=True)
class WeightFormat:
    """How weights are stored: ``dtype``, or bnb ``method`` for the Linear weights. Hashable, so
    per-checkpoint sizes are computed once per format however many candidates ask."""

    dtype: str
    method: str | None = None
    double_quant: bool = True
    skip: tuple[str, ...] | None = None  # llm_int8_skip_modules

    @classmethod
    def of(cls, strategy: Strategy) -> WeightFormat:
        if isinstance(strategy, Quantized) and not strategy.prequantized:
            return cls(strategy.dtype, strategy.method, strategy.double_quant, strategy.skip_modules)
        return cls(strategy.dtype)

    def bytes_of(self, tensor: TensorInfo) -> int:
        if self.method is None:
            return tensor_bytes(tensor, self.dtype)
        return quantized_bytes(tensor, self.method, self.dtype, self.double_quant, self.skip)


@dataclass(frozen=True)
class _TensorKinds:
    """Each tensor's module and kind (``modules[i]``, ``kinds[i]``), and one tensor of each kind.

    A tensor's size in any format depends only on its dtype, shape and whether bnb quantizes it
    (with the skipped modules ``skip``),
    and decoder layers repeat a handful of those: each format sizes one tensor per kind, not
    every tensor (100k layers plan in well under a second). Two flat lists, not pairs: fewer
    objects for the garbage collector to walk.
    """

    modules: list[str]
    kinds: list[int]
    examples: list[TensorInfo]


def _tensor_kinds(checkpoint: Checkpoint, skip: tuple[str, ...] | None = None) -> _TensorKinds:
    """Every tensor's kind, worked out once per checkpoint (and set of skipped modules)."""

    def compute() -> _TensorKinds:
        index: dict[tuple[str, tuple[int, ...], bool], int] = {}
        found = _TensorKinds([], [], [])
        for tensor in checkpoint.tensors.values():
            key = (tensor.dtype, tensor.shape, is_quantizable(tensor, skip))
            if key not in index:
                index[key] = len(found.examples)
                found.examples.append(tensor)
            found.modules.append(checkpoint.module_of(tensor))
            found.kinds.append(index[key])
        return found

    return checkpoint.memo(("tensor_kinds", skip), compute)


def module_weight_bytes(
    checkpoint: Checkpoint, fmt: WeightFormat, *, aligned: bool = False
) -> dict[str, int]:
    """Bytes per module the device map places: each decoder layer, and each other module;
    ``aligned``: as laid out in a streaming slot, each tensor rounded up to :data:`SLOT_ALIGN`."""

    def compute() -> dict[str, int]:
        found = _tensor_kinds(checkpoint, fmt.skip)
        kind_bytes = [fmt.bytes_of(tensor) for tensor in found.examples]
        if aligned:
            kind_bytes = [-(-size // SLOT_ALIGN) * SLOT_ALIGN for size in kind_bytes]
        sizes: dict[str, int] = defaultdict(int)
        for module, kind in zip(found.modules, found.kinds, strict=True):
            sizes[module] += kind_bytes[kind]
        return dict(sizes)

    return checkpoint.memo(("module_bytes", fmt, aligned), compute)


def largest_slot_bytes(checkpoint: Checkpoint, fmt: WeightFormat) -> int:
    """The streaming slot that holds any one layer: the largest layer, laid out aligned."""
    sizes = module_weight_bytes(checkpoint, fmt, aligned=True)
    return max((sizes[layer.prefix] for layer in checkpoint.layers), default=0)


def layer_weight_bytes(checkpoint: Checkpoint, fmt: WeightFormat) -> list[int]:
    def compute() -> list[int]:
        sizes = module_weight_bytes(checkpoint, fmt)
        return [sizes[layer.prefix] for layer in checkpoint.layers]

    return checkpoint.memo(("layer_bytes", fmt), compute)


def non_layer_weight_bytes(checkpoint: Checkpoint, fmt: WeightFormat) -> int:
    return sum(module_weight_bytes(checkpoint, fmt).values()) - sum(layer_weight_bytes(checkpoint, fmt))


def largest_read(checkpoint: Checkpoint) -> int:
    """The largest tensor as stored: what a load reads in one piece."""
    return max((t.nbytes for t in _tensor_kinds(checkpoint).examples), default=0)


def same_dtypes(checkpoint: Checkpoint, dtype: str) -> bool:
    """Whether every floating tensor is stored in ``dtype`` (no cast as it is read)."""
    return all(t.dtype not in TORCH_FLOATING or t.dtype == dtype for t in _tensor_kinds(checkpoint).examples)


def largest_quantized(checkpoint: Checkpoint, strategy: Quantized) -> TensorInfo | None:
    """The largest weight ``strategy`` quantizes, or None where it quantizes none."""
    skip = strategy.skip_modules
    found = (t for t in _tensor_kinds(checkpoint, skip).examples if is_quantizable(t, skip))
    return max(found, key=lambda t: t.numel, default=None)


def quantized_count(checkpoint: Checkpoint, skip: tuple[str, ...] | None) -> int:
    """How many weights bitsandbytes quantizes, by the checkpoint's names (see :func:`is_quantizable`)."""

    def count() -> int:
        found = _tensor_kinds(checkpoint, skip)
        converted = [is_quantizable(t, skip) for t in found.examples]
        return sum(converted[kind] for kind in found.kinds)

    return checkpoint.memo(("quantized_count", skip), count)
