"""Tiers by name: ``get_tier("disk", path=...)``. Implementations are imported when first asked for,
so an optional dependency (fsspec, s3fs, zstandard) is needed only by the tier that uses it."""

from __future__ import annotations

import importlib
from typing import Any

from memplan.errors import TierError
from memplan.residency.tiers.base import Tier, TierStats

__all__ = ["Tier", "TierStats", "get_tier", "register_tier", "tier_class", "tier_names"]

_KNOWN: dict[str, str] = {
    "memory": "memplan.residency.tiers.memory:MemoryTier",
    "host": "memplan.residency.tiers.host:HostTier",
    "gpu": "memplan.residency.tiers.gpu:GpuTier",
    "disk": "memplan.residency.tiers.disk:DiskTier",
    "remote": "memplan.residency.tiers.remote:RemoteTier",
}
_REGISTERED: dict[str, type[Tier]] = {}


def register_tier(name: str, cls: type[Tier] | str, *, replace: bool = False) -> None:
    """Make ``cls`` (a class, or ``"module:Class"`` to import lazily) available as ``name``."""
    if not replace and (name in _KNOWN or name in _REGISTERED):
        raise TierError(name, None, "a tier is already registered under this name (pass replace=True)")
    if isinstance(cls, str):
        _KNOWN[name] = cls
        _REGISTERED.pop(name, None)
    else:
        _REGISTERED[name] = cls


def tier_names() -> list[str]:
    return sorted(set(_KNOWN) | set(_REGISTERED))


def tier_class(name: str) -> type[Tier]:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _KNOWN:
        raise TierError(name, None, f"no such tier; known: {', '.join(tier_names())}")
    module_name, _, attr = _KNOWN[name].partition(":")
    cls: type[Tier] = getattr(importlib.import_module(module_name), attr)
    _REGISTERED[name] = cls
    return cls


def get_tier(kind: str, /, *args: Any, **kwargs: Any) -> Tier:
    """A new tier of the kind registered as ``kind``, built with ``args`` and ``kwargs``
    (``name=`` sets the tier's own name, e.g. to stack two memory tiers)."""
    return tier_class(kind)(*args, **kwargs)
