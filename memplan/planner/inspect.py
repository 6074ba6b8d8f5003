"""``inspect(path) -> Checkpoint``: a model's shape from its headers, index and config.json.

Only the 8-byte length and JSON header of each shard are read, never tensor data, never torch.
"""

from __future__ import annotations

import os

from memplan.planner.model import Checkpoint
from memplan.planner.pipeline import PIPELINE_INDEX, inspect_pipeline
from memplan.planner.reading import read_model
from memplan.planner.sources import resolve

__all__ = ["inspect"]


def inspect(path: str | os.PathLike[str], *, revision: str | None = None) -> Checkpoint:
    """Read a checkpoint's shape: a model directory (safetensors or ``.bin``, sharded or not),
    one weights file with its configs beside it, a diffusers pipeline folder (its components
    as one checkpoint), or a Hugging Face repo id (``org/name``, from the local cache first;
    see :func:`~memplan.planner.sources.resolve`).

    Raises :class:`~memplan.CheckpointError` naming the file (and tensor) at fault.
    """
    path = resolve(path, revision=revision)
    if (path / PIPELINE_INDEX).is_file():
        return inspect_pipeline(path)
    return read_model(path)
