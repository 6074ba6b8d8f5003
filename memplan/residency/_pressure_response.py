"""What the manager does at each pressure level, on the tiers of the pressured device."""

from __future__ import annotations

import gc

from memplan._torch_imported import imported_torch
from memplan.gpu import Device
from memplan.residency._moves import Mover
from memplan.residency.pressure import ACTIONS, PressureLevel, PressureResponse, level_for, rank
from memplan.residency.tiers.base import Tier

__all__ = ["respond"]


def respond(mover: Mover, ratio: float, device: Device | None) -> PressureResponse:
    """Answer ``device`` (None: every memory tier) being ``ratio`` full, by the level's actions."""
    tiers = mover.tiers
    level = level_for(ratio)
    pressured = [i for i, t in enumerate(tiers) if _pressured(t, device)]
    before = sum(tiers[i].used for i in pressured)
    actions: list[str] = []
    freed_cache = 0
    if rank(level) >= rank("low"):
        freed_cache = sum(tiers[i].trim() for i in pressured)
        actions.append(ACTIONS["low"])
    demoted = _demote_for(mover, level, pressured) if rank(level) >= rank("medium") else []
    if rank(level) >= rank("medium"):
        actions.append(ACTIONS["medium"])
    if rank(level) >= rank("high"):
        gc.collect()
        _empty_cuda_cache()
        actions.append(ACTIONS["high"])
    if level == "critical":
        actions.append(ACTIONS["critical"])
    freed = before - sum(tiers[i].used for i in pressured) + freed_cache
    return PressureResponse(level, ratio, device, tuple(actions), freed, tuple(demoted))


def _demote_for(mover: Mover, level: PressureLevel, pressured: list[int]) -> list[str]:
    table = mover.table
    with table.state:
        ordered = sorted(table.entries.values(), key=lambda e: (-e.tier, e.last_use))
    demoted = []
    for entry in ordered:
        stays = rank(entry.policy.max_pressure) >= rank(level) and level != "critical"
        if entry.tier not in pressured or stays or not mover.can_go_down(entry):
            continue
        if mover.demote_if_free(entry, f"{level} pressure"):  # leased, pinned or needed: it stays
            demoted.append(entry.name)
    return demoted


def _pressured(tier: Tier, device: Device | None) -> bool:
    if device is None:
        return tier.device.kind in ("cuda", "mps", "cpu")
    return tier.device == device


def _empty_cuda_cache() -> None:
    torch = imported_torch(cuda="initialized")  # never import torch (and so CUDA) just to free its cache
    if torch is not None:
        torch.cuda.empty_cache()
