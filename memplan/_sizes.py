"""Byte sizes written for people: ``format_size(24 * 2**30) == '24.0 GiB'``.

A leaf: it imports nothing from memplan, so :mod:`memplan.errors` can put sizes in its messages
while :mod:`memplan.units` (which parses sizes and raises ``InvalidSize``) imports the errors.
Users import ``format_size`` from ``memplan`` or ``memplan.units``.
"""

from __future__ import annotations

__all__ = ["format_size"]


def format_size(n: int, *, precision: int = 1) -> str:
    """Format ``n`` bytes with binary units: ``format_size(24 * 2**30) == '24.0 GiB'``."""
    sign = "-" if n < 0 else ""
    size = float(abs(n))
    if size < 1024:
        return f"{sign}{int(size)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024:
            return f"{sign}{size:.{precision}f} {unit}"
    return f"{sign}{size / 1024:.{precision}f} PiB"
