"""The ways a model can be loaded, as configs: dataclasses dispatched by type, JSON by ``kind``.

Each strategy says what a person reads of it (:meth:`describe`), the name its learned corrections
are kept under (``correction_key``) and where a module runs (:meth:`runs_on`); how it lays bytes
out per device is its layout (:mod:`memplan.planner.layouts`), registered by its type.
"""

from __future__ import annotations

import abc
import functools
import itertools
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, Union

from memplan.errors import InvalidSize
from memplan.gpu.device import Device
from memplan.planner.model import in_module

__all__ = [
    "READ_AHEAD_BYTES",
    "READ_REQUEST_BYTES",
    "Full",
    "Quantized",
    "Sharded",
    "Strategy",
    "Streamed",
    "describe",
    "strategy_key",
]

# The most a load reads ahead of the tensor it is placing (the loaders' read-ahead window), and
# one read request: the least a window can be. The planner sizes each plan's window between them.
READ_AHEAD_BYTES = 256 << 20
READ_REQUEST_BYTES = 16 << 20


def _window() -> int:
    # A plan's window is a setting of the load, not of what the strategy is: equal strategies
    # with other windows compare equal.
    return field(default=READ_AHEAD_BYTES, compare=False)


class _Base(abc.ABC):
    """What every strategy answers. Its read-ahead window is whole bytes from one request to the
    most a plan sizes: a hand-edited plan with another would stage what no estimate counted."""

    kind: str
    read_ahead: int

    def __post_init__(self) -> None:
        window = self.read_ahead
        if type(window) is not int or not READ_REQUEST_BYTES <= window <= READ_AHEAD_BYTES:
            raise InvalidSize(
                window, f"read_ahead must be from {READ_REQUEST_BYTES} to {READ_AHEAD_BYTES} bytes"
            )

    @abc.abstractmethod
    def describe(self) -> str:
        """One line a person reads: ``int8 on cuda:0``, ``sharded over cuda:0, cuda:1``."""

    @property
    def correction_key(self) -> str:
        """The name corrections are recorded under: ``full``, ``int8``, ``nf4``, ``sharded``, ``streamed``."""
        return self.kind

    @abc.abstractmethod
    def runs_on(self, module: str) -> Device:
        """The device ``module`` runs on (offloaded modules run on the execution device)."""


@dataclass(frozen=True)
class Full(_Base):
    """Every weight on one device, in ``dtype``."""

    device: Device
    dtype: str
    kind: Literal["full"] = "full"
    read_ahead: int = _window()  # bytes the load may read ahead of the tensor it places

    def describe(self) -> str:
        return f"full on {self.device} ({self.dtype})"

    def runs_on(self, module: str) -> Device:
        return self.device


@dataclass(frozen=True)
class Quantized(_Base):
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

    def describe(self) -> str:
        dq = ", double quant" if self.method == "nf4" and self.double_quant else ""
        stored = "pre-quantized " if self.prequantized else ""
        return f"{stored}{self.method} on {self.device} (compute {self.dtype}{dq})"

    @property
    def correction_key(self) -> str:
        return self.method

    def runs_on(self, module: str) -> Device:
        return self.device


@dataclass(frozen=True)
class Sharded(_Base):
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

    def describe(self) -> str:
        counts: Counter[Device] = Counter()
        for device, modules in self.runs:
            counts[device] += len(modules)
        spread = ", ".join(f"{d} ({counts[d]} modules)" for d in self.devices)
        return f"{'offloaded' if self.offloaded else 'sharded'} over {spread}"

    def runs_on(self, module: str) -> Device:
        for placed, device in self.device_map:
            if in_module(module, placed):
                return device if device.is_accelerator or not self.offloaded else self.execution_device
        return self.execution_device

    def accelerate_device_map(self) -> dict[str, int | str]:
        """The same map in accelerate's spelling (``0``, ``"mps"``, ``"cpu"``)."""
        return {
            module: device.index if device.kind == "cuda" else str(device)
            for module, device in self.device_map
        }


@dataclass(frozen=True)
class Streamed(_Base):
    """Layers live in ``source`` (host RAM or the safetensors files) and pass through
    ``compute_device``: ``resident_layers`` stay there, ``prefetch_depth`` more are in flight."""

    compute_device: Device
    source: Literal["host", "disk"]
    resident_layers: int
    prefetch_depth: int
    dtype: str
    kind: Literal["streamed"] = "streamed"
    read_ahead: int = _window()  # bytes the load may read ahead of the tensor it places

    def describe(self) -> str:
        return (
            f"streamed from {self.source} through {self.compute_device}: "
            f"{self.resident_layers} layers resident, prefetch depth {self.prefetch_depth}"
        )

    def runs_on(self, module: str) -> Device:
        return self.compute_device


Strategy = Union[Full, Quantized, Sharded, Streamed]  # noqa: UP007  (the codec reads this union)


def describe(strategy: Strategy) -> str:
    """One line a person reads: ``int8 on cuda:0``, ``sharded over cuda:0, cuda:1``."""
    return strategy.describe()


def strategy_key(strategy: Strategy) -> str:
    """The name corrections are recorded under: ``full``, ``int8``, ``nf4``, ``sharded``, ``streamed``."""
    return strategy.correction_key
