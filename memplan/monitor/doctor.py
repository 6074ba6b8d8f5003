"""``memplan doctor``: the environment checks a user would otherwise do by hand.

Every check reads the machine through :class:`Environment`, whose fields are the roots (the
pynvml module, torch, cgroup reader, spill directory, rlimit reader...) so tests can hand in a
broken machine. Each finding is ok / warn / fail with one line of advice.
"""

from __future__ import annotations

import os
import resource
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from memplan._bnb import import_bitsandbytes
from memplan.units import format_size

__all__ = ["Environment", "Finding", "diagnose", "model_findings"]

Status = Literal["ok", "warn", "fail"]
GiB = 1 << 30


@dataclass(frozen=True)
class Finding:
    check: str
    status: Status
    detail: str
    advice: str = ""


def _pynvml() -> Any:
    import pynvml

    return pynvml


def _torch() -> Any:
    import torch

    return torch


def _cgroup_limit() -> int | None:
    from memplan.gpu import read_cgroup_limit

    found = read_cgroup_limit(Path("/sys/fs/cgroup"), Path("/proc/self/cgroup"))
    return found.limit if found else None


def _physical_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def _swap() -> tuple[int, int]:
    import psutil

    swap = psutil.swap_memory()
    return int(swap.total), int(swap.used)


def _bitsandbytes() -> str:
    return str(import_bitsandbytes().__version__)


def _bnb_kernels() -> str:
    """What the missing ``kernels`` package costs, where it costs anything: bitsandbytes looks for
    the kernels-community 4-bit CPU gemm only on CPUs with AVX512-BF16 (and logs its absence)."""
    import importlib.util

    functional: Any = import_bitsandbytes().functional
    if not functional.has_avx512bf16() or importlib.util.find_spec("kernels") is not None:
        return ""
    return (
        "this CPU has AVX512-BF16 and the `kernels` package is not installed: 4-bit layers run "
        "bitsandbytes' own native CPU kernel, not the kernels-community one (`pip install kernels`)"
    )


def _memlock() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return -1 if soft == resource.RLIM_INFINITY else int(soft)


def _spill_dir() -> Path:
    from memplan.gpu import default_spill_dir

    return default_spill_dir()


@dataclass
class Environment:
    """Where each check looks. The defaults read this machine."""

    nvml: Callable[[], Any] = _pynvml
    torch: Callable[[], Any] = _torch
    cgroup_limit: Callable[[], int | None] = _cgroup_limit
    physical_ram: Callable[[], int] = _physical_ram
    swap: Callable[[], tuple[int, int]] = _swap
    bitsandbytes: Callable[[], str] = _bitsandbytes
    bnb_kernels: Callable[[], str] = _bnb_kernels
    memlock: Callable[[], int] = _memlock
    spill_dir: Path = field(default_factory=_spill_dir)


def _nvml_count(env: Environment) -> tuple[Finding, int | None]:
    try:
        nvml = env.nvml()
        nvml.nvmlInit()
        count = int(nvml.nvmlDeviceGetCount())
        driver = nvml.nvmlSystemGetDriverVersion()
    except ImportError:
        return Finding("nvml", "warn", "pynvml is not installed", "pip install nvidia-ml-py"), None
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        if "LibraryNotFound" in text or "Driver Not Loaded" in text or "libnvidia-ml" in text:
            return Finding("nvml", "ok", "no NVIDIA driver here (fine on a CPU or Apple machine)"), 0
        return Finding("nvml", "fail", f"NVML failed: {text}", "check the driver with nvidia-smi"), None
    return Finding("nvml", "ok", f"{count} GPU(s), driver {driver}"), count


def _torch_agrees(env: Environment, nvml_count: int | None) -> Finding:
    try:
        torch = env.torch()
    except ImportError:
        return Finding("torch", "fail", "torch is not installed", "pip install torch")
    cuda = int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if nvml_count and not cuda:
        advice = (
            "install a CUDA build of torch" if torch.version.cuda is None else "check CUDA_VISIBLE_DEVICES"
        )
        return Finding(
            "torch",
            "fail",
            f"NVML sees {nvml_count} GPU(s), torch sees none (torch {torch.__version__})",
            advice,
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if nvml_count is not None and cuda and cuda != nvml_count and visible is None:
        return Finding(
            "torch", "warn", f"torch sees {cuda} GPU(s), NVML {nvml_count}",
            "set CUDA_DEVICE_ORDER=PCI_BUS_ID so both number devices alike",
        )  # fmt: skip
    what = f"{cuda} CUDA device(s)" if cuda else ("MPS" if mps else "CPU only")
    return Finding("torch", "ok", f"torch {torch.__version__}: {what}")


def _cgroup(env: Environment) -> Finding:
    limit, ram = env.cgroup_limit(), env.physical_ram()
    if limit is not None and limit < ram:
        return Finding(
            "cgroup", "warn", f"container limit {format_size(limit)} is below the RAM, {format_size(ram)}",
            "memplan plans against the limit; raise it (docker --memory) to plan for more",
        )  # fmt: skip
    return Finding("cgroup", "ok", f"no memory limit below the machine's {format_size(ram)}")


def _swap_check(env: Environment) -> Finding:
    total, used = env.swap()
    if total and used > total // 2:
        return Finding(
            "swap", "warn", f"{format_size(used)} of {format_size(total)} swap in use",
            "the host is short of RAM: streamed loads will thrash; free memory or plan for less",
        )  # fmt: skip
    return Finding(
        "swap", "ok", f"{format_size(total)} swap, {format_size(used)} used" if total else "no swap"
    )


def _spill(env: Environment) -> Finding:
    path = env.spill_dir
    existing = next((p for p in (path, *path.parents) if p.exists()), path)
    if not os.access(existing, os.W_OK):
        return Finding(
            "spill dir", "fail", f"{existing} is not writable", "set MEMPLAN_SPILL_DIR to a writable folder"
        )
    free = shutil.disk_usage(existing).free
    if path.exists() and path.stat().st_mode & 0o077:
        return Finding(
            "spill dir", "warn", f"{path} is readable by others (mode {path.stat().st_mode & 0o777:o})",
            f"chmod 700 {path}: spilled weights are private",
        )  # fmt: skip
    if free < 10 * GiB:
        return Finding(
            "spill dir",
            "warn",
            f"{path}: only {format_size(free)} free",
            "point MEMPLAN_SPILL_DIR at a bigger disk",
        )
    return Finding("spill dir", "ok", f"{path}: {format_size(free)} free")


def _bnb(env: Environment) -> Finding:
    try:
        version = env.bitsandbytes()
    except Exception as exc:  # a broken install raises anything from OSError to RuntimeError
        return Finding(
            "bitsandbytes", "warn", f"not usable: {type(exc).__name__}: {exc}", "pip install 'memplan[quant]'"
        )
    note = env.bnb_kernels()
    detail = f"bitsandbytes {version}: int8 and nf4 available" + (f"; note: {note}" if note else "")
    return Finding("bitsandbytes", "ok", detail)


def _pinned(env: Environment) -> Finding:
    limit = env.memlock()
    if limit != -1 and limit < GiB:
        return Finding(
            "pinned memory", "warn", f"ulimit -l is {format_size(limit)}",
            "raise it (ulimit -l unlimited, or docker --ulimit memlock=-1) for pinned host buffers",
        )  # fmt: skip
    return Finding("pinned memory", "ok", "ulimit -l " + ("unlimited" if limit == -1 else format_size(limit)))


def diagnose(env: Environment | None = None) -> list[Finding]:
    """Every environment check, in the order a user would debug them."""
    env = env or Environment()
    nvml, count = _nvml_count(env)
    return [
        nvml,
        _torch_agrees(env, count),
        _cgroup(env),
        _swap_check(env),
        _spill(env),
        _bnb(env),
        _pinned(env),
    ]


def model_findings(model: str | os.PathLike[str], simulate: str | None = None) -> list[Finding]:
    """The plan for ``model`` here, and what would buy a better strategy."""
    from memplan.errors import DoesNotFit, MemplanError
    from memplan.gpu import probe
    from memplan.planner import inspect, plan

    try:
        checkpoint = inspect(model)
        chosen = plan(checkpoint, probe(simulate))
    except DoesNotFit as exc:
        return [Finding("plan", "fail", str(exc), "use a machine with more memory, or a smaller model")]
    except MemplanError as exc:
        return [Finding("plan", "fail", str(exc), "check the model path")]
    decision = chosen.chosen
    findings = [Finding("plan", "ok", f"{decision.candidate}: {decision.reason}")]
    better = [d for d in chosen.decisions[: chosen.chosen_index] if d.shortfall]
    for d in better:
        advice = f"free or add {format_size(d.shortfall)} to load it {d.candidate}"
        findings.append(Finding(f"for {d.candidate}", "warn", d.reason, advice))
    return findings
