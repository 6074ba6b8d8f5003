"""A registration that fails partway (a write or the read-back fails, or Ctrl-C lands in the
middle) leaves nothing behind: no key it wrote stays on any tier, the books are where they were,
and the same name registered again serves its own tensors, never the failed attempt's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from memplan import Device, ResidencyManager, TierError
from memplan.residency.tiers.host import HostTier
from tests.residency.test_stateful import FailingTier, InjectedFaults

GPU = Device("cuda", 0)


class FailingHost(InjectedFaults, HostTier):
    """A compressed host tier (it decodes a fresh copy on every get, so it dedups by content)
    with injected faults."""


def interrupt(tier: str, key: str, why: str) -> BaseException:
    return KeyboardInterrupt(f"{tier} {key}: {why}")


def tiers() -> list[Any]:
    return [
        FailingTier(name="gpu", device=GPU, bandwidth=20e9),
        FailingHost("1MiB", compression="zstd", name="host"),
        FailingTier(name="disk", device=Device("disk"), bandwidth=2e9),
    ]


def books(rm: ResidencyManager) -> dict[str, Any]:
    """Everything a failed registration must leave as it found it."""
    for tier in rm.tiers:
        assert tier.used == rm.held_bytes(tier.name) == sum(tier.size_of(k) for k in tier.keys())  # noqa: SIM118
    return {
        "keys": {t.name: sorted(t.keys()) for t in rm.tiers},
        "used": {t.name: t.used for t in rm.tiers},
        "orphans": {t.name: rm.orphans(t.name) for t in rm.tiers},
        "saved": rm.stats().dedup_saved_bytes,
        "entries": sorted(rm.names()),
    }


def disarm(rm: ResidencyManager) -> None:
    for tier in rm.tiers:
        tier.fail_puts = tier.fail_gets = tier.fail_drops = 0


def assert_serves(rm: ResidencyManager, name: str, expected: dict[str, torch.Tensor]) -> None:
    with rm.use(name) as got:
        assert set(got) == set(expected)
        for key, tensor in expected.items():
            assert torch.equal(got[key], tensor), f"{name}.{key}: {got[key]} is not {tensor}"


@pytest.mark.parametrize("dedup", [True, False])
def test_a_failed_read_back_leaves_no_key_the_next_registration_of_that_name_reads(dedup: bool) -> None:
    rm = ResidencyManager(tiers(), dedup=dedup)
    rm.tiers[0].fail_gets = 1
    with pytest.raises(TierError, match="injected read failure"):
        rm.register("e0", {"t0": torch.randn(0, generator=torch.Generator().manual_seed(0))}, tier="gpu")
    assert "e0" not in rm
    assert rm.tiers[0].keys() == []
    fresh = {"t0": torch.randn(1, generator=torch.Generator().manual_seed(1))}
    rm.register("e0", {k: v.clone() for k, v in fresh.items()}, tier="gpu")
    assert_serves(rm, "e0", fresh)


def test_what_use_serves_is_what_the_registration_that_succeeded_was_given() -> None:
    """The sequence hypothesis found, without a tier named: each registration either fails and
    leaves nothing, or succeeds (elsewhere, if it must) and is what ``use`` serves."""
    rm = ResidencyManager(tiers())
    rm.tiers[0].fail_gets = 1
    served: dict[str, torch.Tensor] | None = None
    for size in (0, 1):
        tensors = {"t0": torch.randn(size, generator=torch.Generator().manual_seed(size))}
        copy = {k: v.clone() for k, v in tensors.items()}
        try:
            rm.register("e0", tensors)
        except Exception:  # a refusal is fine (the name is taken, or the tier failed)
            continue
        served = copy
    assert served is not None
    assert_serves(rm, "e0", served)
    assert rm.verify() == []


# -- every failure point of a registration -----------------------------------------------------

FAILURES = [
    # (the tier registered on, the operation there that fails, the how-manieth of them)
    *[(tier, "put", n) for tier in ("gpu", "host") for n in (1, 2, 3)],
    *[("gpu", "get", n) for n in (1, 2, 3)],  # only an addressable tier reads back what it got
]
ERRORS: dict[str, tuple[Callable[[str, str, str], BaseException], type[BaseException]]] = {
    "tier error": (TierError, TierError),
    "ctrl-c": (interrupt, KeyboardInterrupt),
}


@pytest.mark.parametrize("error", list(ERRORS))
@pytest.mark.parametrize(("target", "op", "at"), FAILURES)
@pytest.mark.parametrize("dedup", [True, False])
def test_a_registration_failing_at_any_point_leaves_the_tiers_and_books_as_they_were(
    dedup: bool, target: str, op: str, at: int, error: str
) -> None:
    rm = ResidencyManager(tiers(), dedup=dedup)
    shared = torch.ones(128)  # the same bytes as the failing entry's first tensor: one content key
    other = {"a": shared.clone(), "b": torch.full((64,), 2.0)}
    rm.register("other", {k: v.clone() for k, v in other.items()}, tier=target)
    before = books(rm)
    tier = rm.tiers[rm._tier_index(target)]
    tier.raises, kind = ERRORS[error]
    setattr(tier, f"fail_{op}s", 1)
    tier.passes[op] = at - 1
    tensors = {
        "t0": shared.clone(),
        "t1": torch.arange(100.0),
        "t2": torch.arange(50.0) * 3,
        "t3": torch.zeros(7),
    }
    given = dict(tensors)
    with pytest.raises(kind, match="injected (write|read) failure"):
        rm.register("e0", tensors, tier=target)
    assert "e0" not in rm
    assert books(rm) == before
    assert rm.verify() == []
    assert all(tensors[k] is given[k] and not given[k].is_meta for k in given)  # the caller's, untouched
    disarm(rm)
    fresh = {"t0": torch.full((3,), 7.0), "t1": torch.arange(4.0)}
    rm.register("e0", {k: v.clone() for k, v in fresh.items()}, tier=target)
    assert_serves(rm, "e0", fresh)
    assert_serves(rm, "other", other)
    assert rm.verify() == []


# -- the same for a move ------------------------------------------------------------------------


@pytest.mark.parametrize("error", list(ERRORS))
def test_a_move_whose_read_back_fails_leaves_the_entry_whole_where_it_was(error: str) -> None:
    gpu, host = FailingTier(name="gpu", device=GPU, bandwidth=20e9), FailingTier(name="host")
    rm = ResidencyManager([gpu, host])
    rm.register("e0", {"w": torch.arange(6.0)}, tier="gpu")
    with rm.use("e0") as got:
        got["w"].add_(1)  # written in place: only the gpu copy holds it
    host.raises, kind = ERRORS[error]
    host.fail_gets = 1
    with pytest.raises(kind, match="injected read failure"):
        rm.demote("e0", "host")
    assert rm.tier_of("e0") is gpu
    assert host.keys() == []
    books(rm)
    disarm(rm)
    assert_serves(rm, "e0", {"w": torch.arange(6.0) + 1})
    rm.demote("e0", "host")
    assert_serves(rm, "e0", {"w": torch.arange(6.0) + 1})
    rm.unregister("e0")
    assert gpu.keys() == host.keys() == []
    assert gpu.used == host.used == 0


@pytest.mark.parametrize("error", list(ERRORS))
def test_a_module_whose_registration_fails_keeps_its_own_parameters(error: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)).eval()
    model[2].weight = torch.nn.Parameter(model[2].weight)  # a parameter object of its own
    own = dict([*model.named_parameters(), *model.named_buffers()])
    x = torch.randn(3, 8)
    expected = model(x)
    rm = ResidencyManager(tiers())
    rm.tiers[0].raises, kind = ERRORS[error]
    rm.tiers[0].fail_gets, rm.tiers[0].passes["get"] = 1, 2
    with pytest.raises(kind):
        rm.register("m", model, tier="gpu")
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert after.keys() == own.keys() and all(after[name] is own[name] for name in own)
    assert torch.equal(model(x), expected)
    assert all(t.keys() == [] for t in rm.tiers)
    rm.register("m", model, tier="gpu")
    with rm.use("m") as served:
        assert torch.equal(served(x), expected)


def test_a_key_the_cleanup_cannot_free_is_an_orphan_no_later_registration_reads() -> None:
    rm = ResidencyManager(tiers())
    gpu = rm.tiers[0]
    gpu.fail_gets, gpu.fail_drops = 1, 100  # the read-back fails, and so does every drop
    with pytest.raises(TierError, match="injected read failure"):  # not the cleanup's failure
        rm.register("e0", {"t0": torch.zeros(4)}, tier="gpu")
    (stray,) = gpu.keys()
    assert rm.orphans("gpu") == [stray]
    books(rm)
    rm.register("e0", {"t0": torch.arange(4.0)}, tier="gpu")  # keys of its own: the stray is not one
    assert_serves(rm, "e0", {"t0": torch.arange(4.0)})
    gpu.fail_drops = 0
    rm.maintain()
    assert rm.orphans("gpu") == [] and stray not in gpu
    assert_serves(rm, "e0", {"t0": torch.arange(4.0)})
    books(rm)
