"""A bitsandbytes layer's quantized weight as plain tensors, and the weight built back from them.

bitsandbytes keeps what a quantized weight means beside its data: an int8 weight's row scales
(``SCB``, which the layer's first forward moves from the parameter onto the layer's ``state``),
a 4-bit weight's ``QuantState`` (absmax, the code, the nested absmax and offset, blocksize,
shape, dtype). Whatever keeps such a weight away from its layer (the quantized-weights cache, a
residency tier) keeps it as the layer serialises it: plain tensors by names relative to the
layer (``weight``, ``SCB``, ``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``, ...),
the form a bitsandbytes checkpoint stores, and builds the parameter back from them as
transformers' deserialisers do.

On a CPU with AVX512-BF16 bitsandbytes repacks a 4-bit weight on the layer's first forward, and
its own unpacking loses what the repacking changed (``memplan.loaders._bnb_cpu``). memplan's
layers keep the state from before the repacking (under :data:`UNPACKED`) and serialise from it,
so the layer built back is the one that was loaded, and its next forward repacks it again, to
the same bits. A layer repacked without that state cannot be serialised exactly and is refused.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from memplan._bnb import import_bitsandbytes

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "UNPACKED",
    "build_weight",
    "cannot_serialise",
    "is_quantized_layer",
    "quantized_state",
    "set_state_on_layer",
    "state_on_layer",
]

UNPACKED = "_memplan_unpacked_state"  # a 4-bit layer's quantization state before the repacking


def is_quantized_layer(module: nn.Module) -> bool:
    if "bitsandbytes" not in sys.modules:  # no bnb layer can exist before bnb is imported
        return False
    bnb = import_bitsandbytes()
    return isinstance(module, bnb.nn.Linear8bitLt | bnb.nn.Linear4bit)


def quantized_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """``layer``'s quantized weight as it serialises, without its bias: ``weight`` and its
    states by names relative to the layer; the tensors the layer holds where it holds them (a
    packed weight's unpacked data and the packed ``quant_state`` are new ones)."""
    return {name: t for name, t in layer.state_dict(keep_vars=True).items() if name != "bias"}


def cannot_serialise(layer: Any) -> str | None:
    """Why :func:`quantized_state` cannot give ``layer``'s weight exactly, or None."""
    import torch

    bnb = import_bitsandbytes()
    weight = layer.weight
    unquantized = "bitsandbytes has not quantized (it does as the layer moves to a device)"
    if isinstance(layer, bnb.nn.Linear8bitLt):
        if weight.dtype != torch.int8:
            return f"is an int8 layer's weight {unquantized}"
        if getattr(weight, "SCB", None) is None and layer.state.SCB is None:
            return "is an int8 weight without its row scales (SCB)"
        return None
    state = getattr(weight, "quant_state", None)
    if state is None:
        return f"is a 4-bit layer's weight {unquantized}"
    if getattr(state, "packing_format_for_cpu", False) and getattr(layer, UNPACKED, None) is None:
        return (
            "was repacked by bitsandbytes for its AVX512-BF16 kernel without its state from before "
            "being kept, and bitsandbytes' unpacking changes its scales: register the model before "
            "its first forward, or load it with memplan.load, whose layers keep that state"
        )
    return None


def build_weight(module: nn.Module, stored: Mapping[str, torch.Tensor], torch_device: str) -> nn.Parameter:
    """The layer's parameter from its serialised weight (``weight`` and its states by their names
    relative to the layer), as transformers' bnb deserialisers build it, on ``torch_device``
    (where they are already, the tensors themselves)."""
    bnb = import_bitsandbytes()
    weight = stored["weight"]
    if isinstance(module, bnb.nn.Linear8bitLt):
        kwargs = dict(module.weight.__dict__)
        kwargs["SCB"] = stored["SCB"]
        return bnb.nn.Int8Params(weight, requires_grad=False, **kwargs).to(torch_device)  # type: ignore[no-any-return]
    states = {name: tensor for name, tensor in stored.items() if name != "weight"}
    return bnb.nn.Params4bit.from_prequantized(  # type: ignore[no-any-return]
        data=weight, quantized_stats=states, requires_grad=False, device=torch_device, module=module
    )


def state_on_layer(layer: Any) -> dict[str, Any]:
    """What the layer itself holds of its weight (not the parameter): an int8 layer's ``state``
    after a forward (``CB``, ``SCB``), a 4-bit layer's ``quant_state`` and the state memplan
    kept from before a repacking. Put back with :func:`set_state_on_layer`."""
    if isinstance(layer, import_bitsandbytes().nn.Linear8bitLt):
        return {"CB": layer.state.CB, "SCB": layer.state.SCB}
    return {"quant_state": getattr(layer, "quant_state", None), UNPACKED: getattr(layer, UNPACKED, None)}


def set_state_on_layer(layer: Any, held: Mapping[str, Any]) -> None:
    """Make what the layer holds of its weight ``held`` (from :func:`state_on_layer`); ``{}``
    lets go of it all: a weight kept elsewhere, or built anew, is held by nothing old."""
    if isinstance(layer, import_bitsandbytes().nn.Linear8bitLt):
        layer.state.CB, layer.state.SCB = held.get("CB"), held.get("SCB")
        return
    layer.quant_state = held.get("quant_state")
    if held.get(UNPACKED) is not None:
        setattr(layer, UNPACKED, held[UNPACKED])
    elif hasattr(layer, UNPACKED):
        delattr(layer, UNPACKED)
