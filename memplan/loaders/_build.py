"""Carry out one strategy: fill a meta skeleton so every tensor lands where the plan put it.

The flow is the same for every strategy; what differs is the strategy's executor
(:mod:`memplan.loaders.executors`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memplan.loaders._conversion import key_map, prefix_map
from memplan.loaders._heads import initialize_new
from memplan.loaders._hooks import Hooks
from memplan.loaders._materialize import Binding, Materializer, bindings, unused_tensors
from memplan.loaders._placement import Placement
from memplan.loaders._reader import TensorReader, torch_dtype
from memplan.loaders._skeleton import ModelFactory, build_skeleton
from memplan.loaders.executors import Build, Rename, executor_for
from memplan.planner import Strategy, in_module

if TYPE_CHECKING:
    from torch import nn

__all__ = ["LoadOptions", "Loaded", "carry_out"]


@dataclass
class Loaded:
    model: nn.Module
    unused_tensors: tuple[str, ...]  # checkpoint tensors the model has no place for
    newly_initialized: tuple[str, ...]  # parameters the checkpoint lacks, initialised as transformers does
    notes: tuple[str, ...] = ()  # for the report: what was really quantized


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
    checkpoint = reader.checkpoint
    dtype = torch_dtype(strategy.dtype, file=checkpoint.path)
    executor = executor_for(strategy)
    cache = executor.begin(reader, quant_cache=options.quant_cache)
    materializer = Materializer(reader, placement, dtype, trainable=options.trainable, quant_cache=cache)
    model: nn.Module | None = None
    try:
        model = build_skeleton(checkpoint, model_cls, dtype)
        if executor.reads_everything():  # the disk need not wait for the names to be mapped
            reader.start_reading(model.state_dict(keep_vars=True))
        keys = key_map(model, checkpoint.tensors)
        executor.prepare(model, reader, keys, dtype)
        bound = bindings(model, reader, keys)
        executor.assign_origins(bound.bindings, reader)
        unused = unused_tensors(model, checkpoint, keys, also_used=executor.also_used(reader))
        build = Build(model, materializer, bound.bindings, hooks, _renamer(bound.bindings))
        device_for = executor.place(build)
        fresh = initialize_new(model, bound.missing, materializer, device_for)
        device_map = executor.device_map(build, bound.missing)
        if device_map is not None:
            # accelerate's attribute, as from_pretrained sets it; nn.Module's types know only tensors
            model.hf_device_map = device_map  # type: ignore[assignment]
    except BaseException:
        if model is not None:
            _strip(model)
        executor.end(completed=False)
        raise
    executor.end(completed=True)
    return Loaded(model, unused, fresh, executor.notes(model))


def _strip(model: nn.Module) -> None:
    """Drop every tensor of a half-built model, so a traceback that keeps it alive keeps no memory."""
    for module in model.modules():
        module._parameters.clear()
        module._buffers.clear()
