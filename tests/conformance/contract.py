"""The tier contract, written once. Each ``test_<tier>.py`` subclasses :class:`TierContract`
and says only how to build its tier with a given capacity."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from memplan import TierError, TierFull
from memplan.residency import Tier
from tests.conftest import run_threads

KiB, MiB = 1 << 10, 1 << 20


def _all_dtypes() -> list[torch.dtype]:
    found = {getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)}
    return sorted(found, key=str)


ALL_DTYPES = _all_dtypes()


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bits of ``dtype`` (NaN payloads included); bools are 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=g)
    if dtype is torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality: dtype, shape and every byte (so NaNs compare equal to themselves)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_bytes = [t.contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
    return bool(torch.equal(*as_bytes))


class TierContract:
    """What every tier promises. Subclasses define :meth:`make`."""

    def make(self, capacity: int) -> Tier:
        raise NotImplementedError

    @pytest.fixture
    def tier(self) -> Any:
        tier = self.make(256 * MiB)
        yield tier
        tier.close()

    @pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
    def test_round_trip_is_bit_exact_for_every_dtype(self, tier: Tier, dtype: torch.dtype) -> None:
        tensor = random_tensor(dtype, (3, 5), seed=hash(str(dtype)) % 1000)
        if tensor.is_quantized:
            with pytest.raises(TierError):
                tier.put("q", tensor)
            assert tier.used == 0 and "q" not in tier
            return
        tier.put("t", tensor)
        assert same_bits(tier.get("t"), tensor)

    @pytest.mark.parametrize(
        "make_tensor",
        [
            lambda: torch.tensor(3.5),  # 0-d
            lambda: torch.empty(0, 7, dtype=torch.bfloat16),  # empty
            lambda: torch.arange(48, dtype=torch.float32).reshape(6, 8).t(),  # transposed
            lambda: torch.arange(96, dtype=torch.int16).reshape(8, 12)[1::3, ::2],  # strided slice
            lambda: random_tensor(torch.float16, (3, 700_000)),  # several MiB, above the 1 MiB class
        ],
        ids=["0-d", "empty", "transposed", "strided", "large"],
    )
    def test_odd_shapes_round_trip(self, tier: Tier, make_tensor: Any) -> None:
        tensor = make_tensor()
        tier.put("odd", tensor)
        back = tier.get("odd")
        assert same_bits(back, tensor)
        assert back.is_contiguous()

    def test_stored_copy_is_independent_of_the_source(self, tier: Tier) -> None:
        source = torch.ones(16)
        tier.put("k", source)
        source.zero_()
        assert torch.equal(tier.get("k"), torch.ones(16))

    def test_a_returned_tensor_belongs_to_the_caller(self, tier: Tier) -> None:
        """Dropping a key and putting others (which may reuse its room) never changes what a
        caller already holds: pooled or cached memory is not recycled under a live tensor."""
        for n in (1000, 70_000):  # pooled size classes both
            tier.put("a", torch.ones(n))
            held = tier.get("a")  # held as it is, with no view of it taken
            tier.put("v", torch.ones(n))
            view = tier.get("v")[10:20]  # only a view of it held
            tier.drop("a")
            tier.drop("v")
            for i in range(4):
                tier.put(f"b{i}", torch.full((n,), 7.0))
            assert torch.equal(held, torch.ones(n)) and torch.equal(view, torch.ones(10))
            for i in range(4):
                tier.drop(f"b{i}")

    def test_a_returned_tensor_is_unchanged_by_puts_of_other_keys(self, tier: Tier) -> None:
        tier.put("a", torch.arange(1000, dtype=torch.int32))
        held = tier.get("a")
        tier.put("b", torch.zeros(1000, dtype=torch.int32))
        tier.drop("b")
        tier.put("c", torch.full((1000,), -1, dtype=torch.int32))
        assert torch.equal(held, torch.arange(1000, dtype=torch.int32))

    def test_a_failed_drop_keeps_the_key_and_its_bytes(self, tier: Tier) -> None:
        """Accounting follows what the tier really holds: a drop whose I/O fails leaves the key
        there, charged, and a later drop can finish the job."""
        nbytes = tier.put("k", torch.ones(64))

        def fail(key: str, handle: Any) -> None:
            raise TierError(tier.name, key, "injected delete failure")

        real = tier._discard
        tier._discard = fail  # type: ignore[method-assign]
        with pytest.raises(TierError):
            tier.drop("k")
        assert "k" in tier and tier.used == nbytes
        tier._discard = real  # type: ignore[method-assign]
        assert tier.drop("k") == nbytes and tier.used == 0

    def test_capacity_is_enforced_and_a_refused_put_changes_nothing(self) -> None:
        tier = self.make(256 * KiB)
        tier.put("small", torch.zeros(1000, dtype=torch.uint8))
        before = (tier.used, tier.keys())
        with pytest.raises(TierFull) as caught:
            tier.put("big", random_tensor(torch.uint8, (2 * MiB,)))  # incompressible
        assert caught.value.key == "big" and caught.value.needed > caught.value.available
        assert (tier.used, tier.keys()) == before and "big" not in tier
        assert tier.used <= tier.capacity

    def test_used_is_the_sum_of_what_each_put_reported(self, tier: Tier) -> None:
        sizes = {}
        for i, n in enumerate([1, 100, 70_000, 2_000_000, 0]):
            sizes[f"k{i}"] = tier.put(f"k{i}", torch.zeros(n, dtype=torch.uint8))
            assert tier.used == sum(sizes.values())
        for key in ["k1", "k3"]:
            assert tier.drop(key) == sizes.pop(key)
            assert tier.used == sum(sizes.values())
        stats = tier.stats()
        assert (stats.used, stats.entries) == (sum(sizes.values()), len(sizes))
        assert sorted(tier.keys()) == sorted(sizes)

    def test_drop_frees_and_forgets(self, tier: Tier) -> None:
        tier.put("k", torch.ones(10))
        tier.drop("k")
        assert "k" not in tier and tier.used == 0 and len(tier) == 0
        with pytest.raises(TierError):
            tier.get("k")

    def test_missing_key_is_a_tier_error_naming_the_key(self, tier: Tier) -> None:
        for op in (tier.get, tier.drop, tier.size_of):
            with pytest.raises(TierError) as caught:
                op("absent")
            assert caught.value.key == "absent" and caught.value.tier == tier.name

    def test_putting_a_key_twice_is_refused(self, tier: Tier) -> None:
        tier.put("k", torch.ones(4))
        with pytest.raises(TierError):
            tier.put("k", torch.zeros(4))
        assert torch.equal(tier.get("k"), torch.ones(4))

    @pytest.mark.parametrize("key", ["", "x" * 500])
    def test_bad_keys_are_refused(self, tier: Tier, key: str) -> None:
        with pytest.raises(TierError):
            tier.put(key, torch.ones(1))

    def test_keys_with_any_characters_work(self, tier: Tier) -> None:
        key = "model/layers.0/ü weight?*:"
        tier.put(key, torch.ones(3))
        assert torch.equal(tier.get(key), torch.ones(3)) and tier.keys() == [key]

    def test_concurrent_use_is_safe(self, tier: Tier) -> None:
        def worker(w: int) -> None:
            for i in range(15):
                key, tensor = f"w{w}-{i}", random_tensor(torch.float32, (64, 33), seed=w * 100 + i)
                tier.put(key, tensor)
                assert same_bits(tier.get(key), tensor)
                if i % 3:
                    tier.drop(key)

        errors = run_threads(worker, 8, timeout_s=60)
        assert not errors
        assert len(tier) == 8 * 5
        assert tier.used == sum(tier.size_of(k) for k in tier.keys())  # noqa: SIM118 - keys() is the API under test
