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

A bitsandbytes weight means nothing without the state bitsandbytes keeps beside it (an int8
weight's row scales, a 4-bit weight's quantization state; some of it on the layer, not the
parameter). Such a weight is kept as the tensors it serialises to (``memplan._bnb_state``: the
quantized weights cache keeps the same), each a record of its own named ``<layer>.<name>``
(``...q_proj.SCB``, ``...q_proj.weight.absmax``), so every tier stores and checks plain tensors;
plugging it in builds the bitsandbytes parameter from the tier's tensors, and the layer lets go
of what it held of the old one. A 4-bit weight that bitsandbytes repacked for its AVX512-BF16
kernel is kept as it was before the repacking, and its next forward repacks it again.

A model from :func:`memplan.load` whose layers are streamed or offloaded keeps those layers'
weights away from them: between forwards the layers hold meta placeholders, and the load's
streamer (``model.memplan.streamer``, a :class:`WeightKeeper`) keeps the weights, copying them
into the layers for each forward. The group takes charge of every weight the model holds in
memory: each placeholder gives way to the weight kept for it (a record plugged into the keeper,
named as the model names the weight), so those move and come back with the rest. A weight the
keeper reads from the checkpoint's files at every forward (streamed from disk) is in no memory
to manage: it stays in the files, which outlast every move, and the group leaves it there.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from memplan._bnb_state import (
    build_weight,
    cannot_serialise,
    is_quantized_layer,
    quantized_state,
    set_state_on_layer,
    state_on_layer,
)
from memplan.errors import InvalidEntry
from memplan.residency import _wire

if TYPE_CHECKING:
    import torch

__all__ = ["Group", "TensorRecord", "WeightKeeper", "digest_of"]


@runtime_checkable
class WeightKeeper(Protocol):
    """What keeps some of a module's weights away from it, the module holding placeholders for
    them between forwards (:func:`memplan.load`'s streamer, found as ``model.memplan.streamer``:
    residency does not import the loaders)."""

    def kept_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Each weight by the model's name for it: the placeholder its module holds, and the
        weight kept in memory for it, or None where it is read from files at every use."""
        ...

    def keep(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Keep ``weights`` (by name) instead from now on; meta tensors: none, nothing runs."""
        ...


@dataclass
class _Slot:
    owner: Any  # the nn.Module holding it, or None for a mapping
    attr: str
    is_parameter: bool
    requires_grad: bool
    kept: bool = False  # the group's keeper keeps it for ``owner``, which holds a placeholder


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


@dataclass
class _Quantized:
    """A bitsandbytes layer's weight, kept as the tensors it serialises to (records named
    ``<prefix><name>``) and built back into the layer's parameter from them."""

    layer: Any
    prefix: str  # the layer's path and a dot ("" for a registered layer itself)
    names: tuple[str, ...]
    parameter: Any  # what it was registered with, and what the layer held of it, until the
    held: dict[str, Any]  # registration succeeds (a failed one puts them back)

    def build(self, by_path: Mapping[str, torch.Tensor]) -> Any:
        stored = {name: by_path[self.prefix + name] for name in self.names}
        set_state_on_layer(self.layer, {})  # the new parameter carries its own
        return build_weight(self.layer, stored, str(stored["weight"].device))


def digest_of(tensor: torch.Tensor) -> str:
    raw = _wire.raw_bytes(tensor).cpu()
    h = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    h.update(raw.numpy().data)
    return h.hexdigest()


def _keeper_of(obj: Any) -> WeightKeeper | None:
    """The keeper of a model :func:`memplan.load` loaded with streamed or offloaded layers (read
    by name, as the manager reads the load's budget), or None."""
    keeper = getattr(getattr(obj, "memplan", None), "streamer", None)
    return keeper if isinstance(keeper, WeightKeeper) else None


def _take_kept(
    entry: str,
    kept: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    found: dict[int, tuple[str, Any, list[_Slot]]],
) -> None:
    """In ``found`` (the module's tensors), each placeholder of ``kept`` (a keeper's
    :meth:`~WeightKeeper.kept_weights`) gives way to the weight kept in memory for it, or to
    nothing where the keeper reads it from files."""
    for name, (placeholder, weight) in kept.items():
        at = found.pop(id(placeholder), None)
        if at is None:  # its module holds the weight itself: a forward is under way
            raise InvalidEntry(entry, f"{name!r} is in use by a forward; register the model between forwards")
        if weight is not None:
            owner, attr = at[2][0].owner, at[2][0].attr
            found[id(weight)] = (name, weight, [_Slot(owner, attr, False, False, kept=True)])


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
        self.keeper = _keeper_of(obj)
        kept = self.keeper.kept_weights() if self.keeper is not None else {}  # before the walk: it settles
        found = _module_tensors(obj) if self.module is not None else self._mapping_tensors(entry, obj)
        _take_kept(entry, kept, found)
        empty = [path for path, tensor, _ in found.values() if tensor.is_meta]
        if empty:  # a module unregistered (or never loaded) holds shapes, not data
            raise InvalidEntry(entry, f"{empty[0]!r} is a meta tensor, with no data to keep")
        # What it was registered with, by identity: a tensor tied elsewhere is found again after
        # the entry's own slots hold its tier's copies.
        self.taken = {id(tensor): weakref.ref(tensor) for _, tensor, _ in found.values()}
        self.quantized: dict[str, _Quantized] = {}  # by the weight's path
        pieces = self._serialise_quantized(entry, found) if self.module is not None else list(found.values())
        self.records: list[TensorRecord] = []
        for path, tensor, slots in pieces:
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
            record.private_key: tensor for record, (_, tensor, _) in zip(self.records, pieces, strict=True)
        }

    def _serialise_quantized(
        self, entry: str, found: dict[int, tuple[str, Any, list[_Slot]]]
    ) -> list[tuple[str, Any, list[_Slot]]]:
        """The tensors to keep: each bitsandbytes weight as the tensors it serialises to (the
        weight's slots go with its ``weight``), every other tensor as it is."""
        pieces: list[tuple[str, Any, list[_Slot]]] = []
        for path, tensor, slots in found.values():
            layer = slots[0].owner
            if not (slots[0].is_parameter and slots[0].attr == "weight" and is_quantized_layer(layer)):
                pieces.append((path, tensor, slots))
                continue
            why = cannot_serialise(layer)
            if why is not None:
                raise InvalidEntry(entry, f"{path!r} {why}")
            state = quantized_state(layer)
            prefix = path.removesuffix("weight")
            self.quantized[path] = _Quantized(layer, prefix, tuple(state), tensor, state_on_layer(layer))
            pieces += [(prefix + name, t, slots if name == "weight" else []) for name, t in state.items()]
        return pieces

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

        self._plug(
            {r.path: torch.empty(r.shape, dtype=r.dtype, device="meta") for r in self.records}, build=False
        )
        for quantized in self.quantized.values():
            set_state_on_layer(quantized.layer, {})
        self._tensors = {}

    def restore(self) -> None:
        """Put the tensors it was registered with back where they were (a registration failed)."""
        self._tensors = {}
        kept: dict[str, Any] = {}
        for record in self.records:
            quantized = self.quantized.get(record.path)
            original = quantized.parameter if quantized is not None else self.originals[record.private_key]
            if record.slots and record.slots[0].kept:
                kept[record.path] = original
                continue
            for slot in record.slots:
                if slot.owner is not None:
                    table = slot.owner._parameters if slot.is_parameter else slot.owner._buffers
                    table[slot.attr] = original
        for quantized in self.quantized.values():
            set_state_on_layer(quantized.layer, quantized.held)
        self._keep(kept)

    def drop_originals(self) -> None:
        self.originals = {}
        for quantized in self.quantized.values():
            quantized.parameter, quantized.held = None, {}

    def _plug(self, by_path: dict[str, torch.Tensor], *, build: bool = True) -> None:
        """Put ``by_path``'s tensors in; ``build``: bitsandbytes weights as their parameters
        (else as plain ones: meta tensors make no bitsandbytes parameter)."""
        import torch

        self._tensors = {}
        kept: dict[str, torch.Tensor] = {}
        for record in self.records:
            tensor = by_path[record.path]
            for slot in record.slots:
                self._tensors[record.path if slot.owner is not None else slot.attr] = tensor
            if self.module is None or not record.slots:  # a bitsandbytes state goes in with its weight
                continue
            if record.slots[0].kept:
                kept[record.path] = tensor
                continue
            quantized = self.quantized.get(record.path) if build else None
            parameter = (
                quantized.build(by_path)
                if quantized is not None
                else torch.nn.Parameter(tensor, requires_grad=record.slots[0].requires_grad)
            )
            for slot in record.slots:
                table = slot.owner._parameters if slot.is_parameter else slot.owner._buffers
                table[slot.attr] = parameter if slot.is_parameter else tensor
        self._keep(kept)

    def _keep(self, weights: dict[str, torch.Tensor]) -> None:
        if weights and self.keeper is not None:
            self.keeper.keep(weights)

    def handle(self) -> Any:
        """What ``use`` hands out: the module, or a read-only mapping of the attached tensors."""
        return self.module if self.module is not None else MappingProxyType(dict(self._tensors))
