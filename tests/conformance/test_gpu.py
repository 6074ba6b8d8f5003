from memplan import Allocator
from memplan.gpu import parse_simulation
from memplan.residency import Tier, get_tier
from tests.conformance.contract import TierContract


class TestSimulatedGpuTier(TierContract):
    def make(self, capacity: int) -> Tier:
        allocator = Allocator(parse_simulation("cuda:0=2GiB,cpu=8GiB"))
        return get_tier("gpu", capacity, allocator=allocator)
