"""bitsandbytes layers in place of ``nn.Linear``, each quantised as its weight arrives.

The layers and their arguments are the ones transformers' bitsandbytes integration uses
(``Linear8bitLt(has_fp16_weights=False, threshold=6.0)``, ``Linear4bit(quant_type="nf4")``), so
the same checkpoint gives the same kernels and the same logits either way.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Any

from memplan._bnb import import_bitsandbytes
from memplan._bnb_state import build_weight, is_quantized_layer
from memplan.loaders._cpu_quantizers import int8_rowwise, nf4_parameter
from memplan.loaders._prequantized import check_states
from memplan.planner import INT8_THRESHOLD, Quantized, TensorInfo, quantized_bytes

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
    "summary",
    "transformers_choice",
]


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a Linear whose weight is stored (in, out)."""
    utils = sys.modules.get("transformers.pytorch_utils")  # no Conv1D exists before it is imported
    return utils is not None and isinstance(module, utils.Conv1D)


def _features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a layer bitsandbytes replaces, as transformers' replace_with_bnb_linear picks
    them: an exact ``nn.Linear`` or a ``Conv1D``; None for anything else."""
    from torch import nn

    if type(module) is nn.Linear:
        return module.in_features, module.out_features
    if _is_conv1d(module):
        weight: Any = module.weight
        stored_in, stored_out = weight.shape
        return int(stored_in), int(stored_out)
    return None


def _replacement(
    layer: nn.Module, features: tuple[int, int], strategy: Quantized, compute_dtype: torch.dtype,
    threshold: float,
) -> nn.Module:  # fmt: skip
    bnb = import_bitsandbytes()
    has_bias = getattr(layer, "bias", None) is not None
    if strategy.method == "int8":
        new: nn.Module = bnb.nn.Linear8bitLt(
            *features, has_bias, has_fp16_weights=False, threshold=threshold, device="meta"
        )
    else:
        new = bnb.nn.Linear4bit(
            *features, has_bias, compute_dtype=compute_dtype, compress_statistics=strategy.double_quant,
            quant_type="nf4", device="meta",
        )  # fmt: skip
    if _is_conv1d(layer):
        _expect_stored_orientation(new, layer)
    return new


def _expect_stored_orientation(new: nn.Module, conv1d: nn.Module) -> None:
    """A Conv1D's file weight is (in, out): the placeholder takes that shape until quantize_weight
    transposes it, as transformers' Bnb8bitQuantize / Bnb4bitQuantize do (``source_cls``)."""
    import torch

    setattr(new, "source_cls", type(conv1d))  # noqa: B010  (nn.Module's typed __setattr__)
    weight: Any = new.weight
    stored: Any = conv1d.weight
    weight.data = torch.empty(tuple(stored.shape), dtype=weight.dtype, device="meta")


def transformers_choice(model: nn.Module, skip_modules: tuple[str, ...] | None) -> set[str] | None:
    """The modules transformers+bnb converts in ``model``, by transformers' own rule: every exact
    ``nn.Linear`` and ``Conv1D`` (``replace_with_bnb_linear``) that ``get_modules_to_not_convert``
    leaves (tied and output embeddings, the last module, or else the user's ``skip_modules``;
    ``_keep_in_fp32_modules`` either way). None for a model that is no transformers model: the
    rule reads tied weights and output embeddings only ``PreTrainedModel`` has."""
    modeling = sys.modules.get("transformers.modeling_utils")  # a transformers model imported it
    if modeling is None or not isinstance(model, modeling.PreTrainedModel):
        return None
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    kept = HfQuantizer.get_modules_to_not_convert(
        model,
        list(skip_modules) if skip_modules is not None else None,
        model._keep_in_fp32_modules,  # as transformers' quantizers pass it
    )
    return {
        name for name, module in model.named_modules()
        if _features(module) is not None and should_convert_module(name, kept)
    }  # fmt: skip


def replace_linears(
    model: nn.Module,
    modules: set[str],
    strategy: Quantized,
    compute_dtype: torch.dtype,
    threshold: float = INT8_THRESHOLD,
) -> int:
    """Swap the ``nn.Linear`` and ``Conv1D`` modules named in ``modules`` for bitsandbytes ones;
    returns how many."""
    swapped = 0
    for name, module in list(model.named_modules()):
        features = _features(module) if name in modules else None
        if features is not None:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, _replacement(module, features, strategy, compute_dtype, threshold))
            swapped += 1
    return swapped


def _stored_transposed(module: nn.Module) -> bool:
    source = getattr(module, "source_cls", None)
    utils = sys.modules.get("transformers.pytorch_utils")
    return source is not None and utils is not None and issubclass(source, utils.Conv1D)


def quantize_weight(module: nn.Module, weight: torch.Tensor, torch_device: str) -> nn.Parameter:
    """``weight`` (in the compute dtype, on the host) as the layer's quantised parameter on the device."""
    bnb = import_bitsandbytes()
    if _stored_transposed(module):
        weight = weight.T
    if isinstance(module, bnb.nn.Linear8bitLt):
        if not torch_device.startswith("cpu"):  # on GPUs bnb's own kernel is the fast one
            param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            return param.to(torch_device)  # type: ignore[no-any-return]
        weight_i8, scales = int8_rowwise(weight)
        return prequantized_weight(module, {"weight": weight_i8, "SCB": scales}, torch_device)
    old: Any = module.weight
    if torch_device.startswith("cpu") and old.quant_type == "nf4":
        return nf4_parameter(weight, old)
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
    states by their names relative to the layer), as transformers' bnb deserialisers build it;
    :class:`DamagedState` if they do not make one."""
    bnb = import_bitsandbytes()
    int8 = isinstance(module, bnb.nn.Linear8bitLt)
    method = "int8" if int8 else str(getattr(module.weight, "quant_type", ""))
    layer: Any = module
    check_states(method, stored, (int(layer.out_features), int(layer.in_features)))
    return build_weight(module, stored, torch_device)


def record_quantization(model: nn.Module, strategy: Quantized, compute_dtype: torch.dtype) -> None:
    """Write the ``quantization_config`` transformers would have set, so that ``save_pretrained``
    writes a checkpoint ``from_pretrained`` reloads as these very bnb layers (without it the int8
    weights and ``SCB`` reload as plain weights: silently wrong). Linears left in high precision
    are listed as skipped, so a reload converts exactly the same layers."""
    config = getattr(model, "config", None)
    if config is None or strategy.prequantized:  # a pre-quantized config already says it
        return
    from transformers import BitsAndBytesConfig

    skipped = _kept_linears(model)
    if strategy.method == "int8":
        config.quantization_config = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD, llm_int8_skip_modules=skipped
        )
        return
    config.quantization_config = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=strategy.double_quant,
        bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skipped,
    )  # fmt: skip


def _kept_linears(model: nn.Module) -> list[str]:
    """The ``nn.Linear`` and ``Conv1D`` modules left in high precision."""
    from torch import nn

    return [
        name for name, m in model.named_modules()
        if (isinstance(m, nn.Linear) or _is_conv1d(m)) and not is_quantized_layer(m)
    ]  # fmt: skip


def summary(model: nn.Module, method: str) -> str:
    """What was really quantized, for the load report: ``int8: 24 of 26 Linear layers (kept: ...)``."""
    kept = _kept_linears(model)
    converted = sum(1 for m in model.modules() if is_quantized_layer(m))
    shown = ", ".join(kept[:4]) + (f" and {len(kept) - 4} more" if len(kept) > 4 else "")
    return f"{method}: {converted} of {converted + len(kept)} Linear layers" + (
        f" (kept in high precision: {shown})" if kept else ""
    )


def quantized_size(module: nn.Module, weight: TensorInfo) -> int:
    """Bytes :func:`quantize_weight` gives ``module`` for ``weight``: the planner's figure (they agree
    to the byte), known before quantising so the charge can come first."""
    method = "int8" if isinstance(module, import_bitsandbytes().nn.Linear8bitLt) else "nf4"
    double_quant = bool(getattr(module.weight, "compress_statistics", False))
    if _stored_transposed(module):  # quantised as (out, in): one int8 scale per output row
        weight = dataclasses.replace(weight, shape=weight.shape[::-1])
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
