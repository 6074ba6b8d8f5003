"""safetensors dtype names and the torch dtypes they are, by name (no torch import here)."""

from __future__ import annotations

__all__ = ["SAFETENSORS_NAMES", "TORCH_NAMES"]

# safetensors name -> torch attribute name
TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip

# torch attribute name -> safetensors name
SAFETENSORS_NAMES = {torch: name for name, torch in TORCH_NAMES.items()}
