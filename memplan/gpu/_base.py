"""The probe contract and the registry that finds probes by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memplan.errors import InvalidOption
from memplan.gpu.device import DeviceMemory, ProbeProblem

__all__ = ["Probe", "ProbeResult", "get_probe", "probe_names", "register_probe"]


@dataclass
class ProbeResult:
    """What one source measured, and what it could not."""

    memories: list[DeviceMemory] = field(default_factory=list)
    problems: list[ProbeProblem] = field(default_factory=list)

    def problem(self, source: str, message: str) -> None:
        self.problems.append(ProbeProblem(source, message))


class Probe(ABC):
    """One source of memory figures. ``measure`` never raises for a broken source: it reports it."""

    name: str

    @abstractmethod
    def measure(self) -> ProbeResult: ...


_REGISTRY: dict[str, Callable[..., Probe]] = {}


def register_probe(name: str, factory: Callable[..., Probe]) -> None:
    _REGISTRY[name] = factory


def get_probe(name: str, **kwargs: Any) -> Probe:
    try:
        factory = _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise InvalidOption("probe", name, f"be one of the registered probes ({known})") from None
    return factory(**kwargs)


def probe_names() -> list[str]:
    return list(_REGISTRY)
