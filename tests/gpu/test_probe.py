"""probe(): sources merged into one inventory; a failing source costs only its own figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

from memplan import Device, probe
from memplan.gpu import Probe, ProbeResult
from memplan.gpu._disk import DiskProbe
from memplan.gpu._nvml import NvmlProbe
from memplan.gpu._torch import TorchCudaProbe
from tests.gpu.fakes import FakeGpu, FakeNvml, FakeTorchCuda, GiB, fake_torch


class Exploding(Probe):
    name = "exploding"

    def measure(self) -> ProbeResult:
        raise ZeroDivisionError("bug in a probe")


def test_torch_figures_replace_nvml_but_keep_others_and_name() -> None:
    nvml = NvmlProbe(
        nvml=FakeNvml([FakeGpu("GPU-a", total=24 * GiB, free=18 * GiB, processes=[(1, 3 * GiB)])]),
        read_env=False,
        own_pid=2,
    )
    torch_cuda = TorchCudaProbe(torch=fake_torch(FakeTorchCuda([(17 * GiB, 24 * GiB)])))
    inv = probe(probes=[nvml, torch_cuda])
    memory = inv[Device("cuda", 0)]
    assert (memory.free, memory.source, memory.reserved_by_others) == (17 * GiB, "torch", 3 * GiB)
    assert memory.name == "NVIDIA H100 80GB HBM3"


def test_a_failing_probe_is_reported_and_others_still_measured(tmp_path: Path) -> None:
    inv = probe(probes=[Exploding(), DiskProbe(spill_dir=tmp_path / "not" / "yet")])
    assert Device("disk") in inv
    assert [p.source for p in inv.problems] == ["exploding"]
    assert "bug in a probe" in inv.problems[0].message


def test_disk_probe_reports_the_spill_filesystem(tmp_path: Path) -> None:
    (memory,) = DiskProbe(spill_dir=tmp_path / "spill").measure().memories
    assert memory.free <= memory.total
    assert abs(memory.free - psutil.disk_usage(str(tmp_path)).free) < 512 * 2**20


def test_spill_dir_from_environment(monkeypatch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MEMPLAN_SPILL_DIR", str(tmp_path))
    assert DiskProbe().spill_dir == tmp_path


def test_this_machine_via_the_cli_matches_psutil() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MEMPLAN_SIMULATE"}
    out = subprocess.run(
        [sys.executable, "-m", "memplan", "probe", "--json"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    report = json.loads(out.stdout)
    devices = {d["device"]: d for d in report["devices"]}
    assert not report["simulated"]
    cuda = [name for name in devices if name.startswith("cuda")]
    assert len(cuda) == len(NvmlProbe().measure().memories)  # none on a machine without a GPU
    assert devices["cpu"]["total"] <= psutil.virtual_memory().total
    assert devices["cpu"]["source"] in ("psutil", "cgroup")
