"""One model's :class:`~memplan.planner.model.Checkpoint`, read from its files: the weight files'
headers (never tensor data), the index, config.json, and the stacks its tensor names make."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from memplan._safetensors import TensorEntry
from memplan.planner.config import model_architecture
from memplan.planner.files import collect, discover, read_config, read_headers
from memplan.planner.model import Checkpoint, TensorInfo
from memplan.planner.stacks import find_stacks

__all__ = ["BIN_NOTE", "read_model"]

BIN_NOTE = "weights are a PyTorch .bin: their shapes were read with torch.load(weights_only=True)"


def read_model(path: Path) -> Checkpoint:
    """The shape of the model at ``path``: a model directory (safetensors or ``.bin``, sharded or
    not), or one weights file with its config beside it."""
    directory, files, weight_map = discover(path)
    headers = read_headers(files)
    entries = collect(headers, weight_map)
    config, source = read_config(directory)
    architecture = model_architecture(config, source)
    stacks, layers = find_stacks(entries, config, source)
    position = {name: i for i, layer in enumerate(layers) for name in layer.tensors}
    infos = {
        name: TensorInfo(name, e.dtype, e.shape, shard, e.offset, e.nbytes, position.get(name))
        for name, (e, shard) in entries.items()
    }
    if architecture.num_layers is None and layers:
        architecture = replace(architecture, num_layers=len(layers))
    notes: tuple[str, ...] = (BIN_NOTE,) if any(f.suffix == ".bin" for f in files) else ()
    if architecture.quantization is not None:
        notes += (architecture.quantization.note(),)
    identities = {h.path: h.identity for h in headers}
    return Checkpoint(
        path, tuple(files), infos, architecture, layers, _fingerprint(entries), notes, stacks=stacks,
        identities=identities,
    )  # fmt: skip


def _fingerprint(entries: dict[str, tuple[TensorEntry, Path]]) -> str:
    digest = hashlib.sha256()
    for name in sorted(entries):
        e = entries[name][0]
        digest.update(f"{name}:{e.dtype}:{','.join(map(str, e.shape))};".encode())
    return digest.hexdigest()[:16]
