"""What an entry holds: the tensors of a module (or of a mapping) and where they plug back in.

A demoted module has its parameters and buffers replaced by ``meta`` tensors of the same shape
and dtype, so a forward on it fails loudly instead of computing with stale memory; on return
they are replaced by the tier's tensors. Tied parameters stay tied: every slot that held one
tensor gets the same new parameter.

Each tensor has two tier keys. On an addressable tier the module runs from the stored tensor
itself, so a write through a lease writes there: such tiers get a key private to the entry, and
writes never cross entries, nor registrations: a ``salt`` new to each registration makes a key
that a failed registration could not free one no later entry of the same name can ever read.
Tiers that decode a fresh copy on every ``get`` (disk, remote, compressed host) get a content key
when deduplicating, so identical tensors of different entries are stored once there; the content
is hashed again on its way down from an addressable tier, so a tensor changed in place gets a key
of its new content.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from memplan.errors import InvalidEntry
from memplan.residency import _wire

if TYPE_CHECKING:
    import torch

__all__ = ["Group", "TensorRecord", "digest_of"]


@dataclass
class _Slot:
    owner: Any  # the nn.Module holding it, or None for a mapping
    attr: str
    is_parameter: bool
    requires_grad: bool


@dataclass
class TensorRecord:
    """One distinct tensor of an entry: its tier keys, checksum and where it plugs in."""

    path: str
    private_key: str  # this entry's own copy, on addressable tiers
    key: str  # on the other tiers: the content key when deduplicating, else the private key
    digest: str | None  # of the content when it came to rest; None without dedup
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    slots: list[_Slot] = field(default_factory=list)

    def key_on(self, addressable: bool) -> str:
        return self.private_key if addressable else self.key

    def rekey(self, tensor: torch.Tensor) -> None:
        """Key the record by ``tensor``'s content (it may have been written in place)."""
        if self.digest is not None:
            self.digest = digest_of(tensor)
            self.key = self.digest[:48]


def digest_of(tensor: torch.Tensor) -> str:
    raw = _wire.raw_bytes(tensor).cpu()
    h = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    h.update(raw.numpy().data)
    return h.hexdigest()


def _module_tensors(module: Any) -> dict[int, tuple[str, Any, list[_Slot]]]:
    found: dict[int, tuple[str, Any, list[_Slot]]] = {}
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for table, is_parameter in ((owner._parameters, True), (owner._buffers, False)):
            for attr, tensor in table.items():
                if tensor is None:
                    continue
                grad = bool(tensor.requires_grad) if is_parameter else False
                slot = _Slot(owner, attr, is_parameter, grad)
                path = f"{prefix}.{attr}" if prefix else attr
                found.setdefault(id(tensor), (path, tensor, []))[2].append(slot)
    return found


class Group:
    """The tensors of one registered entry: an ``nn.Module`` or a mapping of names to tensors."""

    def __init__(self, entry: str, obj: Any, *, dedup: bool, salt: str = "") -> None:
        self.module = obj if hasattr(obj, "named_modules") else None
        if self.module is None and not isinstance(obj, Mapping):
            raise InvalidEntry(entry, "register an nn.Module or a mapping of tensors")
        found = _module_tensors(obj) if self.module is not None else self._mapping_tensors(entry, obj)
        empty = [path for path, tensor, _ in found.values() if tensor.is_meta]
        if empty:  # a module unregistered (or never loaded) holds shapes, not data
            raise InvalidEntry(entry, f"{empty[0]!r} is a meta tensor, with no data to keep")
        # What it was registered with, by identity: a tensor tied elsewhere is found again after
        # the entry's own slots hold its tier's copies.
        self.taken = {id(tensor): weakref.ref(tensor) for _, tensor, _ in found.values()}
        self.records: list[TensorRecord] = []
        for path, tensor, slots in found.values():
            private = hashlib.sha256(f"{entry}\0{salt}\0{path}".encode()).hexdigest()[:48]
            digest = digest_of(tensor) if dedup else None  # hashing only pays where it dedups
            key = digest[:48] if digest else private
            nbytes = tensor.numel() * tensor.element_size()
            self.records.append(
                TensorRecord(path, private, key, digest, tensor.dtype, tuple(tensor.shape), nbytes, slots)
            )
        self._tensors: dict[str, torch.Tensor] = {}
        # Until the first tier holds them, the caller's tensors are the source, by private key.
        self.originals: dict[str, torch.Tensor] = {
            record.private_key: tensor
            for record, (_, tensor, _) in zip(self.records, found.values(), strict=True)
        }

    @staticmethod
    def _mapping_tensors(entry: str, obj: Mapping[str, Any]) -> dict[int, tuple[str, Any, list[_Slot]]]:
        found: dict[int, tuple[str, Any, list[_Slot]]] = {}
        for name, tensor in obj.items():
            if not hasattr(tensor, "untyped_storage"):
                raise InvalidEntry(entry, f"{name!r} is not a tensor")
            found.setdefault(id(tensor), (name, tensor, []))[2].append(_Slot(None, name, False, False))
        return found

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.records)

    def sizes(self, addressable: bool) -> dict[str, int]:
        """Bytes of each distinct key on a tier (identical tensors share one content key)."""
        return {r.key_on(addressable): r.nbytes for r in self.records}

    def attach(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Plug an addressable tier's tensors (by private key) into the module or mapping."""
        self._plug({r.path: tensors[r.private_key] for r in self.records})

    def release(self) -> None:
        """Unplug: meta tensors in the module, nothing in the mapping."""
        import torch

        self._plug({r.path: torch.empty(r.shape, dtype=r.dtype, device="meta") for r in self.records})
        self._tensors = {}

    def restore(self) -> None:
        """Put the tensors it was registered with back where they were (a registration failed)."""
        self._tensors = {}
        for record in self.records:
            original = self.originals[record.private_key]
            for slot in record.slots:
                if slot.owner is not None:
                    table = slot.owner._parameters if slot.is_parameter else slot.owner._buffers
                    table[slot.attr] = original

    def drop_originals(self) -> None:
        self.originals = {}

    def _plug(self, by_path: dict[str, torch.Tensor]) -> None:
        import torch

        self._tensors = {}
        for record in self.records:
            tensor = by_path[record.path]
            for slot in record.slots:
                self._tensors[record.path if slot.owner is not None else slot.attr] = tensor
            if self.module is None:
                continue
            parameter = torch.nn.Parameter(tensor, requires_grad=record.slots[0].requires_grad)
            for slot in record.slots:
                table = slot.owner._parameters if slot.is_parameter else slot.owner._buffers
                table[slot.attr] = parameter if slot.is_parameter else tensor

    def handle(self) -> Any:
        """What ``use`` hands out: the module, or a read-only mapping of the attached tensors."""
        return self.module if self.module is not None else MappingProxyType(dict(self._tensors))
