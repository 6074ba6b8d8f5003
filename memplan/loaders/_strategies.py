"""Carry out one strategy: fill a meta skeleton so every tensor lands where the plan put it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memplan.gpu.device import Device
from memplan.loaders._bnb_cpu import prepare_4bit_layers_for_cpu
from memplan.loaders._conversion import KeyMap, key_map, prefix_map
from memplan.loaders._heads import initialize_new
from memplan.loaders._hooks import Hooks
from memplan.loaders._materialize import (
    Binding,
    Bound,
    Materializer,
    bindings,
    move_real_buffers,
    unused_tensors,
)
from memplan.loaders._placement import Placement
from memplan.loaders._prequantized import stored_layers
from memplan.loaders._qcache import open_quant_cache
from memplan.loaders._quantize import record_quantization, replace_linears, summary, transformers_choice
from memplan.loaders._reader import TensorReader, torch_dtype
from memplan.loaders._skeleton import ModelFactory, build_skeleton
from memplan.loaders._streaming import ModuleStreamer
from memplan.planner import (
    Checkpoint,
    Full,
    Quantized,
    Sharded,
    Strategy,
    Streamed,
    in_module,
    is_quant_state,
    is_quantizable,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["LoadOptions", "Loaded", "carry_out"]


Rename = Callable[[str], str]  # a module's name in the checkpoint -> its name in the model
DeviceFor = Callable[[str], Device]  # a model tensor's name -> the device it rests on


@dataclass
class Loaded:
    model: nn.Module
    unused_tensors: tuple[str, ...]  # checkpoint tensors the model has no place for
    newly_initialized: tuple[str, ...]  # parameters the checkpoint lacks, initialised as transformers does
    notes: tuple[str, ...] = ()  # for the report: what was really quantized


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        base = str(getattr(model, "base_model_prefix", "") or "")
        return model.get_submodule(name.removeprefix(f"{base}."))


def _move_inputs_to(device: str) -> Callable[..., Any]:
    """A forward pre-hook that brings tensor arguments to the module's device (layer boundaries)."""
    import torch

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, tuple | list):
            return type(value)(move(v) for v in value)
        if isinstance(value, dict):  # a ModelOutput keeps its class: callers index it by position
            moved = {k: move(v) for k, v in value.items()}
            return type(value)(**moved) if type(value) is not dict else moved
        return value

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        return move(args), move(kwargs)

    return hook


def _prefix_lookup(device_map: tuple[tuple[str, Device], ...], default: Device) -> Callable[[str], Device]:
    def device_for(name: str) -> Device:
        for module, device in device_map:
            if in_module(name, module):
                return device
        return default

    return device_for


def _split(everything: list[Binding], prefixes: list[str]) -> tuple[list[Binding], list[Binding]]:
    """The bindings under ``prefixes`` (streamed), and the rest (resident).

    A weight several modules share (tied embeddings and head, BART's ``shared``) stays resident:
    a streamed module brings its weights in for its own forward only, and the other owners would
    run on the placeholder (wrong output, or a crash)."""
    streamed = [
        b for b in everything
        if any(in_module(b.name, p) for p in prefixes) and len({id(m) for m, _ in b.owners}) == 1
    ]  # fmt: skip
    taken = {id(b) for b in streamed}
    return streamed, [b for b in everything if id(b) not in taken]


def _streamer(
    model: nn.Module, prefixes: list[str], streamed: list[Binding], materializer: Materializer,
    device: Device, *, depth: int, source: str,
) -> ModuleStreamer:  # fmt: skip
    modules = [(_submodule(model, p), [b for b in streamed if in_module(b.name, p)]) for p in prefixes]
    return ModuleStreamer(modules, materializer, materializer.placement, device, depth=depth, source=source)


def _one_device(
    model: nn.Module, strategy: Full | Quantized, materializer: Materializer, everything: list[Binding]
) -> DeviceFor:
    materializer.load_all(everything, lambda _: strategy.device)
    move_real_buffers(model, materializer.placement, lambda _: strategy.device, everything)
    return lambda _: strategy.device


def _model_device_map(model: nn.Module, strategy: Sharded, rename: Rename) -> tuple[tuple[str, Device], ...]:
    """The plan's device map by the model's module names, less modules the model lacks: a
    checkpoint's head that a base model does not take (its tensors are unused, and warned about)."""
    found = []
    for module, device in strategy.device_map:
        name = rename(module)
        try:
            _submodule(model, name)
        except AttributeError:
            continue
        found.append((name, device))
    return tuple(found)


def _sharded(
    model: nn.Module, strategy: Sharded, materializer: Materializer, everything: list[Binding], hooks: Hooks,
    rename: Rename,
) -> DeviceFor:  # fmt: skip
    placement = materializer.placement
    device_map = _model_device_map(model, strategy, rename)
    run_on = _prefix_lookup(device_map, strategy.execution_device)
    offloaded = _outermost([m for m, d in device_map if strategy.offloaded and not d.is_accelerator])
    streamed, resident = _split(everything, offloaded)
    if offloaded:  # they visit the execution device one at a time, the next one prefetched
        hooks.add_streamer(
            model,
            _streamer(
                model, offloaded, streamed, materializer, strategy.execution_device, depth=1, source="host"
            ),
        )
        moved = dict.fromkeys(offloaded, strategy.execution_device)
        run_on = _prefix_lookup(tuple(moved.items()) + device_map, strategy.execution_device)
    materializer.load_all(resident, run_on)
    move_real_buffers(model, placement, run_on, everything)
    for module_name, _ in device_map:
        device = placement.torch_device(run_on(module_name))
        module = _submodule(model, module_name)
        hooks.handles.append(module.register_forward_pre_hook(_move_inputs_to(device), with_kwargs=True))
    return run_on


def _outermost(modules: list[str]) -> list[str]:
    """``modules`` less those inside another of them: a streamed module brings its children in
    with it, and streamed modules must not nest (a VLM's map names ``embeddings`` and its children)."""
    return [m for m in modules if not any(m != other and in_module(m, other) for other in modules)]


def _streamed_prefixes(
    model: nn.Module, strategy: Streamed, checkpoint: Checkpoint, rename: Rename
) -> list[str]:
    """The model's names for the modules the strategy streams: its layers, or where a layer is a
    container whose own forward never runs (Funnel's blocks are lists of layers), its parts."""
    found: list[str] = []
    for layer in checkpoint.layers[strategy.resident_layers :]:
        name = rename(layer.prefix)
        found += _called_parts(_submodule(model, name), name)
    return found


def _called_parts(module: nn.Module, name: str) -> list[str]:
    """``module`` if the model calls it (it has a forward of its own), else its children that are,
    in order. Hooks see only modules that are called."""
    from torch import nn

    if type(module).forward is not nn.Module.forward:
        return [name]
    return [part for child, sub in module.named_children() for part in _called_parts(sub, f"{name}.{child}")]


def _streamed(
    model: nn.Module, strategy: Streamed, materializer: Materializer, everything: list[Binding], hooks: Hooks,
    rename: Rename,
) -> DeviceFor:  # fmt: skip
    prefixes = _streamed_prefixes(model, strategy, materializer.reader.checkpoint, rename)
    streamed, resident = _split(everything, prefixes)
    if prefixes:
        depth = min(strategy.prefetch_depth, max(1, len(prefixes) - 1))
        hooks.add_streamer(
            model,
            _streamer(
                model,
                prefixes,
                streamed,
                materializer,
                strategy.compute_device,
                depth=depth,
                source=strategy.source,
            ),
        )
    materializer.load_all(resident, lambda _: strategy.compute_device)
    move_real_buffers(model, materializer.placement, lambda _: strategy.compute_device, everything)
    return lambda _: strategy.compute_device


def _bindings(model: nn.Module, strategy: Strategy, reader: TensorReader, dtype: torch.dtype) -> Bound:
    """Every tensor the model takes from the checkpoint, bnb layers swapped in first if quantized."""
    import torch

    keys = key_map(model, reader.checkpoint.tensors)
    if isinstance(strategy, Quantized):
        stored = reader.checkpoint.architecture.quantization
        if strategy.prequantized and stored is not None:
            layers = _model_modules(keys, stored_layers(reader.checkpoint, stored.method))
            # The 4-bit layers compute in the dtype the checkpoint was saved to compute in.
            compute = getattr(torch, stored.compute_dtype or "", None)
            compute = compute if isinstance(compute, torch.dtype) else dtype
            replace_linears(model, layers, strategy, compute, stored.threshold)
        else:
            replace_linears(model, _to_quantize(model, strategy, reader.checkpoint, keys), strategy, dtype)
        model.eval()  # the new layers were built in training mode, which changes bnb's int8 path
    return bindings(model, reader, keys)


def _to_quantize(model: nn.Module, strategy: Quantized, checkpoint: Checkpoint, keys: KeyMap) -> set[str]:
    """The modules transformers+bnb would convert; for a model of no transformers class, the
    planner's (the blocks' Linears, by the checkpoint's names)."""
    chosen = transformers_choice(model, strategy.skip_modules)
    if chosen is not None:
        return chosen
    skip = strategy.skip_modules
    return _model_modules(keys, {t.module for t in checkpoint.tensors.values() if is_quantizable(t, skip)})


def _model_modules(keys: KeyMap, layers: set[str]) -> set[str]:
    """The model's names for layers the checkpoint names (the planner's names), by their weights."""
    found = (keys.model_name(f"{layer}.weight") for layer in layers)
    return {name.removesuffix(".weight") for name in found if name is not None}


def _renamer(everything: list[Binding]) -> Rename:
    """Checkpoint module names (the planner's) -> the model's, as the checkpoint's names were converted.

    A module is the one that holds, in the model, every tensor the checkpoint stores under its
    name, and nothing stored under another name (Pixio stores ``encoder.layer.0.norm1`` for the
    model's ``layers.0.layernorm_before``: no name ends alike). Where no module holds exactly
    those, names that end alike decide."""
    by_suffix = prefix_map((b.source, b.name) for b in everything if b.conversion is None)
    pairs = [(b.source, b.name) for b in everything]

    def holds_only(candidate: str, module: str) -> bool:
        return not any(in_module(n, candidate) and not in_module(s, module) for s, n in pairs)

    @functools.cache  # asked again for each layer by the device map and hf_device_map
    def rename(module: str) -> str:
        holder = _common_module([name for source, name in pairs if in_module(source, module)])
        if not holder or not holds_only(holder, module):
            return by_suffix.get(module, module)
        # The outermost module that still holds nothing else: a layer whose weights all sit in one
        # child (T5's ``block.0.layer``, a block of one Linear) is the layer, not the child.
        while "." in holder and holds_only(holder.rsplit(".", 1)[0], module):
            holder = holder.rsplit(".", 1)[0]
        return holder

    return rename


def _common_module(names: list[str]) -> str:
    """The innermost module that holds every tensor of ``names``; "" for none or the root."""
    if not names:
        return ""
    paths = [name.split(".")[:-1] for name in names]
    common = 0
    while all(len(p) > common and p[common] == paths[0][common] for p in paths):
        common += 1
    return ".".join(paths[0][:common])


@dataclass(frozen=True)
class LoadOptions:
    """How a load treats what it builds: ``trainable`` parameters (as from_pretrained), and the
    quantized-weights cache (:mod:`memplan.loaders._qcache`)."""

    trainable: bool = True
    quant_cache: bool = True


def carry_out(
    strategy: Strategy,
    reader: TensorReader,
    placement: Placement,
    model_cls: ModelFactory | None,
    hooks: Hooks,
    options: LoadOptions,
) -> Loaded:
    """Build the model for ``strategy`` from ``reader``'s checkpoint, registering its hooks in
    ``hooks``; on failure strip what was built (the caller removes the hooks). A quantized load
    reuses, or else keeps, the quantized weights (``options.quant_cache``)."""
    checkpoint: Checkpoint = reader.checkpoint
    dtype = torch_dtype(strategy.dtype, file=checkpoint.path)
    cache = None
    if isinstance(strategy, Quantized):
        window, enabled = reader.window, options.quant_cache
        cache = open_quant_cache(checkpoint, strategy, strategy.dtype, window=window, enabled=enabled)
    prequantized = isinstance(strategy, Quantized) and strategy.prequantized
    materializer = Materializer(
        reader, placement, dtype, prequantized=prequantized, trainable=options.trainable, quant_cache=cache
    )
    model: nn.Module | None = None
    try:
        model = build_skeleton(checkpoint, model_cls, dtype)
        if not isinstance(strategy, Streamed) and not (cache is not None and cache.complete):
            # Every tensor will be read: the disk need not wait for the names to be mapped.
            reader.start_reading(model.state_dict(keep_vars=True))
        bound = _bindings(model, strategy, reader, dtype)
        states = [n for n in checkpoint.tensors if is_quant_state(n)] if prequantized else []
        unused = unused_tensors(model, checkpoint, bound.keys, also_used=states)
        rename = _renamer(bound.bindings)
        device_for = _place(model, strategy, materializer, bound.bindings, hooks, rename)
        fresh = initialize_new(model, bound.missing, materializer, device_for)
        if isinstance(strategy, Sharded | Streamed):
            model.hf_device_map = _hf_device_map(
                model, strategy, checkpoint, bound.bindings + bound.missing, rename
            )  # type: ignore[assignment]
    except BaseException:
        if model is not None:
            _strip(model)
        if cache is not None:
            cache.close()  # unfinished: never marked complete, so never trusted
        raise
    if cache is not None:
        try:
            cache.finish()
        finally:
            cache.close()
    notes: tuple[str, ...] = ()
    if isinstance(strategy, Quantized):
        # Not the load's removable hooks: they are what keeps these layers' saves exact.
        kept = prepare_4bit_layers_for_cpu(model)
        notes = (summary(model, strategy.method), *kept)
    return Loaded(model, unused, fresh, notes)


def _place(
    model: nn.Module, strategy: Strategy, materializer: Materializer, everything: list[Binding], hooks: Hooks,
    rename: Rename,
) -> DeviceFor:  # fmt: skip
    """Carry ``strategy`` out on ``everything``; where tensors outside the checkpoint go."""
    if isinstance(strategy, Sharded):
        return _sharded(model, strategy, materializer, everything, hooks, rename)
    if isinstance(strategy, Streamed):
        return _streamed(model, strategy, materializer, everything, hooks, rename)
    device_for = _one_device(model, strategy, materializer, everything)
    if isinstance(strategy, Quantized):
        record_quantization(model, strategy, materializer.dtype)
    return device_for


def _hf_device_map(
    model: nn.Module, strategy: Sharded | Streamed, checkpoint: Checkpoint, everything: list[Binding],
    rename: Rename,
) -> dict[str, int | str]:  # fmt: skip
    """Where each module's weights rest, in accelerate's format (``model.hf_device_map``): a CUDA
    index, ``"cpu"``, ``"mps"``, or ``"disk"``; modules streamed or offloaded rest where they are kept."""
    if isinstance(strategy, Sharded):
        found = {
            module: "cpu" if strategy.offloaded and not device.is_accelerator else _accelerate(device)
            for module, device in _model_device_map(model, strategy, rename)
        }
        rest = _accelerate(strategy.execution_device)
    else:
        kept = "disk" if strategy.source == "disk" else "cpu"
        found = dict.fromkeys(_streamed_prefixes(model, strategy, checkpoint, rename), kept)
        rest = _accelerate(strategy.compute_device)
    for binding in everything:
        parts = binding.name.split(".")
        if not any(".".join(parts[:i]) in found for i in range(1, len(parts))):
            found[".".join(parts[:-1])] = rest
    return found


def _accelerate(device: Device) -> int | str:
    return device.index if device.kind == "cuda" else device.kind


def _strip(model: nn.Module) -> None:
    """Drop every tensor of a half-built model, so a traceback that keeps it alive keeps no memory."""
    for module in model.modules():
        module._parameters.clear()
        module._buffers.clear()
