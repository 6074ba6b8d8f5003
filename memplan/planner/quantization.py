"""A checkpoint saved already quantized: its config.json's ``quantization_config``.

bitsandbytes int8 and nf4 checkpoints (as transformers saves them: ``I8`` weights with ``SCB``,
or packed ``U8`` weights with ``absmax``/``quant_map``/nested states) are planned at their
stored size and loaded as stored. Other methods (GPTQ, AWQ, fp8, compressed-tensors, ...) are
planned at their stored size with a note; loading them is a typed error naming the method.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memplan.errors import CheckpointError

__all__ = [
    "INT8_THRESHOLD",
    "QUANT_STATE_SUFFIXES",
    "PreQuantized",
    "is_quant_state",
    "is_skipped",
    "read_quantization",
]

INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold: bitsandbytes' and transformers' default

# The tensors bitsandbytes keeps beside a quantized weight (transformers saves them by these names).
QUANT_STATE_SUFFIXES = (
    ".SCB", ".weight_format", ".weight.absmax", ".weight.quant_map", ".weight.nested_absmax",
    ".weight.nested_quant_map", ".weight.quant_state.bitsandbytes__nf4",
    ".weight.quant_state.bitsandbytes__fp4",
)  # fmt: skip


def is_quant_state(name: str) -> bool:
    return name.endswith(QUANT_STATE_SUFFIXES)


_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def is_skipped(module: str, patterns: tuple[str, ...] | None) -> bool:
    """Whether an ``llm_int8_skip_modules`` entry names ``module``: from the start up to a module
    boundary, as a regex with that boundary, or as a suffix. transformers' own
    ``should_convert_module`` (quantizers_utils), restated because the planner imports no
    transformers (it imports torch); tests/planner checks the two agree."""
    return any(
        re.match(rf"(?:{key}){_BOUNDARY}", module) is not None or module.endswith(key)
        for key in patterns or ()
    )


@dataclass(frozen=True)
class PreQuantized:
    """How the checkpoint's weights were quantized. ``method`` is ``int8``, ``nf4`` or ``fp4`` for
    bitsandbytes, else the config's ``quant_method`` (``gptq``, ``awq``, ``fp8``, ...)."""

    method: str
    double_quant: bool = False
    threshold: float = INT8_THRESHOLD
    compute_dtype: str | None = None
    skip_modules: tuple[str, ...] = ()

    @property
    def is_bitsandbytes(self) -> bool:
        return self.method in ("int8", "nf4", "fp4")

    @property
    def loadable(self) -> bool:
        """What memplan can load itself: bitsandbytes int8 and nf4."""
        return self.method in ("int8", "nf4")

    def note(self) -> str:
        if self.loadable:
            extra = ", double quant" if self.double_quant else ""
            return (
                f"pre-quantized with bitsandbytes {self.method}{extra}: planned at its stored size, "
                "loaded as stored, never re-quantized"
            )
        return (
            f"pre-quantized with {self.method}: planned at its stored size; memplan cannot load "
            "this method (transformers can)"
        )


def read_quantization(config: Mapping[str, Any], source: str) -> PreQuantized | None:
    """The ``quantization_config`` of ``config``, or None when the checkpoint is not quantized."""
    found = config.get("quantization_config")
    if found is None:
        return None
    if not isinstance(found, Mapping):
        raise CheckpointError(source, "quantization_config must be a JSON object")
    method = found.get("quant_method")
    if not isinstance(method, str) or not method:
        raise CheckpointError(source, "quantization_config has no quant_method")
    if method != "bitsandbytes":
        return PreQuantized(method.lower())
    return _bitsandbytes(found, source)


def _bitsandbytes(found: Mapping[str, Any], source: str) -> PreQuantized:
    skip = found.get("llm_int8_skip_modules") or ()
    if not isinstance(skip, list | tuple) or not all(isinstance(s, str) for s in skip):
        raise CheckpointError(source, "quantization_config.llm_int8_skip_modules must be a list of names")
    if found.get("load_in_8bit"):
        threshold = found.get("llm_int8_threshold", INT8_THRESHOLD)
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not threshold >= 0:
            raise CheckpointError(source, f"quantization_config.llm_int8_threshold is {threshold!r}")
        return PreQuantized("int8", threshold=float(threshold), skip_modules=tuple(skip))
    if found.get("load_in_4bit"):
        quant_type = found.get("bnb_4bit_quant_type", "fp4")
        if quant_type not in ("nf4", "fp4"):
            raise CheckpointError(source, f"quantization_config.bnb_4bit_quant_type is {quant_type!r}")
        compute = found.get("bnb_4bit_compute_dtype")
        return PreQuantized(
            str(quant_type),
            double_quant=bool(found.get("bnb_4bit_use_double_quant", False)),
            compute_dtype=compute if isinstance(compute, str) else None,
            skip_modules=tuple(skip),
        )
    raise CheckpointError(source, "a bitsandbytes quantization_config loads neither in 8 nor in 4 bits")
