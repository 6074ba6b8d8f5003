"""Whole modules over devices, by the plan's device map; offloaded modules (kept in host memory
beside accelerators) visit the execution device one at a time, the next one prefetched."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from memplan.gpu import Device
from memplan.loaders._materialize import Binding, move_real_buffers
from memplan.loaders.executors.base import (
    Build,
    DeviceFor,
    Executor,
    Rename,
    accelerate_device,
    register_executor,
    submodule,
    with_rest,
)
from memplan.planner import Sharded, in_module

if TYPE_CHECKING:
    from torch import nn


@register_executor
class ShardedExecutor(Executor[Sharded]):
    strategy_type = Sharded

    def place(self, build: Build) -> DeviceFor:
        strategy, placement = self.strategy, build.materializer.placement
        device_map = _model_device_map(build.model, strategy, build.rename)
        offloaded = _outermost([m for m, d in device_map if strategy.offloaded and not d.is_accelerator])
        execution = strategy.execution_device
        resident = self.stream(build, offloaded, execution, depth=1, source="host")
        # Offloaded modules run on the execution device; the map's first match decides.
        run_on = _prefix_lookup(tuple(dict.fromkeys(offloaded, execution).items()) + device_map, execution)
        build.materializer.load_all(resident, run_on)
        move_real_buffers(build.model, placement, run_on, build.bindings)
        for module_name, _ in device_map:
            device = placement.torch_device(run_on(module_name))
            module = submodule(build.model, module_name)
            hook = _move_inputs_to(device)
            build.hooks.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return run_on

    def device_map(self, build: Build, missing: list[Binding]) -> dict[str, int | str]:
        """Where each module's weights rest; offloaded modules rest on the host."""
        strategy = self.strategy
        found = {
            module: "cpu" if strategy.offloaded and not device.is_accelerator else accelerate_device(device)
            for module, device in _model_device_map(build.model, strategy, build.rename)
        }
        return with_rest(found, build.bindings + missing, accelerate_device(strategy.execution_device))


def _model_device_map(model: nn.Module, strategy: Sharded, rename: Rename) -> tuple[tuple[str, Device], ...]:
    """The plan's device map by the model's module names, less modules the model lacks: a
    checkpoint's head that a base model does not take (its tensors are unused, and warned about)."""
    found = []
    for module, device in strategy.device_map:
        name = rename(module)
        try:
            submodule(model, name)
        except AttributeError:
            continue
        found.append((name, device))
    return tuple(found)


def _outermost(modules: list[str]) -> list[str]:
    """``modules`` less those inside another of them: a streamed module brings its children in
    with it, and streamed modules must not nest (a VLM's map names ``embeddings`` and its children)."""
    return [m for m in modules if not any(m != other and in_module(m, other) for other in modules)]


def _prefix_lookup(device_map: tuple[tuple[str, Device], ...], default: Device) -> DeviceFor:
    def device_for(name: str) -> Device:
        for module, device in device_map:
            if in_module(name, module):
                return device
        return default

    return device_for


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
