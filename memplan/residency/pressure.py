"""Pressure levels: how full a device is, and what the residency manager does about it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, get_args

from memplan.gpu import Device

__all__ = ["LEVELS", "THRESHOLDS", "PressureLevel", "PressureResponse", "level_for", "rank"]

PressureLevel = Literal["none", "low", "medium", "high", "critical"]
LEVELS: tuple[PressureLevel, ...] = get_args(PressureLevel)

# used/total at or above which each level starts.
THRESHOLDS: dict[PressureLevel, float] = {"low": 0.70, "medium": 0.80, "high": 0.90, "critical": 0.95}

# What each level does, cumulatively: a level also does everything below it.
ACTIONS: dict[PressureLevel, str] = {
    "low": "clear caches",
    "medium": "demote idle entries",
    "high": "gc.collect and empty_cache",
    "critical": "demote everything not pinned or leased",
}


def rank(level: PressureLevel) -> int:
    return LEVELS.index(level)


def level_for(ratio: float) -> PressureLevel:
    """The level for a used/total ``ratio``."""
    reached: PressureLevel = "none"
    for level, threshold in THRESHOLDS.items():
        if ratio >= threshold:
            reached = level
    return reached


@dataclass(frozen=True)
class PressureResponse:
    """One response to pressure: what was done and what it freed on the pressured tiers."""

    level: PressureLevel
    ratio: float
    device: Device | None
    actions: tuple[str, ...]
    freed_bytes: int
    demoted: tuple[str, ...]
    at: float = field(default_factory=time.time)
