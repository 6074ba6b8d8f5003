"""Keep tensors where they pay: tiers, the residency manager, eviction and pressure.

Nothing here imports torch until a tier stores a tensor.
"""

from memplan.residency.eviction import GDSF, LRU, Belady, Candidate, Eviction, get_eviction
from memplan.residency.manager import EntryInfo, EntryInUse, ManagerStats, Move, ResidencyManager
from memplan.residency.policy import RetentionPolicy
from memplan.residency.pool import HostPool, PoolStats, size_class
from memplan.residency.pressure import LEVELS, THRESHOLDS, PressureLevel, PressureResponse, level_for
from memplan.residency.tiers import Tier, TierStats, get_tier, register_tier, tier_names

__all__ = [
    "GDSF",
    "LEVELS",
    "LRU",
    "THRESHOLDS",
    "Belady",
    "Candidate",
    "EntryInUse",
    "EntryInfo",
    "Eviction",
    "HostPool",
    "ManagerStats",
    "Move",
    "PoolStats",
    "PressureLevel",
    "PressureResponse",
    "ResidencyManager",
    "RetentionPolicy",
    "Tier",
    "TierStats",
    "get_eviction",
    "get_tier",
    "level_for",
    "register_tier",
    "size_class",
    "tier_names",
]
