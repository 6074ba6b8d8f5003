"""Fill a meta-device model from the checkpoint, tensor by tensor, into each tensor's final place."""

from __future__ import annotations

import enum
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memplan.errors import CheckpointError
from memplan.gpu import Device
from memplan.loaders._conversion import Conversion, KeyMap
from memplan.loaders._placement import Placement
from memplan.loaders._prequantized import DamagedState
from memplan.loaders._quantize import is_quantized_layer, prequantized_weight, quantize_weight, quantized_size
from memplan.loaders._reader import TensorReader
from memplan.planner import QUANT_STATE_SUFFIXES, Checkpoint, in_module

if TYPE_CHECKING:
    import torch
    from torch import nn

    from memplan.loaders._qcache import QuantCache

__all__ = [
    "Binding",
    "Materializer",
    "Origin",
    "bindings",
    "is_quantized_weight",
    "set_tensor",
    "unused_tensors",
]

_LACKS = "the model needs it, the checkpoint lacks it"
_NO_PLACE = (
    "the checkpoint has it, the model has no place for it (does config.json describe this checkpoint?)"
)


class Origin(enum.Enum):
    """Where a binding's tensor comes from: decided once per load, by the strategy's executor."""

    CHECKPOINT = "checkpoint"  # read from the file, cast to its dtype, placed
    STORED = "stored"  # a pre-quantized layer's weight and states, as the checkpoint saved them
    CACHED = "cached"  # the states an earlier load quantized (the quantized-weights cache)
    QUANTIZE = "quantize"  # read from the file and quantized as it arrives (then kept in the cache)


@dataclass
class Binding:
    """One tensor of the model: where it is set (tied parameters: several places) and its source."""

    owners: list[tuple[nn.Module, str]]
    name: str  # the model's name for it
    shape: tuple[int, ...]
    is_buffer: bool
    source: str  # the checkpoint tensor it is read from (a conversion: the first of those it reads)
    conversion: Conversion | None = None  # transformers' converter, for tensors fused or split on load
    # A buffer keeps the dtype the model built it in (transformers casts a loaded tensor to the
    # model's own); None: a floating parameter takes the load's dtype, an integer one the file's.
    dtype: torch.dtype | None = None
    origin: Origin = Origin.CHECKPOINT


@dataclass(frozen=True)
class Bound:
    """What a model takes from the checkpoint, and the parameters it has that the checkpoint lacks."""

    bindings: list[Binding]  # in checkpoint file order
    missing: list[Binding]  # new heads: initialised as transformers does (their ``source`` is empty)
    keys: KeyMap


def _grouped_params(model: nn.Module) -> dict[int, tuple[list[tuple[nn.Module, str]], list[str]]]:
    groups: dict[int, tuple[list[tuple[nn.Module, str]], list[str]]] = defaultdict(lambda: ([], []))
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                owners, names = groups[id(param)]
                owners.append((module, attr))
                names.append(f"{module_name}.{attr}" if module_name else attr)
    return groups


def _binding(owners: list[tuple[nn.Module, str]], names: list[str], keys: KeyMap, is_buffer: bool) -> Binding:
    """The binding for a tensor known by ``names`` (tied: several); no source if the checkpoint lacks it."""
    tensor = getattr(owners[0][0], owners[0][1])
    shape, dtype = tuple(tensor.shape), tensor.dtype if is_buffer else None
    for name in names:
        if name in keys.plain:
            return Binding(owners, name, shape, is_buffer, keys.plain[name], dtype=dtype)
        if name in keys.fused:
            conversion = keys.fused[name]
            return Binding(owners, name, shape, is_buffer, conversion.names[0], conversion, dtype)
    return Binding(owners, names[0], shape, is_buffer, "", dtype=dtype)


def _buffer_bindings(model: nn.Module, keys: KeyMap) -> list[Binding]:
    """Buffers the model takes from the checkpoint: those still on meta, and every persistent one
    the checkpoint holds. A persistent buffer's ``__init__`` value (BatchNorm's running statistics,
    BART's ``final_logits_bias``, a MoE router's correction bias) is a placeholder the file's value
    replaces, as in ``from_pretrained``; it goes to meta until that value lands. Buffers outside
    the state dict (rotary tables) and persistent ones the checkpoint lacks keep their own."""
    found = []
    for module_name, module in model.named_modules():
        for attr, buffer in module._buffers.items():
            full = f"{module_name}.{attr}" if module_name else attr
            if buffer is None:
                continue
            stored = attr not in module._non_persistent_buffers_set and (
                full in keys.plain or full in keys.fused
            )
            if buffer.device.type == "meta" or stored:
                found.append(_binding([(module, attr)], [full], keys, True))
                module._buffers[attr] = buffer.to("meta")
    return found


def bindings(model: nn.Module, reader: TensorReader, keys: KeyMap) -> Bound:
    """Every parameter and buffer ``model`` takes from the checkpoint, in checkpoint file order,
    named onto the checkpoint by ``keys``.

    A tensor of the model's body the checkpoint lacks is a :class:`CheckpointError` now, before
    anything is read; parameters of a new head (outside the base model) are ``missing``.
    """
    tensors = reader.checkpoint.tensors
    found: list[Binding] = []
    for owners, names in _grouped_params(model).values():
        found.append(_binding(owners, names, keys, False))
    found += _buffer_bindings(model, keys)
    missing = [b for b in found if not b.source]
    loaded = {id(module) for b in found if b.source for module, _ in b.owners}
    for binding in missing:
        absent = all(id(module) not in loaded for module, _ in binding.owners)
        if binding.is_buffer or not _is_new(model, binding.name, absent):
            what = "buffer missing from the checkpoint" if binding.is_buffer else _LACKS
            raise CheckpointError(reader.checkpoint.path, what, binding.name)
    present = sorted(
        (b for b in found if b.source), key=lambda b: (str(tensors[b.source].file), tensors[b.source].offset)
    )
    return Bound(present, missing, keys)


def _is_new(model: nn.Module, name: str, module_absent: bool) -> bool:
    """Whether the checkpoint may lack parameter ``name``, as transformers would initialise it: one
    the model's class says may be missing (``_keys_to_ignore_on_load_missing``), or one of a module
    the checkpoint has nothing of (a new task head, a pooler) outside the body: neither in a
    numbered block nor inside a distinct base model. A module with some of its tensors present,
    or a block, is a damaged checkpoint. Only transformers' models can initialise one."""
    if not callable(getattr(model, "initialize_weights", None)):
        return False
    patterns = getattr(model, "_keys_to_ignore_on_load_missing", None) or ()
    if any(re.search(p, name) for p in patterns):
        return True
    base = str(getattr(model, "base_model_prefix", "") or "")
    body = getattr(model, base, None) if base else None
    in_body = body is not None and body is not model and in_module(name, base)
    in_block = any(part.isdigit() for part in name.split("."))
    return module_absent and not in_body and not in_block


def unused_tensors(
    model: nn.Module, checkpoint: Checkpoint, keys: KeyMap, also_used: Iterable[str] = ()
) -> tuple[str, ...]:
    """Checkpoint tensors ``model`` has no place for, less those its class says to ignore
    (transformers' ``_keys_to_ignore_on_load_unexpected``), with a warning naming them.

    One inside the decoder layers is a :class:`CheckpointError`: config.json and the checkpoint
    describe different models, and loading what the config asks for would drop weights silently.
    """
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    known = keys.known | set(also_used)
    unused = sorted(n for n in checkpoint.tensors if n not in known and not any(p.search(n) for p in ignored))
    for name in unused:
        info = checkpoint.tensors[name]
        if info.layer is not None:
            raise CheckpointError(info.file, _NO_PLACE, name)
    if unused:
        shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
        warnings.warn(f"{checkpoint.name}: the model has no place for {shown}; not loaded", stacklevel=4)
    return tuple(unused)


def set_tensor(binding: Binding, tensor: torch.Tensor, *, trainable: bool = False) -> None:
    """Put ``tensor`` in every place ``binding`` names (a parameter, unless it is a buffer);
    a floating parameter requires grad if ``trainable``, as ``from_pretrained`` leaves it."""
    from torch import nn

    if not binding.is_buffer and not isinstance(tensor, nn.Parameter):
        tensor = nn.Parameter(tensor, requires_grad=trainable and tensor.is_floating_point())
    for module, attr in binding.owners:
        if binding.is_buffer:
            module._buffers[attr] = tensor
        else:
            module._parameters[attr] = tensor  # type: ignore[assignment]  # a Parameter, made above


class Materializer:
    """Reads each binding's tensor from its origin, checks it, casts it to ``dtype`` and places it
    (quantising bitsandbytes layers' weights on the way)."""

    def __init__(
        self, reader: TensorReader, placement: Placement, dtype: torch.dtype, *, trainable: bool = True,
        quant_cache: QuantCache | None = None,
    ) -> None:  # fmt: skip
        self.reader = reader
        self.placement = placement
        self.dtype = dtype
        self.trainable = trainable  # parameters placed for good require grad, as transformers leaves them
        self.quant_cache = quant_cache  # quantized states of an earlier load, and where to keep them

    def host_tensor(self, binding: Binding) -> torch.Tensor:
        """The binding's data on the host, checked against the model's shape, in the compute dtype
        (a converted tensor: its sources read, cast and put through transformers' converter)."""
        info = self.reader.info(binding.source)
        if binding.conversion is None:
            tensor = self._read(info.name, binding.dtype)
        else:
            tensor = binding.conversion.take(binding.name, self._read)
        if tuple(tensor.shape) != binding.shape:
            found, expected = list(tensor.shape), list(binding.shape)
            raise CheckpointError(
                info.file, f"shape {found} in the file, the model expects {expected}", info.name
            )
        return tensor

    def _read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` in ``dtype``, or (None) in the load's dtype if it is floating."""
        tensor = self.reader.read(name)
        if dtype is None and tensor.is_floating_point():
            dtype = self.dtype
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

    def load(self, binding: Binding, device: Device) -> None:
        """Place ``binding``'s tensor on ``device``, from where its origin says."""
        if binding.origin is Origin.STORED:
            self._load_stored(binding, device)
        elif binding.origin is Origin.CACHED:
            self._load_cached(binding, device)
        elif binding.origin is Origin.QUANTIZE:
            self._load_quantizing(binding, device)
        else:
            host = self.host_tensor(binding)
            set_tensor(binding, self.placement.put(host, device, binding.name), trainable=self.trainable)

    def _load_stored(self, binding: Binding, device: Device) -> None:
        stored = self._stored_quantized(binding.source)
        try:
            param = self._from_states(binding.owners[0][0], stored, device, binding)
        except DamagedState as damaged:
            layer = binding.source.removesuffix(".weight")
            name = f"{layer}.{damaged.name}"
            file = self.reader.info(name if name in self.reader.checkpoint.tensors else binding.source).file
            raise CheckpointError(file, damaged.reason, name) from damaged
        set_tensor(binding, param, trainable=self.trainable)

    def _load_cached(self, binding: Binding, device: Device) -> None:
        assert self.quant_cache is not None  # only a load with a cache gives this origin
        cached = self.quant_cache.get(binding.source)
        if cached is not None:
            try:
                param = self._from_states(binding.owners[0][0], cached, device, binding)
            except (KeyError, ValueError):  # a state file lost (removed as torn at start): quantize again
                pass
            else:
                set_tensor(binding, param, trainable=self.trainable)
                return
        self._load_quantizing(binding, device)

    def _load_quantizing(self, binding: Binding, device: Device) -> None:
        module = binding.owners[0][0]
        host = self.host_tensor(binding)
        size = quantized_size(module, self.reader.info(binding.source))
        param = self.placement.place(
            device, size, binding.name, lambda where: quantize_weight(module, host, where)
        )
        set_tensor(binding, param, trainable=self.trainable)
        if self.quant_cache is not None:
            self.quant_cache.put(binding.source, module)

    def _from_states(
        self, module: nn.Module, stored: dict[str, torch.Tensor], device: Device, binding: Binding
    ) -> nn.Parameter:
        size = sum(t.numel() * t.element_size() for t in stored.values())
        return self.placement.place(
            device, size, binding.name, lambda where: prequantized_weight(module, stored, where)
        )

    def _stored_quantized(self, weight: str) -> dict[str, torch.Tensor]:
        """A pre-quantized layer's weight and states as stored, keyed relative to the layer."""
        layer = weight.removesuffix(".weight")
        names = stored_names(weight, self.reader.checkpoint.tensors)
        return {name.removeprefix(f"{layer}."): self.reader.read(name) for name in names}

    def load_all(self, items: Iterable[Binding], device_for: Callable[[str], Device]) -> None:
        items = list(items)
        # The next tensors come off the disk (or the cache) while this one is cast, quantized or placed.
        tensors = self.reader.checkpoint.tensors
        self.reader.read_ahead(name for b in items for name in _reads(b, tensors))
        if self.quant_cache is not None:
            self.quant_cache.read_ahead([b.source for b in items if b.origin is Origin.CACHED])
        for binding in items:
            self.load(binding, device_for(binding.name))


def is_quantized_weight(binding: Binding) -> bool:
    """Whether ``binding`` is the weight of a bitsandbytes layer (quantized, stored or cached)."""
    module, attr = binding.owners[0]
    return attr == "weight" and is_quantized_layer(module)


def _reads(binding: Binding, tensors: Mapping[str, object]) -> list[str]:
    """The checkpoint tensors loading ``binding`` reads, in the order it reads them."""
    if binding.origin is Origin.CACHED:
        return []
    if binding.origin is Origin.STORED:
        return stored_names(binding.source, tensors)
    if binding.conversion is not None:
        return binding.conversion.names
    return [binding.source]


def stored_names(weight: str, tensors: Mapping[str, object]) -> list[str]:
    """A pre-quantized weight and the quantization states the checkpoint keeps beside it."""
    layer = weight.removesuffix(".weight")
    return [weight] + [layer + s for s in QUANT_STATE_SUFFIXES if layer + s in tensors]


def _computed(
    model: nn.Module, loaded: Iterable[Binding]
) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """Each real buffer of ``model`` that is not ``loaded`` from the checkpoint (rotary tables,
    causal masks): its module's name, the module, the attribute and the buffer."""
    from_checkpoint = {(id(module), attr) for b in loaded if b.is_buffer for module, attr in b.owners}
    for module_name, module in model.named_modules():
        for attr, buffer in list(module._buffers.items()):
            if (
                buffer is not None
                and buffer.device.type != "meta"
                and (id(module), attr) not in from_checkpoint
            ):
                yield module_name, module, attr, buffer


def move_real_buffers(
    model: nn.Module, placement: Placement, device_for: Callable[[str], Device], loaded: Iterable[Binding]
) -> None:
    """Computed buffers go where their module runs, charged like everything else, once each:
    buffers ``loaded`` from the checkpoint are placed already, and one tensor several modules
    share moves once and stays shared."""
    moved: dict[int, torch.Tensor] = {}
    for module_name, module, attr, buffer in _computed(model, loaded):
        if id(buffer) not in moved:
            full = f"{module_name}.{attr}" if module_name else attr
            moved[id(buffer)] = placement.put(buffer, device_for(full), full)
        module._buffers[attr] = moved[id(buffer)]


def computed_buffer_bytes(model: nn.Module, keys: KeyMap) -> dict[str, int]:
    """Bytes of the buffers a load of the skeleton ``model`` computes rather than reads, by module,
    each tensor once: what :func:`move_real_buffers` places (the stored ones go to meta here)."""
    found: dict[str, int] = {}
    seen: set[int] = set()
    for module_name, _, _, buffer in _computed(model, _buffer_bindings(model, keys)):
        if id(buffer) not in seen:
            seen.add(id(buffer))
            found[module_name] = found.get(module_name, 0) + buffer.numel() * buffer.element_size()
    return found
