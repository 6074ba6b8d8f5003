"""A diffusers pipeline folder (``model_index.json``): its weighted components as one checkpoint.

Each component (``unet``, ``vae``, ``text_encoder``, a DiT ``transformer``, ...) is inspected as
the model it is; the pipeline's checkpoint holds all their tensors under the component's name,
so a plan sizes the whole pipeline in one total, and lists each component in its notes.
Components without weights (tokenizer, scheduler) are skipped.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from memplan.errors import CheckpointError
from memplan.planner.files import load_json
from memplan.planner.model import Architecture, Checkpoint, TensorInfo
from memplan.planner.reading import read_model
from memplan.units import format_size

__all__ = ["PIPELINE_INDEX", "inspect_pipeline"]

PIPELINE_INDEX = "model_index.json"


def inspect_pipeline(path: Path) -> Checkpoint:
    """The weighted components of the pipeline at ``path``, as one :class:`Checkpoint`."""
    index = load_json(path / PIPELINE_INDEX, PIPELINE_INDEX)
    components: list[tuple[str, Checkpoint]] = []
    for name, spec in sorted(index.items()):
        folder = path / name
        if name.startswith("_") or not isinstance(spec, list) or not _has_weights(folder):
            continue
        if "/" in name or name in (".", ".."):
            raise CheckpointError(path / PIPELINE_INDEX, f"component {name!r} is not a folder name")
        components.append((name, read_model(folder)))
    if not components:
        raise CheckpointError(path / PIPELINE_INDEX, "no component of this pipeline has weights")
    tensors: dict[str, TensorInfo] = {}
    notes = []
    for name, part in components:
        for info in part.tensors.values():
            full = f"{name}.{info.name}"
            tensors[full] = TensorInfo(
                full, info.dtype, info.shape, info.file, info.offset, info.nbytes, None
            )
        kind = ".".join(str(s) for s in index[name])
        notes.append(f"component {name} ({kind}): {format_size(part.nbytes)}")
    files = tuple(f for _, part in components for f in part.files)
    digest = hashlib.sha256("".join(f"{n}:{p.fingerprint};" for n, p in components).encode()).hexdigest()
    identities = {file: identity for _, part in components for file, identity in part.identities.items()}
    return Checkpoint(
        path, files, tensors, Architecture(), (), digest[:16], tuple(notes), components=tuple(components),
        identities=identities,
    )  # fmt: skip


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and (any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")))
