"""A model's files: which weight files a directory holds (index, single file or shards, safetensors
before ``.bin``), their headers, and its config.json. Every path read is a regular file of the
model's directory (or a link to one), and every error names the file at fault."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from memplan._safetensors import ShardHeader, TensorEntry, read_header
from memplan._torchbin import read_bin_header
from memplan.errors import CheckpointError

__all__ = [
    "BIN_INDEX_NAME",
    "BIN_SINGLE_NAME",
    "INDEX_NAME",
    "SINGLE_NAME",
    "collect",
    "discover",
    "load_json",
    "read_config",
    "read_headers",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_SINGLE_NAME = "pytorch_model.bin"

# Weight formats in the order transformers prefers them: (index, single file, other files).
_FORMATS = (
    (INDEX_NAME, SINGLE_NAME, "*.safetensors"),
    (BIN_INDEX_NAME, BIN_SINGLE_NAME, "*pytorch_model*.bin"),  # diffusers: diffusion_pytorch_model
)


def load_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; anything else is a :class:`CheckpointError` saying it is ``what``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(str(path), f"cannot read {what}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(str(path), f"{what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(str(path), f"{what} is not a JSON object")
    return data


def discover(path: Path) -> tuple[Path, list[Path], dict[str, Path] | None]:
    """(model directory, weight files, tensor->file map from an index or None)."""
    if not path.exists():
        raise CheckpointError(str(path), _missing(path))
    if not path.is_dir():
        return path.parent, [_regular(path)], None
    for index_name, single_name, pattern in _FORMATS:
        if (path / index_name).exists():
            weight_map = _index_shards(path, _regular(path / index_name))
            return path, sorted(set(weight_map.values())), weight_map
        found = [path / single_name] if (path / single_name).exists() else sorted(path.glob(pattern))
        if found:
            return path, [_regular(f) for f in found], None
    raise CheckpointError(
        str(path),
        f"no {INDEX_NAME}, {SINGLE_NAME}, *.safetensors, {BIN_INDEX_NAME} or {BIN_SINGLE_NAME} file here",
    )


def read_headers(files: list[Path]) -> list[ShardHeader]:
    """Each weight file's header: a safetensors header as stored, a ``.bin``'s as its pickle says."""
    return [read_bin_header(f) if f.suffix == ".bin" else read_header(f) for f in files]


def collect(
    headers: list[ShardHeader], weight_map: dict[str, Path] | None
) -> dict[str, tuple[TensorEntry, Path]]:
    """tensor name -> (its header entry, its shard); a tensor stored twice is an error."""
    entries: dict[str, tuple[TensorEntry, Path]] = {}
    for header in headers:
        for entry in header.tensors:
            if weight_map is not None and weight_map.get(entry.name) != header.path:
                continue  # the index is authoritative; a stray copy elsewhere is not loaded
            if entry.name in entries:
                other = entries[entry.name][1].name
                raise CheckpointError(str(header.path), f"also stored in {other}", tensor=entry.name)
            entries[entry.name] = (entry, header.path)
    for tensor, shard in (weight_map or {}).items():
        if tensor not in entries:
            raise CheckpointError(str(shard), "tensor named by the index is not in this shard", tensor=tensor)
    return entries


def read_config(directory: Path) -> tuple[dict[str, Any], str]:
    """config.json and its path; an empty config where there is none."""
    config_path = directory / "config.json"
    if not config_path.exists() and not config_path.is_symlink():
        return {}, str(config_path)
    return load_json(_regular(config_path), "config.json"), str(config_path)


def _index_shards(directory: Path, index_path: Path) -> dict[str, Path]:
    """tensor name -> shard path, from the index; every shard must be a file of ``directory``."""
    weight_map = load_json(index_path, "the index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(str(index_path), "index has no weight_map of tensor names to files")
    checked: dict[str, Path] = {}  # a shard holds hundreds of tensors: check each file once
    shards: dict[str, Path] = {}
    for tensor, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise CheckpointError(str(index_path), "weight_map must name a file", tensor=tensor)
        if file not in checked:
            checked[file] = _checked_shard(directory, index_path, file, tensor)
        shards[tensor] = checked[file]
    return shards


def _checked_shard(directory: Path, index_path: Path, file: str, tensor: str) -> Path:
    """``directory / file``, where ``file`` must be a plain name. The file itself may be a link
    whose target lies elsewhere: the Hugging Face cache links snapshot files into ``blobs/``."""
    if file in (".", "..") or "/" in file or "\\" in file or Path(file).is_absolute():
        raise CheckpointError(
            str(index_path), f"shard {file!r} is outside the model directory", tensor=tensor
        )
    return _regular(directory / file, "shard named by the index ", tensor)


def _missing(path: Path) -> str:
    if not path.is_symlink():
        return "does not exist"
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python 3.10-3.12 raise this for a loop (3.13: OSError ELOOP)
        return "is a symlink loop"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop"
    return f"links to {os.readlink(path)}, which is missing"


def _regular(file: Path, what: str = "", tensor: str | None = None) -> Path:
    """``file``, which must be a regular file (or a link to one): reading a FIFO's header, or a
    device's, would wait forever or read what is no checkpoint."""
    if not file.is_file():
        why = "not a regular file" if file.exists() else _missing(file)
        raise CheckpointError(str(file), what + why, tensor=tensor)
    return file
