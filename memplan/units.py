"""Byte sizes: parse what people type ("24GiB", "1.5 GB", 1.5e9) and format for people.

``format_size`` lives in the leaf :mod:`memplan._sizes` (so the errors can format sizes without
importing this module back); it is public here and in ``memplan``.

Units are case-insensitive. ``KB/MB/GB/TB/PB`` are decimal (10**3n), ``KiB/MiB/GiB/TiB/PiB``
and the short ``Ki/Mi/Gi`` are binary. The bare letters ``K/M/G/T/P`` are binary too, as in
``docker --memory 4g`` and ``free -g``, because that is what people mean when they size RAM.
"""

from __future__ import annotations

import math
import re

from memplan._sizes import format_size
from memplan.errors import InvalidSize

__all__ = ["format_size", "parse_size"]

_PREFIXES = "kmgtp"
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def _unit_multiplier(unit: str) -> int | None:
    u = unit.lower()
    if u in ("", "b"):
        return 1
    prefix, rest = u[0], u[1:]
    if prefix not in _PREFIXES:
        return None
    power = _PREFIXES.index(prefix) + 1
    if rest in ("ib", "i", ""):
        return 1 << (10 * power)
    if rest == "b":
        return int(10 ** (3 * power))
    return None


def parse_size(value: str | int | float) -> int:
    """Return ``value`` in bytes; raise :class:`InvalidSize` for anything that is not a size."""
    if isinstance(value, bool):
        raise InvalidSize(value, "a boolean is not a size")
    if isinstance(value, int):
        return _checked(value, value)
    if isinstance(value, float):
        return _checked(value, _from_float(value, value))
    if not isinstance(value, str):
        raise InvalidSize(value, f"expected a string or a number, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("-"):
        raise InvalidSize(value, "sizes cannot be negative")
    match = _SIZE.match(text)
    if match is None:
        raise InvalidSize(value, "expected a number and an optional unit, e.g. '24GiB' or '1.5 GB'")
    number, unit = match.groups()
    multiplier = _unit_multiplier(unit)
    if multiplier is None:
        raise InvalidSize(value, f"unknown unit {unit!r}; use B, KiB, MiB, GiB, TiB or KB, MB, GB, TB")
    return _checked(value, _from_float(value, float(number) * multiplier))


def _from_float(original: object, number: float) -> int:
    if math.isnan(number) or math.isinf(number):
        raise InvalidSize(original, "not a finite number")
    if number < 0:
        raise InvalidSize(original, "sizes cannot be negative")
    # Sizes like "1.5 GB" are exact; anything finer than a byte rounds to the nearest byte.
    return round(number)


def _checked(original: object, number: int) -> int:
    if number < 0:
        raise InvalidSize(original, "sizes cannot be negative")
    if number >= 2**63:
        raise InvalidSize(original, "larger than any memory memplan can address (2**63 bytes)")
    return number
