from pathlib import Path

import pytest

from memplan.residency import Tier, get_tier
from tests.conformance.contract import TierContract


class TestDiskTier(TierContract):
    @pytest.fixture(autouse=True)
    def _spill_dir(self, tmp_path: Path) -> None:
        self.spill = tmp_path

    def make(self, capacity: int) -> Tier:
        return get_tier("disk", self.spill / f"spill-{capacity}", capacity)


class TestCompressedDiskTier(TestDiskTier):
    def make(self, capacity: int) -> Tier:
        return get_tier("disk", self.spill / f"zspill-{capacity}", capacity, compression="zstd")
