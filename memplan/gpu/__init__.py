"""Devices and their memory: the device model, ``probe()`` and per-device budgets.

``probe()`` is the face; the private modules behind it (``_host``, ``_nvml``, ``_torch``,
``_disk``, ``_simulated``) each measure one source and take their roots as parameters.
"""

from memplan.gpu import _disk, _host, _nvml, _torch  # noqa: F401  (register the probes)
from memplan.gpu._base import Probe, ProbeResult, get_probe, probe_names, register_probe
from memplan.gpu._disk import default_spill_dir
from memplan.gpu._host import CgroupLimit, read_cgroup_limit
from memplan.gpu._render import render_inventory
from memplan.gpu._simulated import SIMULATE_ENV, parse_simulation, simulation_from_env
from memplan.gpu.allocator import Allocator, DeviceUsage, Reservation, mapped_oom
from memplan.gpu.device import (
    ACCELERATOR_KINDS,
    Device,
    DeviceKind,
    DeviceMemory,
    Inventory,
    MemorySource,
    ProbeProblem,
)
from memplan.gpu.probe import DEFAULT_PROBES, default_probes, measure, probe

__all__ = [
    "ACCELERATOR_KINDS",
    "DEFAULT_PROBES",
    "SIMULATE_ENV",
    "Allocator",
    "CgroupLimit",
    "Device",
    "DeviceKind",
    "DeviceMemory",
    "DeviceUsage",
    "Inventory",
    "MemorySource",
    "Probe",
    "ProbeProblem",
    "ProbeResult",
    "Reservation",
    "default_probes",
    "default_spill_dir",
    "get_probe",
    "mapped_oom",
    "measure",
    "parse_simulation",
    "probe",
    "probe_names",
    "read_cgroup_limit",
    "register_probe",
    "render_inventory",
    "simulation_from_env",
]
