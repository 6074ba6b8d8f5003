"""``host``: tensors in host memory, served from a size-class pool (pinned when CUDA is there)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memplan.gpu import Device
from memplan.residency import _wire
from memplan.residency.pool import HostPool, size_class
from memplan.residency.tiers.base import Tier
from memplan.units import parse_size

if TYPE_CHECKING:
    import torch

__all__ = ["HostTier"]


@dataclass(frozen=True)
class _Pooled:
    buffer: torch.Tensor
    tensor: torch.Tensor  # a view of ``buffer`` with the stored dtype and shape
    uses: int  # references to the buffer's storage the tier itself holds


def _storage_uses(buffer: torch.Tensor) -> int | None:
    import torch

    count = getattr(torch._C, "_storage_Use_Count", None)
    return int(count(buffer.untyped_storage()._cdata)) if count is not None else None


_OWN_USES: dict[bool, int] = {}


def _own_uses(pinned: bool) -> int:
    """References the tier itself holds to a stored buffer's storage (the buffer and the view it
    stores), measured once on a fresh buffer. Measured on the pooled buffer a put takes, it could
    count a view the drop that gave the buffer back still holds (its frame not yet returned, on
    another thread): then a holder's tensor went unseen and its buffer was reused under it."""
    if pinned not in _OWN_USES:
        import torch

        buffer = torch.empty(16, dtype=torch.uint8, pin_memory=pinned)
        view = buffer[:16].view(torch.float32).reshape(2, 2)
        _OWN_USES[pinned] = _storage_uses(buffer) or 0
        del view
    return _OWN_USES[pinned]


def host_free_bytes() -> int:
    from memplan.gpu import probe

    return probe()[Device("cpu")].free


class HostTier(Tier):
    """Host RAM within ``capacity`` (default: the host's free memory, cgroup-aware).

    Uncompressed, each tensor sits in a pooled buffer and ``get`` returns a view of it, so an
    entry's module can run from here. A dropped buffer goes back to the pool only when nothing
    outside the tier still refers to it: a tensor handed out belongs to its holder, and no later
    put may write into it. With ``compression="zstd"`` tensors are kept compressed,
    cost less room and come back as fresh tensors (:attr:`stats` reports the ratio).
    """

    kind = "host"

    def __init__(
        self,
        capacity: int | str | None = None,
        *,
        pool: HostPool | None = None,
        compression: str = "none",
        bandwidth: float = 10e9,
        name: str | None = None,
    ) -> None:
        cap = parse_size(capacity) if capacity is not None else host_free_bytes()
        super().__init__(device=Device("cpu"), capacity=cap, bandwidth=bandwidth, name=name)
        self.pool = pool or HostPool()
        self.codec = _wire.Compression(compression)
        self.addressable = compression == "none"

    def _store(self, key: str, tensor: torch.Tensor, room: int) -> tuple[Any, int]:
        if not self.addressable:
            meta, payload = _wire.encode(self.name, key, tensor, self.codec)
            self._check_room(key, _wire.payload_size(payload), room)
            return (meta, payload), _wire.payload_size(payload)
        raw = _wire.raw_bytes(tensor)
        self._check_room(key, size_class(raw.numel()), room)
        buffer = self.pool.acquire(raw.numel())
        buffer[: raw.numel()].copy_(raw)
        view = buffer[: raw.numel()].view(tensor.dtype).reshape(tensor.shape)
        return _Pooled(buffer, view, _own_uses(self.pool.pinned)), buffer.numel()

    def _fetch(self, key: str, handle: Any) -> torch.Tensor:
        if isinstance(handle, _Pooled):
            # A view of its own, so that holding it counts as a use of the buffer (see _discard).
            return handle.tensor.view(handle.tensor.shape)
        meta, payload = handle
        return _wire.decode(self.name, key, meta, payload)

    def _discard(self, key: str, handle: Any) -> None:
        if isinstance(handle, _Pooled):
            uses = _storage_uses(handle.buffer)
            if uses is not None and uses <= handle.uses:  # else a holder keeps it; it is theirs
                self.pool.release(handle.buffer)
            else:
                self.pool.forget(handle.buffer)

    def footprint(self, nbytes: int) -> int:
        return size_class(nbytes) if self.addressable else nbytes

    def trim(self) -> int:
        return self.pool.trim()
