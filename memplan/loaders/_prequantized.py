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
from typing import TYPE_CHECKING, Any

from memplan.errors import CheckpointError
from memplan.planner import QUANT_STATE_SUFFIXES

if TYPE_CHECKING:
    import torch

    from memplan.planner import Checkpoint

__all__ = ["DamagedState", "check_states", "stored_layers"]

_INT8 = (".weight", ".SCB")
_NESTED = (".weight.nested_absmax", ".weight.nested_quant_map")
# A 4-bit weight is packed two to a byte into any storage dtype (``bnb_4bit_quant_storage``:
# uint8 by default, bf16 or f32 where FSDP shards it with the rest).
_WEIGHT_DTYPES = {"int8": ("I8",), "nf4": ("U8", "BF16", "F16", "F32"), "fp4": ("U8", "BF16", "F16", "F32")}
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


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
    if weight.dtype not in _WEIGHT_DTYPES[method]:
        stored = " or ".join(_WEIGHT_DTYPES[method])
        reason = f"a bitsandbytes {method} weight is stored as {stored}, not {weight.dtype}"
        raise CheckpointError(weight.file, reason, weight.name)


def check_states(method: str, states: Mapping[str, torch.Tensor], shape: tuple[int, int]) -> None:
    """Raise :class:`DamagedState` unless ``states`` (one layer's, by names relative to it) build
    a layer of ``method`` for a weight of ``shape`` (out, in): every state present, with the
    dtype and element count the layout takes (the packed ``quant_state`` says the 4-bit layout:
    its type, shape, blocksizes, and whether it is nested)."""
    import torch

    for suffix in _required(method):
        if suffix[1:] not in states:
            raise DamagedState(suffix[1:], "missing")
    if method == "int8":
        _expect(states, "weight", torch.int8, shape[0] * shape[1], shape)
        _expect(states, "SCB", torch.float32, shape[0])
        return
    described = _packed(states, f"weight.quant_state.bitsandbytes__{method}")
    _check_packed(described, method, shape)
    blocks = -(-shape[0] * shape[1] // described["blocksize"])
    _expect_packed(states["weight"], -(-shape[0] * shape[1] // 2))
    _expect(states, "weight.quant_map", torch.float32, 16)
    nested = "nested_offset" in described
    for suffix in _NESTED:
        if nested != (suffix[1:] in states):
            said = "nested" if nested else "not nested"
            have = "missing" if nested else "present"
            raise DamagedState(suffix[1:], f"{have}, and the packed quant_state says the layer is {said}")
    if not nested:
        _expect(states, "weight.absmax", torch.float32, blocks)
        return
    _expect(states, "weight.absmax", torch.uint8, blocks)
    _expect(states, "weight.nested_absmax", torch.float32, -(-blocks // described["nested_blocksize"]))
    _expect(states, "weight.nested_quant_map", torch.float32, 256)


def _packed(states: Mapping[str, torch.Tensor], name: str) -> dict[str, Any]:
    try:
        described = json.loads(bytes(states[name].cpu().numpy().tobytes()).decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DamagedState(name, f"not the JSON bitsandbytes packs: {exc}") from exc
    if not isinstance(described, dict):
        raise DamagedState(name, "not the JSON object bitsandbytes packs")
    return described


def _check_packed(described: dict[str, Any], method: str, shape: tuple[int, int]) -> None:
    name = f"weight.quant_state.bitsandbytes__{method}"
    if described.get("quant_type") != method:
        raise DamagedState(name, f"says quant_type {described.get('quant_type')!r}, not {method!r}")
    if described.get("shape") != list(shape):
        raise DamagedState(name, f"says shape {described.get('shape')!r}; the layer is {list(shape)}")
    keys = ("blocksize", "nested_blocksize") if "nested_offset" in described else ("blocksize",)
    for key in keys:
        value = described.get(key)
        if type(value) is not int or value not in _BLOCKSIZES:
            raise DamagedState(name, f"says {key} {value!r}, not one of bitsandbytes' {list(_BLOCKSIZES)}")


def _expect(
    states: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype, numel: int,
    shape: tuple[int, ...] | None = None,
) -> None:  # fmt: skip
    found = states[name]
    if found.dtype != dtype or found.numel() != numel or (shape is not None and tuple(found.shape) != shape):
        wanted = f"{list(shape)} " if shape is not None else f"{numel} elements of "
        raise DamagedState(name, f"{list(found.shape)} {found.dtype} where the layout takes {wanted}{dtype}")


def _expect_packed(weight: torch.Tensor, nbytes: int) -> None:
    """A 4-bit weight: ``nbytes`` of packed pairs, in whole elements of its storage dtype."""
    import torch

    storage = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)
    size = weight.element_size()
    if weight.dtype not in storage or weight.numel() != -(-nbytes // size):
        raise DamagedState(
            "weight", f"{list(weight.shape)} {weight.dtype} where the layout takes {nbytes} packed bytes"
        )
