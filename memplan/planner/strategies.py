"""The ways a model can be loaded, as configs: dataclasses dispatched by type, JSON by ``kind``."""

from __future__ import annotations

import functools
import itertools
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Union

from memplan.errors import InvalidSize
from memplan.gpu.device import Device

__all__ = [
    "READ_AHEAD_BYTES",
    "READ_REQUEST_BYTES",
    "Full",
    "Quantized",
    "Sharded",
    "Strategy",
    "Streamed",
    "describe",
]

# The most a load reads ahead of the tensor it is placing (the loaders' read-ahead window), and
# one read request: the least a window can be. The planner sizes each plan's window between them.
READ_AHEAD_BYTES = 256 << 20
READ_REQUEST_BYTES = 16 << 20


def _window() -> int:
    # A plan's window is a setting of the load, not of what the strategy is: equal strategies
    # with other windows compare equal.
    return field(default=READ_AHEAD_BYTES, compare=False)


class _Checked:
    """A strategy's read-ahead window is whole bytes from one request to the most a plan sizes:
    a hand-edited plan with another would stage what no estimate counted."""

    read_ahead: int

    def __post_init__(self) -> None:
        window = self.read_ahead
        if type(window) is not int or not READ_REQUEST_BYTES <= window <= READ_AHEAD_BYTES:
            raise InvalidSize(
                window, f"read_ahead must be from {READ_REQUEST_BYTES} to {READ_AHEAD_BYTES} bytes"
            )


@dataclass(frozen=True)
class Full(_Checked):
    """Every weight on one device, in ``dtype``."""

    device: Device
    dtype: str
    kind: Literal["full"] = "full"
    read_ahead: int = _window()  # bytes the load may read ahead of the tensor it places


@dataclass(frozen=True)
class Quantized(_Checked):
    """Linear layers as bitsandbytes int8 (LLM.int8) or nf4; embeddings, norms, lm_head in ``dtype``."""

    method: Literal["int8", "nf4"]
    device: Device
    dtype: str
    double_quant: bool = True
    prequantized: bool = False  # the checkpoint holds these bnb weights already: loaded as stored
    # transformers' llm_int8_skip_modules: None keeps its default skips (tied and output embeddings,
    # the last module); a tuple replaces them, exactly as BitsAndBytesConfig takes it
    skip_modules: tuple[str, ...] | None = None
    kind: Literal["quantized"] = "quantized"
    read_ahead: int = _window()  # bytes the load may read ahead of the tensor it places


@dataclass(frozen=True)
class Sharded(_Checked):
    """Whole modules over devices: ``device_map`` pairs a module prefix with its device.

    With ``cpu`` entries beside accelerators the model is offloaded: those layers' weights live
    in host memory and run on ``execution_device``.
    """

    device_map: tuple[tuple[str, Device], ...]
    dtype: str
    execution_device: Device
    kind: Literal["sharded"] = "sharded"
    read_ahead: int = _window()  # bytes the load may read ahead of the tensor it places

    @functools.cached_property  # a scan of the whole map, asked for per estimate and per description
    def runs(self) -> tuple[tuple[Device, tuple[str, ...]], ...]:
        """Consecutive modules on one device, in map order.

        Maps place long runs of layers on each device; walking runs instead of modules keeps
        100k-layer maps fast (grouping compares the shared Device objects by identity, in C).
        """
        return tuple(
            (device, tuple(module for module, _ in run))
            for device, run in itertools.groupby(self.device_map, key=operator.itemgetter(1))
        )

    @functools.cached_property
    def devices(self) -> tuple[Device, ...]:
        return tuple(sorted({device for device, _ in self.runs}))

    @property
    def offloaded(self) -> bool:
        return any(not d.is_accelerator for d in self.devices) and self.execution_device.is_accelerator

    def accelerate_device_map(self) -> dict[str, int | str]:
        """The same map in accelerate's spelling (``0``, ``"mps"``, ``"cpu"``)."""
        return {
            module: device.index if device.kind == "cuda" else str(device)
            for module, device in self.device_map
        }


@dataclass(frozen=True)
class Streamed(_Checked):
    """Layers live in ``source`` (host RAM or the safetensors files) and pass through
    ``compute_device``: ``resident_layers`` stay there, ``prefetch_depth`` more are in flight."""

    compute_device: Device
    source: Literal["host", "disk"]
    resident_layers: int
    prefetch_depth: int
    dtype: str
    kind: Literal["streamed"] = "streamed"
    read_ahead: int = _window()  # bytes the load may read ahead of the tensor it places


Strategy = Union[Full, Quantized, Sharded, Streamed]  # noqa: UP007  (the codec reads this union)


def describe(strategy: Strategy) -> str:
    """One line a person reads: ``int8 on cuda:0``, ``sharded over cuda:0, cuda:1``."""
    if isinstance(strategy, Full):
        return f"full on {strategy.device} ({strategy.dtype})"
    if isinstance(strategy, Quantized):
        dq = ", double quant" if strategy.method == "nf4" and strategy.double_quant else ""
        stored = "pre-quantized " if strategy.prequantized else ""
        return f"{stored}{strategy.method} on {strategy.device} (compute {strategy.dtype}{dq})"
    if isinstance(strategy, Sharded):
        counts: Counter[Device] = Counter()
        for device, modules in strategy.runs:
            counts[device] += len(modules)
        spread = ", ".join(f"{d} ({counts[d]} modules)" for d in strategy.devices)
        return f"{'offloaded' if strategy.offloaded else 'sharded'} over {spread}"
    return (
        f"streamed from {strategy.source} through {strategy.compute_device}: "
        f"{strategy.resident_layers} layers resident, prefetch depth {strategy.prefetch_depth}"
    )
