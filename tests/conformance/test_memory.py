from memplan.residency import Tier, get_tier
from tests.conformance.contract import TierContract


class TestMemoryTier(TierContract):
    def make(self, capacity: int) -> Tier:
        return get_tier("memory", capacity)
