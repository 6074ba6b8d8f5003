"""``probe()``: one inventory from every source, or from a simulation spec."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from memplan._torch_imported import imported_torch
from memplan.gpu._base import Probe, ProbeResult, get_probe
from memplan.gpu._simulated import parse_simulation, simulation_from_env
from memplan.gpu.device import Device, DeviceMemory, Inventory, ProbeProblem

__all__ = ["DEFAULT_PROBES", "default_probes", "measure", "probe"]

DEFAULT_PROBES: tuple[str, ...] = ("host", "nvml", "torch.cuda", "mps", "disk")


def default_probes(*, spill_dir: Path | None = None) -> list[Probe]:
    options: dict[str, dict[str, object]] = {"disk": {"spill_dir": spill_dir}}
    return [get_probe(name, **options.get(name, {})) for name in DEFAULT_PROBES]


def probe(
    simulate: str | None = None,
    *,
    probes: Sequence[Probe] | None = None,
    spill_dir: Path | None = None,
) -> Inventory:
    """Measure this machine's memory, or describe a simulated one.

    ``simulate`` (else ``$MEMPLAN_SIMULATE``) replaces every real probe with the spec. A source
    that fails is listed in ``Inventory.problems``; the others' figures are still returned.
    """
    spec = simulate if simulate is not None else simulation_from_env()
    if spec is not None:
        return parse_simulation(spec)
    inventory = measure(probes if probes is not None else default_probes(spill_dir=spill_dir))
    return replace(inventory, runtime_in_use=_runtime_in_use())


def _runtime_in_use() -> int | None:
    """This process's resident bytes, if torch is imported: its runtime is in use, and counted
    in the host's used memory (a plan must not count it a second time)."""
    if imported_torch() is None:
        return None
    import psutil

    return int(psutil.Process().memory_info().rss)


def measure(probes: Sequence[Probe]) -> Inventory:
    """One inventory from ``probes``, ignoring any simulation: what those sources see now."""
    return _merge([_run(p) for p in probes])


def _run(source: Probe) -> ProbeResult:
    try:
        return source.measure()
    except Exception as exc:  # a probe's own bug must not cost the other sources' figures
        return ProbeResult(problems=[ProbeProblem(source.name, f"probe failed: {exc!r}")])


def _combine(first: DeviceMemory, second: DeviceMemory) -> DeviceMemory:
    """NVML and torch both see CUDA devices: torch's free/total are this process's view, NVML
    alone knows what other processes hold and the device's name."""
    torch_view, other = (first, second) if first.source == "torch" else (second, first)
    if torch_view.source != "torch":
        return first
    return replace(
        torch_view,
        reserved_by_others=max(torch_view.reserved_by_others, other.reserved_by_others),
        name=other.name or torch_view.name,
    )


def _merge(results: list[ProbeResult]) -> Inventory:
    memories: dict[Device, DeviceMemory] = {}
    problems: list[ProbeProblem] = []
    for result in results:
        problems.extend(result.problems)
        for memory in result.memories:
            known = memories.get(memory.device)
            memories[memory.device] = memory if known is None else _combine(known, memory)
    return Inventory(tuple(memories.values()), tuple(problems))
