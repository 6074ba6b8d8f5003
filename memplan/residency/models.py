"""Models as entries: a source registered by name now, loaded by its first :meth:`use`.

The residency manager knows tiers, not checkpoints: what turns a source into a model is the
loader :mod:`memplan.loaders` registers here when it is imported (``import memplan`` does), so
residency never imports the loaders (whose quantized-weights cache is built on the disk tier).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memplan.errors import MissingDependency
from memplan.gpu import Device

__all__ = ["ModelLoader", "ModelSource", "Room", "model_loader", "register_model_loader"]


@dataclass(frozen=True)
class ModelSource:
    """What :meth:`ResidencyManager.add_model` was given: anything ``memplan.load`` takes."""

    source: str | os.PathLike[str]
    workload: Any = None  # a memplan.Workload, or None for the model's own context
    revision: str | None = None
    model_cls: Any = None


@dataclass(frozen=True)
class Room:
    """Where a model is to be loaded: the tier that will hold it, its device, the bytes free
    there, and the bytes free in host memory beside it (a load stages through the host; None:
    the manager has no host tier, and the loader measures the host)."""

    tier: str
    device: Device
    available: int
    host_available: int | None


ModelLoader = Callable[[ModelSource, Room], Any]  # the loaded model, whole on room.device

_loaders: list[ModelLoader] = []


def register_model_loader(loader: ModelLoader) -> None:
    """Make ``loader`` the one that turns sources into models (the last registered wins)."""
    _loaders[:] = [loader]


def model_loader() -> ModelLoader:
    """The registered loader (``import memplan`` registers memplan's own)."""
    if not _loaders:  # memplan.loaders failed to import: its error said why
        raise MissingDependency("torch", "hf", "loading a model by its source")
    return _loaders[0]
