"""memplan's own tests use its pytest plugin the way users do."""

from __future__ import annotations

import os

import pytest

import memplan
from memplan.gpu import SIMULATE_ENV

pytest_plugins = ["pytester"]


@pytest.mark.memplan_devices("cuda:0=40GiB,cuda:1=40GiB,cpu=128GiB")
def test_the_marker_makes_memplan_see_the_simulated_machine() -> None:
    inventory = memplan.probe()
    assert inventory.simulated and [str(m.device) for m in inventory.accelerators] == ["cuda:0", "cuda:1"]
    assert os.environ[SIMULATE_ENV] == "cuda:0=40GiB,cuda:1=40GiB,cpu=128GiB"


@pytest.mark.memplan_devices("cuda:0=2GiB,cpu=8GiB")
def test_the_fixture_follows_the_marker(simulated_devices: memplan.Inventory) -> None:
    assert simulated_devices[memplan.Device("cuda", 0)].total == 2 << 30


def test_without_a_marker_nothing_is_simulated_unless_asked() -> None:
    assert os.environ.get(SIMULATE_ENV) is None


def test_a_bad_spec_fails_before_the_test_with_the_entry_named(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.memplan_devices("cuda:0=24GiB,cpu=lots")
        def test_x():
            pass
        """
    )
    result = pytester.runpytest()  # the plugin loads from its entry point
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*bad simulated-device spec entry 'cpu=lots'*"])
