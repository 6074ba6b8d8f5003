"""What a bitsandbytes layer must be built from, checked before it is built.

bitsandbytes builds a layer from whatever states it is handed: without ``nested_absmax`` it takes
the uint8 ``absmax`` for the real scales (logits off by up to 0.9, no error), and an int8 weight
without ``SCB`` is no bitsandbytes layer at all. So the loader checks each layer's full set of
states against the method, first by name for the whole checkpoint (before anything is read), then
each layer's packed ``quant_state`` (which says whether the layer is nested) as it is read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

from memplan.errors import CheckpointError
from memplan.planner.quantization import QUANT_STATE_SUFFIXES

if TYPE_CHECKING:
    import torch

    from memplan.planner.checkpoint import Checkpoint

__all__ = ["DamagedState", "check_states", "stored_layers"]

_INT8 = (".weight", ".SCB")
_NESTED = (".weight.nested_absmax", ".weight.nested_quant_map")
_WEIGHT_DTYPE = {"int8": "I8", "nf4": "U8", "fp4": "U8"}


def _required(method: str) -> tuple[str, ...]:
    if method == "int8":
        return _INT8
    return (".weight", ".weight.absmax", ".weight.quant_map", f".weight.quant_state.bitsandbytes__{method}")


class DamagedState(ValueError):
    """A layer's stored states do not make a layer of the method: ``name`` (relative to the
    layer, e.g. ``weight.nested_absmax``) is missing or does not belong."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def stored_layers(checkpoint: Checkpoint, method: str) -> set[str]:
    """The layers a bitsandbytes checkpoint stores quantized (weights stored as integers, and
    layers with states beside their weight), each checked to hold every state ``method`` needs
    and none of another method's; a :class:`CheckpointError` names the first tensor amiss."""
    tensors = checkpoint.tensors
    layers = {
        name.removesuffix(".weight")
        for name, info in tensors.items()
        if name.endswith(".weight") and info.dtype in ("I8", "U8")
    }
    for suffix in QUANT_STATE_SUFFIXES:
        layers |= {name.removesuffix(suffix) for name in tensors if name.endswith(suffix)}
    for layer in sorted(layers):
        _check_names(checkpoint, layer, method)
    return layers


def _check_names(checkpoint: Checkpoint, layer: str, method: str) -> None:
    tensors = checkpoint.tensors
    present = [layer + s for s in (".weight", *QUANT_STATE_SUFFIXES) if layer + s in tensors]
    file = tensors[present[0]].file
    allowed = {*_required(method), *(_NESTED if method != "int8" else ()), ".weight_format"}
    for name in present:
        if name.removeprefix(layer) not in allowed:
            reason = f"not a state of bitsandbytes {method}, which quantization_config names"
            raise CheckpointError(tensors[name].file, reason, name)
    for suffix in _required(method):
        if layer + suffix not in tensors:
            reason = f"a bitsandbytes {method} layer without its {suffix[1:]} (damaged checkpoint?)"
            raise CheckpointError(file, reason, layer + suffix)
    weight = tensors[layer + ".weight"]
    if weight.dtype != _WEIGHT_DTYPE[method]:
        reason = f"a bitsandbytes {method} weight is stored as {_WEIGHT_DTYPE[method]}, not {weight.dtype}"
        raise CheckpointError(weight.file, reason, weight.name)


def check_states(method: str, states: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`DamagedState` unless ``states`` (one layer's, by names relative to it) build
    a layer of ``method``: every state present, and the nested states there exactly when the
    packed ``quant_state`` says the layer is nested."""
    for suffix in _required(method):
        if suffix[1:] not in states:
            raise DamagedState(suffix[1:], "missing")
    if method == "int8":
        return
    packed = f"weight.quant_state.bitsandbytes__{method}"
    try:
        described = json.loads(bytes(states[packed].cpu().numpy().tobytes()).decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DamagedState(packed, f"not the JSON bitsandbytes packs: {exc}") from exc
    if not isinstance(described, dict):
        raise DamagedState(packed, "not the JSON object bitsandbytes packs")
    nested = "nested_offset" in described
    for suffix in _NESTED:
        if nested != (suffix[1:] in states):
            said = "nested" if nested else "not nested"
            have = "missing" if nested else "present"
            raise DamagedState(suffix[1:], f"{have}, and the packed quant_state says the layer is {said}")
