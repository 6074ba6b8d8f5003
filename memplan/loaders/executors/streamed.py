"""Layers kept in host memory or in the checkpoint's files, streamed through the compute device:
the first ``resident_layers`` stay there, ``prefetch_depth`` more are in flight."""

from __future__ import annotations

from typing import TYPE_CHECKING

from memplan.loaders._materialize import Binding, move_real_buffers
from memplan.loaders.executors.base import (
    Build,
    DeviceFor,
    Executor,
    accelerate_device,
    register_executor,
    submodule,
    with_rest,
)
from memplan.planner import Streamed

if TYPE_CHECKING:
    from torch import nn


@register_executor
class StreamedExecutor(Executor[Streamed]):
    strategy_type = Streamed

    def reads_everything(self) -> bool:
        return False

    def place(self, build: Build) -> DeviceFor:
        strategy, device = self.strategy, self.strategy.compute_device
        prefixes = self._prefixes(build)
        depth = min(strategy.prefetch_depth, max(1, len(prefixes) - 1))
        resident = self.stream(build, prefixes, device, depth=depth, source=strategy.source)
        build.materializer.load_all(resident, lambda _: device)
        move_real_buffers(build.model, build.materializer.placement, lambda _: device, build.bindings)
        return lambda _: device

    def device_map(self, build: Build, missing: list[Binding]) -> dict[str, int | str]:
        """Where each module's weights rest: streamed ones where they are kept between forwards."""
        kept = "disk" if self.strategy.source == "disk" else "cpu"
        found: dict[str, int | str] = dict.fromkeys(self._prefixes(build), kept)
        return with_rest(found, build.bindings + missing, accelerate_device(self.strategy.compute_device))

    def _prefixes(self, build: Build) -> list[str]:
        """The model's names for the modules the strategy streams: its layers, or where a layer is
        a container whose own forward never runs (Funnel's blocks are lists of layers), its parts."""
        found: list[str] = []
        for layer in build.materializer.reader.checkpoint.layers[self.strategy.resident_layers :]:
            name = build.rename(layer.prefix)
            found += _called_parts(submodule(build.model, name), name)
        return found


def _called_parts(module: nn.Module, name: str) -> list[str]:
    """``module`` if the model calls it (it has a forward of its own), else its children that are,
    in order. Hooks see only modules that are called."""
    from torch import nn

    if type(module).forward is not nn.Module.forward:
        return [name]
    return [part for child, sub in module.named_children() for part in _called_parts(sub, f"{name}.{child}")]
