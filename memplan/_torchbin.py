"""The PyTorch ``.bin`` format: a checkpoint's tensors, and their shapes, without running its pickle.

``torch.load(weights_only=True, mmap=True)`` restores only tensors and plain containers (it
refuses any other class, so nothing in the file runs) and maps the storages instead of reading
them, so only the pickle is read. The planner reads shapes here (the one place planning imports
torch); the loaders read the tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from memplan._dtypes import SAFETENSORS_NAMES, torch_name
from memplan._fileio import FileIdentity
from memplan._safetensors import ShardHeader, TensorEntry
from memplan.errors import CheckpointError

if TYPE_CHECKING:
    import torch

__all__ = ["load_bin", "read_bin_header"]


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` by name, memory-mapped; anything but a flat mapping of names to
    tensors is a :class:`CheckpointError` naming the file (and the entry at fault)."""
    import pickle

    import torch

    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise CheckpointError(path, f"torch.load(weights_only=True) refuses it: {exc}") from None
        loaded = _load_unmapped(path)  # the pre-1.6 format cannot be mapped
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, AttributeError) as exc:
        raise CheckpointError(path, f"torch.load(weights_only=True) refuses it: {exc}") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(path, f"holds a {type(loaded).__name__}, not a mapping of tensor names")
    for name, value in loaded.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                path, f"entry {name!r} is a {type(value).__name__}, not a tensor", str(name)
            )
    return loaded


def _load_unmapped(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch wraps its refusals in several types
        raise CheckpointError(path, f"torch.load(weights_only=True) refuses it: {exc}") from None


def read_bin_header(path: Path) -> ShardHeader:
    """The tensors of a ``.bin`` file as header entries (offsets are not file positions here)."""
    entries = []
    try:  # before it is read: a file replaced meanwhile reads as changed when it is loaded
        identity = FileIdentity.of(path)
    except OSError as exc:
        raise CheckpointError(path, f"cannot stat: {exc.strerror or exc}") from None
    for name, tensor in load_bin(path).items():
        dtype = SAFETENSORS_NAMES.get(torch_name(tensor.dtype))
        if dtype is None:
            raise CheckpointError(path, f"dtype {tensor.dtype} has no safetensors equivalent", name)
        entries.append(
            TensorEntry(name, dtype, tuple(tensor.shape), 0, tensor.numel() * tensor.element_size())
        )
    return ShardHeader(path, 0, identity.size, {}, tuple(entries), identity)
