"""bitsandbytes layers in place of ``nn.Linear``, each quantised as its weight arrives.

The layers and their arguments are the ones transformers' bitsandbytes integration uses
(``Linear8bitLt(has_fp16_weights=False, threshold=6.0)``, ``Linear4bit(quant_type="nf4")``), so
the same checkpoint gives the same kernels and the same logits either way.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from memplan.errors import MemplanError
from memplan.planner.checkpoint import TensorInfo
from memplan.planner.estimate import quantized_bytes
from memplan.planner.strategies import Quantized

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "INT8_THRESHOLD",
    "is_quantized_layer",
    "quantize_weight",
    "quantized_nbytes",
    "quantized_size",
    "replace_linears",
]

INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold; transformers' default too


def _bnb() -> Any:
    try:
        import bitsandbytes
    except ImportError as exc:
        raise MemplanError("quantized loading needs bitsandbytes: pip install 'memplan[quant]'") from exc
    return bitsandbytes


def _replacement(linear: nn.Linear, strategy: Quantized, compute_dtype: torch.dtype) -> nn.Module:
    bnb = _bnb()
    has_bias = linear.bias is not None
    if strategy.method == "int8":
        return bnb.nn.Linear8bitLt(  # type: ignore[no-any-return]
            linear.in_features, linear.out_features, has_bias,
            has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta",
        )  # fmt: skip
    return bnb.nn.Linear4bit(  # type: ignore[no-any-return]
        linear.in_features, linear.out_features, has_bias,
        compute_dtype=compute_dtype, compress_statistics=strategy.double_quant,
        quant_type="nf4", device="meta",
    )  # fmt: skip


def replace_linears(
    model: nn.Module, modules: set[str], strategy: Quantized, compute_dtype: torch.dtype
) -> int:
    """Swap the ``nn.Linear`` modules named in ``modules`` for bitsandbytes ones; returns how many."""
    from torch import nn

    swapped = 0
    for name, module in list(model.named_modules()):
        if name in modules and type(module) is nn.Linear:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, _replacement(module, strategy, compute_dtype))
            swapped += 1
    return swapped


def is_quantized_layer(module: nn.Module) -> bool:
    if "bitsandbytes" not in sys.modules:  # no bnb layer can exist before bnb is imported
        return False
    bnb = _bnb()
    return isinstance(module, bnb.nn.Linear8bitLt | bnb.nn.Linear4bit)


def quantize_weight(module: nn.Module, weight: torch.Tensor, torch_device: str) -> nn.Parameter:
    """``weight`` (in the compute dtype, on the host) as the layer's quantised parameter on the device."""
    bnb = _bnb()
    if isinstance(module, bnb.nn.Linear8bitLt):
        param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        old: Any = module.weight
        param = bnb.nn.Params4bit(
            weight, requires_grad=False, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type,
            quant_storage=old.quant_storage,
        )  # fmt: skip
    return param.to(torch_device)  # type: ignore[no-any-return]


def quantized_size(module: nn.Module, weight: TensorInfo) -> int:
    """Bytes :func:`quantize_weight` gives ``module`` for ``weight``: the planner's figure (they agree
    to the byte), known before quantising so the charge can come first."""
    method = "int8" if isinstance(module, _bnb().nn.Linear8bitLt) else "nf4"
    double_quant = bool(getattr(module.weight, "compress_statistics", False))
    return quantized_bytes(weight, method, weight.dtype, double_quant)


def quantized_nbytes(param: torch.Tensor) -> int:
    """Bytes the quantised weight holds: the packed data plus its scales / quantisation state."""
    total = param.numel() * param.element_size()
    scb = getattr(param, "SCB", None)
    if scb is not None:
        total += scb.numel() * scb.element_size()
    state = getattr(param, "quant_state", None)
    if state is not None:
        parts = [state.absmax, state.code]
        if state.nested:
            parts += [state.state2.absmax, state.state2.code, state.offset]
        total += sum(p.numel() * p.element_size() for p in parts)
    return total
