"""Keep tensors where they pay: tiers, the residency manager, eviction and pressure."""

from memplan.residency.pool import HostPool, PoolStats, size_class
from memplan.residency.tiers import Tier, TierStats, get_tier, register_tier, tier_names

__all__ = [
    "HostPool",
    "PoolStats",
    "Tier",
    "TierStats",
    "get_tier",
    "register_tier",
    "size_class",
    "tier_names",
]
