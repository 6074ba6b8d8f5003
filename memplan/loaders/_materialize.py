"""Fill a meta-device model from the checkpoint, tensor by tensor, into each tensor's final place."""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

from memplan.errors import CheckpointError
from memplan.gpu.device import Device
from memplan.loaders._placement import Placement
from memplan.loaders._quantize import is_quantized_layer, prequantized_weight, quantize_weight, quantized_size
from memplan.loaders._reader import TensorReader
from memplan.planner.checkpoint import Checkpoint
from memplan.planner.quantization import QUANT_STATE_SUFFIXES

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Binding", "Materializer", "bindings", "in_module", "set_tensor", "unused_tensors"]

_LACKS = "the model needs it, the checkpoint lacks it"
_NO_PLACE = (
    "the checkpoint has it, the model has no place for it (does config.json describe this checkpoint?)"
)


@dataclass
class Binding:
    """One tensor of the model: where it is set (tied parameters: several places) and its source."""

    owners: list[tuple[nn.Module, str]]
    name: str  # the checkpoint's name for it
    shape: tuple[int, ...]
    is_buffer: bool


def _variants(name: str, base_prefix: str) -> list[str]:
    """The names a checkpoint may give the model's tensor ``name``: with or without the base-model prefix."""
    if not base_prefix:
        return [name]
    return [name, name.removeprefix(f"{base_prefix}."), f"{base_prefix}.{name}"]


def _checkpoint_name(names: list[str], available: Callable[[str], bool], base_prefix: str) -> str | None:
    """The first of a tensor's model names the checkpoint has, allowing for a base-model prefix."""
    for name in names:
        for variant in _variants(name, base_prefix):
            if available(variant):
                return variant
    return None


def _grouped_params(model: nn.Module) -> dict[int, tuple[list[tuple[nn.Module, str]], list[str]]]:
    groups: dict[int, tuple[list[tuple[nn.Module, str]], list[str]]] = defaultdict(lambda: ([], []))
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                owners, names = groups[id(param)]
                owners.append((module, attr))
                names.append(f"{module_name}.{attr}" if module_name else attr)
    return groups


def in_module(name: str, module: str) -> bool:
    """Whether the tensor or module ``name`` is ``module`` or lies inside it."""
    return name == module or name.startswith(f"{module}.")


def bindings(model: nn.Module, reader: TensorReader) -> list[Binding]:
    """Every parameter (and every buffer still on meta) of ``model``, in checkpoint file order.

    A tensor the checkpoint lacks is a :class:`CheckpointError` now, before anything is read.
    """
    base = str(getattr(model, "base_model_prefix", "") or "")
    tensors = reader.checkpoint.tensors
    found: list[Binding] = []
    for owners, names in _grouped_params(model).values():
        name = _checkpoint_name(names, tensors.__contains__, base)
        if name is None:
            raise CheckpointError(reader.checkpoint.path, _LACKS, names[0])
        param = getattr(owners[0][0], owners[0][1])
        found.append(Binding(owners, name, tuple(param.shape), False))
    for module_name, module in model.named_modules():
        for attr, buffer in module._buffers.items():
            full = f"{module_name}.{attr}" if module_name else attr
            if buffer is not None and buffer.device.type == "meta":
                name = _checkpoint_name([full], tensors.__contains__, base)
                if name is None:
                    raise CheckpointError(reader.checkpoint.path, "buffer missing from the checkpoint", full)
                found.append(Binding([(module, attr)], name, tuple(buffer.shape), True))
    return sorted(found, key=lambda b: (str(tensors[b.name].file), tensors[b.name].offset))


def unused_tensors(
    model: nn.Module, checkpoint: Checkpoint, bound: list[Binding], also_used: Iterable[str] = ()
) -> tuple[str, ...]:
    """Checkpoint tensors ``model`` has no place for, less those its class says to ignore
    (transformers' ``_keys_to_ignore_on_load_unexpected``), with a warning naming them.

    One inside the decoder layers is a :class:`CheckpointError`: config.json and the checkpoint
    describe different models, and loading what the config asks for would drop weights silently.
    """
    base = str(getattr(model, "base_model_prefix", "") or "")
    named = chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    known = {b.name for b in bound} | {v for name, _ in named for v in _variants(name, base)} | set(also_used)
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    unused = sorted(n for n in checkpoint.tensors if n not in known and not any(p.search(n) for p in ignored))
    for name in unused:
        info = checkpoint.tensors[name]
        if info.layer is not None:
            raise CheckpointError(info.file, _NO_PLACE, name)
    if unused:
        shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
        warnings.warn(f"{checkpoint.name}: the model has no place for {shown}; not loaded", stacklevel=4)
    return tuple(unused)


def set_tensor(binding: Binding, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in every place ``binding`` names (a parameter, unless it is a buffer)."""
    from torch import nn

    if not binding.is_buffer and not isinstance(tensor, nn.Parameter):
        tensor = nn.Parameter(tensor, requires_grad=False)
    for module, attr in binding.owners:
        if binding.is_buffer:
            module._buffers[attr] = tensor
        else:
            module._parameters[attr] = tensor  # type: ignore[assignment]  # a Parameter, made above


class Materializer:
    """Reads each binding's tensor, checks it, casts it to ``dtype`` and places it (quantising
    bitsandbytes layers' weights on the way)."""

    def __init__(
        self, reader: TensorReader, placement: Placement, dtype: torch.dtype, *, prequantized: bool = False
    ) -> None:
        self.reader = reader
        self.placement = placement
        self.dtype = dtype
        self.prequantized = prequantized  # bnb layers take their stored weights, not quantize them

    def host_tensor(self, binding: Binding) -> torch.Tensor:
        """The binding's data on the host, checked against the model's shape, in the compute dtype."""
        info = self.reader.info(binding.name)
        if tuple(info.shape) != binding.shape:
            found, expected = list(info.shape), list(binding.shape)
            raise CheckpointError(
                info.file, f"shape {found} in the file, the model expects {expected}", info.name
            )
        tensor = self.reader.read(info.name)
        if tensor.is_floating_point() and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        return tensor

    def load(self, binding: Binding, device: Device) -> None:
        module, attr = binding.owners[0]
        if attr == "weight" and self.prequantized and is_quantized_layer(module):
            stored = self._stored_quantized(binding.name)
            size = sum(t.numel() * t.element_size() for t in stored.values())
            param = self.placement.place(
                device, size, binding.name, lambda where: prequantized_weight(module, stored, where)
            )
            set_tensor(binding, param)
            return
        host = self.host_tensor(binding)
        if attr == "weight" and is_quantized_layer(module):
            size = quantized_size(module, self.reader.info(binding.name))
            param = self.placement.place(
                device, size, binding.name, lambda where: quantize_weight(module, host, where)
            )
            set_tensor(binding, param)
            return
        set_tensor(binding, self.placement.put(host, device, binding.name))

    def _stored_quantized(self, weight: str) -> dict[str, torch.Tensor]:
        """A pre-quantized layer's weight and states as stored, keyed relative to the layer."""
        layer = weight.removesuffix(".weight")
        names = [weight] + [
            layer + s for s in QUANT_STATE_SUFFIXES if layer + s in self.reader.checkpoint.tensors
        ]
        return {name.removeprefix(f"{layer}."): self.reader.read(name) for name in names}

    def load_all(self, items: Iterable[Binding], device_for: Callable[[str], Device]) -> None:
        for binding in items:
            self.load(binding, device_for(binding.name))


def move_real_buffers(model: nn.Module, placement: Placement, device_for: Callable[[str], Device]) -> None:
    """Computed buffers (rotary tables) go where their module runs, charged like everything else."""
    for module_name, module in model.named_modules():
        for attr, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type != "meta":
                full = f"{module_name}.{attr}" if module_name else attr
                module._buffers[attr] = placement.put(buffer, device_for(full), full)
