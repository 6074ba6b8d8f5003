import uuid
from typing import Any

import pytest

from memplan.residency import Tier, get_tier
from tests.conformance.contract import TierContract


class TestRemoteTierOnS3(TierContract):
    @pytest.fixture(autouse=True)
    def _server(self, s3: dict[str, Any]) -> None:
        self.s3 = s3

    def make(self, capacity: int) -> Tier:
        url = f"s3://conformance/{uuid.uuid4().hex}"
        return get_tier("remote", url, capacity, storage_options=self.s3, backoff_s=0.01)
