"""The host runtime is counted once (issue 21.2): a process that has imported torch holds its
runtime already, and the host's free memory says so; a plan made there must not add it again."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import memplan
from memplan import Device, Inventory, Policy, Workload

CPU = Device("cpu")


def test_a_real_probe_after_torch_is_imported_says_what_the_process_holds() -> None:
    import psutil
    import torch  # noqa: F401  (imported: the runtime is in use)

    inventory = memplan.probe()
    assert inventory.runtime_in_use is not None
    assert 0 < inventory.runtime_in_use <= psutil.Process().memory_info().rss
    assert memplan.probe("cpu=8GiB").runtime_in_use is None  # a simulated machine has no process


def test_a_probe_before_torch_is_imported_leaves_the_runtime_to_the_plan() -> None:
    code = "import memplan, json; print(json.dumps(memplan.probe().to_dict()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["runtime_in_use"] is None


def test_a_runtime_in_use_is_not_counted_again(tiny_llama: Path) -> None:
    checkpoint, workload, policy = memplan.inspect(tiny_llama), Workload(context=64), Policy()
    fresh = memplan.probe("cpu=8GiB")
    peaks = {}
    for held in (None, 220 << 20, 700 << 20):  # not yet, torch alone, everything and more
        inventory = dataclasses.replace(fresh, runtime_in_use=held)
        chosen = memplan.plan(checkpoint, inventory, workload, policy)
        peaks[held] = chosen.estimate.on(CPU).peak
    assert peaks[None] - peaks[220 << 20] == 220 << 20  # what is still to import is still counted
    assert peaks[None] - peaks[700 << 20] == policy.overheads.host_runtime  # never below none
    in_use = dataclasses.replace(fresh, runtime_in_use=700 << 20)
    before = memplan.plan(checkpoint, fresh, workload, policy)
    after = memplan.plan(checkpoint, in_use, workload, policy)
    assert "in use already" in after.explain() and "not loaded when probed" in before.explain()
    assert Inventory.from_dict(in_use.to_dict()) == in_use
