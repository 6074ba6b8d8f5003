from memplan.residency import Tier, get_tier
from tests.conformance.contract import TierContract


class TestHostTier(TierContract):
    def make(self, capacity: int) -> Tier:
        return get_tier("host", capacity)


class TestCompressedHostTier(TierContract):
    def make(self, capacity: int) -> Tier:
        return get_tier("host", capacity, compression="zstd")
