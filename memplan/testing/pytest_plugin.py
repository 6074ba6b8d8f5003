"""The memplan pytest plugin (registered through the ``pytest11`` entry point).

Mark a test ``@pytest.mark.memplan_devices("cuda:0=24GiB,cpu=64GiB")`` and everything memplan
does inside it (probe, plan, load, residency) sees those devices, on a CPU-only CI machine.
The ``simulated_devices`` fixture gives the test the inventory; ``simulated_allocator`` an
allocator whose budgets enforce it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from memplan.gpu import SIMULATE_ENV, Allocator, Inventory, probe

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["DEFAULT_SPEC", "simulated_allocator", "simulated_devices"]

DEFAULT_SPEC = "cuda:0=24GiB,cpu=64GiB,disk=1TiB"
MARKER = "memplan_devices"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(spec): run the test on simulated devices, e.g. 'cuda:0=24GiB,cpu=64GiB'"
    )


def _spec(request: pytest.FixtureRequest) -> str | None:
    marker = request.node.get_closest_marker(MARKER)
    if marker is None:
        return None
    if len(marker.args) != 1 or not isinstance(marker.args[0], str):
        raise pytest.UsageError(f"@pytest.mark.{MARKER} takes one spec string, e.g. 'cuda:0=24GiB,cpu=64GiB'")
    return str(marker.args[0])


@pytest.fixture(autouse=True)
def _memplan_devices_marker(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    spec = _spec(request)
    if spec is not None:
        probe(spec)  # a bad spec fails here, naming its entry, before the test runs
        monkeypatch.setenv(SIMULATE_ENV, spec)
    yield


@pytest.fixture
def simulated_devices(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Inventory:
    """The simulated inventory: the marker's spec, else a 24 GiB GPU and 64 GiB of host RAM."""
    spec = _spec(request) or DEFAULT_SPEC
    monkeypatch.setenv(SIMULATE_ENV, spec)
    return probe(spec)


@pytest.fixture
def simulated_allocator(simulated_devices: Inventory) -> Allocator:
    """Budgets for the simulated devices: placing more than a device holds raises DeviceOutOfMemory."""
    return Allocator(simulated_devices)
