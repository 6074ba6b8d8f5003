"""What every strategy's executor shares: the registry by strategy type, and the pieces of a build.

An executor carries out one :class:`~memplan.planner.Strategy` on a meta skeleton: it may swap
layers in before the model's tensors are bound (:meth:`Executor.prepare`), it decides where each
weight comes from (:meth:`Executor.assign_origins`), it places them and installs its hooks
(:meth:`Executor.place`), and it describes the result in accelerate's ``hf_device_map``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from memplan.errors import PlanFormatError
from memplan.gpu import Device
from memplan.loaders._materialize import Binding, Materializer
from memplan.loaders._streaming import ModuleStreamer
from memplan.planner import in_module

if TYPE_CHECKING:
    import torch
    from torch import nn

    from memplan.loaders._conversion import KeyMap
    from memplan.loaders._hooks import Hooks
    from memplan.loaders._qcache import QuantCache
    from memplan.loaders._reader import TensorReader
    from memplan.planner import Strategy

__all__ = ["Build", "DeviceFor", "Executor", "Rename", "executor_for", "register_executor", "submodule"]

Rename = Callable[[str], str]  # a module's name in the checkpoint -> its name in the model
DeviceFor = Callable[[str], Device]  # a model tensor's name -> the device it rests on
S = TypeVar("S")


@dataclass
class Build:
    """A model being filled: its skeleton, the tensors it takes from the checkpoint (in file
    order), how they are read and placed, and the hooks the load keeps for it."""

    model: nn.Module
    materializer: Materializer
    bindings: list[Binding]
    hooks: Hooks
    rename: Rename


class Executor(ABC, Generic[S]):
    """Carries out one strategy for one load. Subclasses register with :func:`register_executor`."""

    strategy_type: ClassVar[type]

    def __init__(self, strategy: S) -> None:
        self.strategy = strategy

    def begin(self, reader: TensorReader, *, quant_cache: bool) -> QuantCache | None:
        """Open what the load keeps beside the model; the quantized-weights cache, if any."""
        return None

    def end(self, *, completed: bool) -> None:
        """Close what :meth:`begin` opened; ``completed`` loads keep it, others throw it away."""

    def reads_everything(self) -> bool:
        """Whether every checkpoint tensor the model takes is read now (so reading may start
        before the names are mapped); a streamed layer is read when it runs instead."""
        return True

    def prepare(self, model: nn.Module, reader: TensorReader, keys: KeyMap, dtype: torch.dtype) -> None:
        """Change the skeleton before its tensors are bound (swap in quantized layers)."""

    def assign_origins(self, bindings: list[Binding], reader: TensorReader) -> None:
        """Decide, once, where each weight comes from (the checkpoint unless said otherwise)."""

    def also_used(self, reader: TensorReader) -> tuple[str, ...]:
        """Checkpoint tensors the load reads beside the model's own (stored quantization states)."""
        return ()

    @abstractmethod
    def place(self, build: Build) -> DeviceFor:
        """Load and place ``build``'s tensors, installing the strategy's hooks; where tensors the
        checkpoint lacks go."""

    def device_map(self, build: Build, missing: list[Binding]) -> dict[str, int | str] | None:
        """accelerate's ``hf_device_map`` for the placed model, or None where the whole model is
        on one device (``from_pretrained`` sets none then either)."""
        return None

    def notes(self, model: nn.Module) -> tuple[str, ...]:
        """Lines for the load report, once the model is complete."""
        return ()

    def stream(
        self, build: Build, prefixes: list[str], device: Device, *, depth: int, source: str
    ) -> list[Binding]:
        """Stream the modules at ``prefixes`` through ``device`` (installing the streamer's hooks);
        the bindings that stay resident."""
        streamed, resident = _split(build.bindings, prefixes)
        if prefixes:
            modules = [
                (submodule(build.model, p), [b for b in streamed if in_module(b.name, p)]) for p in prefixes
            ]
            materializer = build.materializer
            streamer = ModuleStreamer(
                modules, materializer, materializer.placement, device, depth=depth, source=source
            )
            build.hooks.add_streamer(build.model, streamer)
        return resident


_EXECUTORS: dict[type, type[Executor[Any]]] = {}


def register_executor(cls: type[Executor[Any]]) -> type[Executor[Any]]:
    """Class decorator: ``cls`` carries out strategies of ``cls.strategy_type``."""
    _EXECUTORS[cls.strategy_type] = cls
    return cls


def executor_for(strategy: Strategy) -> Executor[Any]:
    """A fresh executor for ``strategy``, found by the strategy's type."""
    try:
        return _EXECUTORS[type(strategy)](strategy)
    except KeyError:
        known = ", ".join(sorted(t.__name__ for t in _EXECUTORS))
        raise PlanFormatError(
            f"no executor carries out a {type(strategy).__name__} (known: {known})"
        ) from None


def submodule(model: nn.Module, name: str) -> nn.Module:
    """``model``'s module ``name``, also where the name starts with the base model's prefix."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        base = str(getattr(model, "base_model_prefix", "") or "")
        return model.get_submodule(name.removeprefix(f"{base}."))


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


def accelerate_device(device: Device) -> int | str:
    """``device`` as accelerate's device maps spell it: a CUDA index, ``"cpu"``, ``"mps"``."""
    return device.index if device.kind == "cuda" else device.kind


def with_rest(
    found: dict[str, int | str], everything: list[Binding], rest: int | str
) -> dict[str, int | str]:
    """``found`` plus, at ``rest``, the module of each tensor no entry of ``found`` covers."""
    for binding in everything:
        parts = binding.name.split(".")
        if not any(".".join(parts[:i]) in found for i in range(1, len(parts))):
            found[".".join(parts[:-1])] = rest
    return found
