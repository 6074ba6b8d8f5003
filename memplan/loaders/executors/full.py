"""Every weight on one device."""

from __future__ import annotations

from memplan.gpu import Device
from memplan.loaders._materialize import move_real_buffers
from memplan.loaders.executors.base import Build, DeviceFor, Executor, register_executor
from memplan.planner import Full


@register_executor
class FullExecutor(Executor[Full]):
    strategy_type = Full

    def place(self, build: Build) -> DeviceFor:
        return place_on_one_device(build, self.strategy.device)


def place_on_one_device(build: Build, device: Device) -> DeviceFor:
    """Every tensor of ``build``, read or computed, on ``device``."""
    build.materializer.load_all(build.bindings, lambda _: device)
    move_real_buffers(build.model, build.materializer.placement, lambda _: device, build.bindings)
    return lambda _: device
