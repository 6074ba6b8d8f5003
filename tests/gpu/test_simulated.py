import pytest

import memplan
from memplan import Device, SimulationSpecError
from memplan.gpu import SIMULATE_ENV, parse_simulation

GiB = 2**30


def test_spec_from_design_is_reported_exactly() -> None:
    inv = memplan.probe("cuda:0=24GiB@20GiB,cuda:1=24GiB,cpu=64GiB,disk=2TiB")
    assert inv.simulated
    assert [(str(m.device), m.total, m.free, m.source) for m in inv] == [
        ("cuda:0", 24 * GiB, 20 * GiB, "simulated"),
        ("cuda:1", 24 * GiB, 24 * GiB, "simulated"),
        ("cpu", 64 * GiB, 64 * GiB, "simulated"),
        ("disk", 2 * 2**40, 2 * 2**40, "simulated"),
    ]


def test_spec_tolerates_spaces_case_and_any_order() -> None:
    inv = parse_simulation(" CPU = 8 GiB , cuda:1=1GB@0.5GB, cuda=2G ")
    assert inv[Device("cuda", 1)].free == 500_000_000
    assert inv[Device("cuda", 0)].total == 2 * GiB
    assert inv[Device("cpu")].total == 8 * GiB


def test_mps_and_remote_kinds() -> None:
    inv = parse_simulation("mps=36GiB@30GiB,cpu=48GiB,remote=1PiB")
    assert inv[Device("mps")].free == 30 * GiB
    assert Device("remote") in inv


def test_environment_variable_replaces_real_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SIMULATE_ENV, "cuda:0=80GiB,cpu=256GiB")
    inv = memplan.probe()
    assert inv.simulated and [str(m.device) for m in inv] == ["cuda:0", "cpu"]
    # an explicit spec wins over the environment
    assert [str(m.device) for m in memplan.probe("cpu=1GiB")] == ["cpu"]


def test_blank_environment_variable_means_real_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SIMULATE_ENV, "  ")
    assert not memplan.probe().simulated


MALFORMED = [
    ("", "", "empty"),
    ("   ", "", "empty"),
    ("cuda:0=24GiB,,cpu=1GiB", "<entry 2>", "empty"),
    ("cuda:0=24GiB,", "<entry 2>", "empty"),
    ("tpu:0=24GiB", "tpu:0=24GiB", "unknown kind"),
    ("gpu=24GiB", "gpu=24GiB", "unknown kind"),
    ("cuda:0=24GiB,cuda:0=16GiB", "cuda:0=16GiB", "listed twice"),
    ("cuda=24GiB,cuda:0=16GiB", "cuda:0=16GiB", "listed twice"),
    ("cuda:0=24 parsecs", "cuda:0=24 parsecs", "bad size"),
    ("cuda:0=-4GiB", "cuda:0=-4GiB", "negative"),
    ("cuda:0=nan", "cuda:0=nan", "bad size"),
    ("cuda:0=", "cuda:0=", "bad size"),
    ("cuda:0=20GiB@24GiB", "cuda:0=20GiB@24GiB", "FREE is larger than TOTAL"),
    ("cuda:0=24GiB@", "cuda:0=24GiB@", "'@' must be followed"),
    ("cuda:0", "cuda:0", "expected KIND"),
    ("=24GiB", "=24GiB", "expected KIND"),
    ("cuda:x=24GiB", "cuda:x=24GiB", "index must be"),
    ("cuda:-1=24GiB", "cuda:-1=24GiB", "index must be"),
    ("cpu:1=64GiB", "cpu:1=64GiB", "one cpu"),
    ("mps:1=64GiB", "mps:1=64GiB", "one mps"),
    ("cuda:1=24GiB,cpu=8GiB", "cuda:0", "cuda:0 is missing"),
    ("cuda:0=1GiB,cuda:2=1GiB", "cuda:1", "cuda:1 is missing"),
    ("cuda:0=24GiB,mps=16GiB", "cuda:0=24GiB,mps=16GiB", "not both"),
    ("rm -rf /", "rm -rf /", "expected KIND"),
    ("cuda:0=24GiB;cpu=8GiB", "cuda:0=24GiB;cpu=8GiB", "bad size"),
    ("cuda:0=24GiB=1GiB", "cuda:0=24GiB=1GiB", "bad size"),
    ("cuda:0=1GiB@2GiB@3GiB", "cuda:0=1GiB@2GiB@3GiB", "bad size"),
]


@pytest.mark.parametrize(("spec", "entry", "reason"), MALFORMED)
def test_malformed_spec_names_the_entry(spec: str, entry: str, reason: str) -> None:
    with pytest.raises(SimulationSpecError) as info:
        memplan.probe(spec)
    error = info.value
    assert error.entry == entry
    assert reason in error.reason
    assert repr(entry) in str(error)
    assert error.spec == spec


def test_there_are_at_least_fifteen_malformed_specs() -> None:
    assert len({spec for spec, _, _ in MALFORMED}) >= 15
