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
    "prequantized_weight",
    "quantize_weight",
    "quantized_nbytes",
    "quantized_size",
    "record_quantization",
    "replace_linears",
]

INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold; transformers' default too


def _bnb() -> Any:
    try:
        import bitsandbytes
    except ImportError as exc:
        raise MemplanError("quantized loading needs bitsandbytes: pip install 'memplan[quant]'") from exc
    return bitsandbytes


def _replacement(
    linear: nn.Linear, strategy: Quantized, compute_dtype: torch.dtype, threshold: float
) -> nn.Module:
    bnb = _bnb()
    has_bias = linear.bias is not None
    if strategy.method == "int8":
        return bnb.nn.Linear8bitLt(  # type: ignore[no-any-return]
            linear.in_features, linear.out_features, has_bias,
            has_fp16_weights=False, threshold=threshold, device="meta",
        )  # fmt: skip
    return bnb.nn.Linear4bit(  # type: ignore[no-any-return]
        linear.in_features, linear.out_features, has_bias,
        compute_dtype=compute_dtype, compress_statistics=strategy.double_quant,
        quant_type="nf4", device="meta",
    )  # fmt: skip


def replace_linears(
    model: nn.Module,
    modules: set[str],
    strategy: Quantized,
    compute_dtype: torch.dtype,
    threshold: float = INT8_THRESHOLD,
) -> int:
    """Swap the ``nn.Linear`` modules named in ``modules`` for bitsandbytes ones; returns how many."""
    from torch import nn

    swapped = 0
    for name, module in list(model.named_modules()):
        if name in modules and type(module) is nn.Linear:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, _replacement(module, strategy, compute_dtype, threshold))
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


def prequantized_weight(
    module: nn.Module, stored: dict[str, torch.Tensor], torch_device: str
) -> nn.Parameter:
    """The layer's parameter from what a bitsandbytes checkpoint stored (``weight`` and its
    states by their names relative to the layer), as transformers' bnb deserialisers build it."""
    bnb = _bnb()
    weight = stored["weight"]
    if isinstance(module, bnb.nn.Linear8bitLt):
        kwargs = dict(module.weight.__dict__)
        kwargs["SCB"] = stored["SCB"]
        return bnb.nn.Int8Params(weight, requires_grad=False, **kwargs).to(torch_device)  # type: ignore[no-any-return]
    states = {name: tensor for name, tensor in stored.items() if name != "weight"}
    return bnb.nn.Params4bit.from_prequantized(  # type: ignore[no-any-return]
        data=weight, quantized_stats=states, requires_grad=False, device=torch_device, module=module
    )


def record_quantization(model: nn.Module, strategy: Quantized, compute_dtype: torch.dtype) -> None:
    """Write the ``quantization_config`` transformers would have set, so that ``save_pretrained``
    writes a checkpoint ``from_pretrained`` reloads as these very bnb layers (without it the int8
    weights and ``SCB`` reload as plain weights: silently wrong). Linears left in high precision
    are listed as skipped, so a reload converts exactly the same layers."""
    config = getattr(model, "config", None)
    if config is None or strategy.prequantized:  # a pre-quantized config already says it
        return
    from torch import nn
    from transformers import BitsAndBytesConfig
    from transformers.pytorch_utils import Conv1D

    skipped = [
        name for name, m in model.named_modules()
        if isinstance(m, nn.Linear | Conv1D) and not is_quantized_layer(m)
    ]  # fmt: skip
    if strategy.method == "int8":
        config.quantization_config = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD, llm_int8_skip_modules=skipped
        )
        return
    config.quantization_config = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=strategy.double_quant,
        bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skipped,
    )  # fmt: skip


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
