"""The dtypes a checkpoint may hold: one table, by safetensors name (no torch import here).

Each row says what torch calls the dtype (None where torch has no such dtype: a header may still
name it, and a load refuses it), its bits per element, whether it is floating point (a load casts
those to the compute dtype), and the names people write for it. Every other view (the header
reader's bits, the loader's torch names, the planner's byte counts and the names a policy takes)
is derived from it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memplan.errors import InvalidOption

if TYPE_CHECKING:
    import torch

__all__ = [
    "BITS",
    "DTYPES",
    "FLOATING",
    "SAFETENSORS_NAMES",
    "TORCH_FLOATING",
    "TORCH_NAMES",
    "DType",
    "compute_dtype",
    "dtype_bytes",
    "dtype_name",
    "normalize_dtype",
    "torch_dtype_named",
    "torch_name",
]


@dataclass(frozen=True)
class DType:
    """One dtype: ``name`` as safetensors writes it, ``torch`` the attribute of the torch module
    (None where torch lacks it), ``bits`` per element, and ``aliases``: the names people write for
    it in a policy or workload (a dtype without any is not one memplan computes or caches in)."""

    name: str
    torch: str | None
    bits: int
    floating: bool
    aliases: tuple[str, ...] = ()


DTYPES: tuple[DType, ...] = (
    DType("F64", "float64", 64, True, ("f64", "fp64", "float64", "double")),
    DType("F32", "float32", 32, True, ("f32", "fp32", "float32", "float")),
    DType("F16", "float16", 16, True, ("f16", "fp16", "float16", "half")),
    DType("BF16", "bfloat16", 16, True, ("bf16", "bfloat16")),
    DType("F8_E4M3", "float8_e4m3fn", 8, True, ("fp8", "f8", "float8_e4m3fn", "f8_e4m3")),
    DType("F8_E5M2", "float8_e5m2", 8, True, ("float8_e5m2", "f8_e5m2")),
    DType("F8_E4M3FNUZ", "float8_e4m3fnuz", 8, True),
    DType("F8_E5M2FNUZ", "float8_e5m2fnuz", 8, True),
    DType("F8_E8M0", "float8_e8m0fnu", 8, True),
    DType("F6_E2M3", None, 6, True),
    DType("F6_E3M2", None, 6, True),
    DType("F4", None, 4, True),
    DType("C64", "complex64", 64, False),
    DType("I64", "int64", 64, False),
    DType("I32", "int32", 32, False),
    DType("I16", "int16", 16, False),
    DType("I8", "int8", 8, False),
    DType("U64", "uint64", 64, False),
    DType("U32", "uint32", 32, False),
    DType("U16", "uint16", 16, False),
    DType("U8", "uint8", 8, False),
    DType("BOOL", "bool", 8, False),
)

# safetensors name -> bits per element: every dtype a header may name
BITS = {d.name: d.bits for d in DTYPES}
# safetensors name -> torch attribute name, where torch has the dtype
TORCH_NAMES = {d.name: d.torch for d in DTYPES if d.torch is not None}
# torch attribute name -> safetensors name
SAFETENSORS_NAMES = {attr: name for name, attr in TORCH_NAMES.items()}
# floating-point dtypes, torch's or not: what a model's working dtype is chosen from
FLOATING = frozenset(d.name for d in DTYPES if d.floating)
# the floating dtypes torch has: a loaded tensor of one of these is_floating_point, and a load casts it
TORCH_FLOATING = frozenset(d.name for d in DTYPES if d.floating and d.torch is not None)
# the dtypes a policy or workload may name, by every name they go by (lower case)
_NAMED = {alias: d.name for d in DTYPES if d.aliases for alias in (d.name.lower(), *d.aliases)}


@functools.lru_cache(maxsize=64)  # called per tensor per candidate; names repeat
def normalize_dtype(name: str) -> str:
    """``"bf16"``, ``"bfloat16"``, ``"torch.bfloat16"`` and ``"BF16"`` are all ``"BF16"``."""
    found = _NAMED.get(name.strip().removeprefix("torch.").lower())
    if found is None:
        raise InvalidOption("dtype", name, "name a floating dtype: bf16, fp16, fp32 or fp8")
    return found


def dtype_name(dtype: object) -> str:
    """The canonical name of a dtype given by name or as a ``torch.dtype``: ``torch.float16`` is ``"F16"``.

    A torch.dtype prints as ``torch.float16``, which :func:`normalize_dtype` reads, so torch is
    never imported here.
    """
    return normalize_dtype(dtype if isinstance(dtype, str) else str(dtype))


def compute_dtype(dtype: object) -> str:
    """:func:`dtype_name`, for a dtype torch can compute in: fp8 stores weights and KV caches only."""
    name = dtype_name(dtype)
    if name.startswith("F8"):
        raise InvalidOption(
            "compute dtype", dtype, "be bf16, fp16 or fp32 (fp8 is for weights and KV caches)"
        )
    return name


def dtype_bytes(name: str) -> int:
    """Bytes per element of a dtype a policy or workload names (see :func:`normalize_dtype`)."""
    return BITS[normalize_dtype(name)] // 8


def torch_dtype_named(name: str) -> torch.dtype | None:
    """The torch dtype whose attribute name is ``name`` (``"bfloat16"``), None where torch has none."""
    import torch

    found = getattr(torch, name, None)
    return found if isinstance(found, torch.dtype) else None


def torch_name(dtype: torch.dtype) -> str:
    """The attribute name of a torch dtype: ``torch.bfloat16`` is ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")
