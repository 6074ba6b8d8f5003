"""What a load did: the strategy, the fallbacks on the way, time, bytes read, and measured peaks."""

from __future__ import annotations

from dataclasses import dataclass, field

from memplan._codec import encode
from memplan._periodic import Periodic
from memplan.gpu import Device
from memplan.planner import Estimate, Strategy, describe
from memplan.units import format_size

__all__ = ["Fallback", "LoadReport", "RssSampler"]


@dataclass(frozen=True)
class Fallback:
    """A strategy that was tried and given up, and why."""

    strategy: Strategy
    reason: str


@dataclass(frozen=True)
class LoadReport:
    """Attached to a loaded model as ``model.memplan.report``.

    ``peaks`` are measured during the load: the allocator's high-water mark on accelerators
    (``torch.cuda.max_memory_allocated`` on real CUDA), sampled process RSS on the host.
    ``unused_tensors`` are checkpoint tensors the model has no place for (a warning said so).
    ``newly_initialized`` are parameters the checkpoint lacks (a new task head), initialised as
    transformers does (a warning said so): train them before use.
    """

    model: str
    strategy: Strategy
    estimate: Estimate
    fallbacks: tuple[Fallback, ...]
    seconds: float
    bytes_read: int
    peaks: tuple[tuple[Device, int], ...]
    simulated: bool
    notes: tuple[str, ...] = field(default=())
    unused_tensors: tuple[str, ...] = field(default=())  # in the checkpoint, with no place in the model
    newly_initialized: tuple[str, ...] = field(default=())  # in the model, not in the checkpoint

    def peak(self, device: Device) -> int:
        return dict(self.peaks).get(device, 0)

    def to_dict(self) -> dict[str, object]:
        return encode(self)  # type: ignore[no-any-return]

    def explain(self) -> str:
        rate = self.bytes_read / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"{self.model}: {describe(self.strategy)}" + (" [simulated devices]" if self.simulated else ""),
            f"  loaded in {self.seconds:.2f} s, read {format_size(self.bytes_read)}"
            f" ({format_size(int(rate))}/s)",
        ]
        for device, measured in self.peaks:
            planned = self.estimate.on(device).peak
            lines.append(
                f"  {device!s:7} peak {format_size(measured):>10}   estimated {format_size(planned):>10}"
            )
        lines += [f"  fell back from {describe(f.strategy)}: {f.reason}" for f in self.fallbacks]
        lines += [f"  note: {note}" for note in self.notes]
        if self.unused_tensors:
            lines.append(f"  not loaded (no place in the model): {', '.join(self.unused_tensors)}")
        if self.newly_initialized:
            lines.append(f"  newly initialised (not in the checkpoint): {', '.join(self.newly_initialized)}")
        return "\n".join(lines)


class RssSampler:
    """Samples this process's resident set on a thread; ``peak`` is the highest seen."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._process = psutil.Process()
        self.start = self._process.memory_info().rss
        self.peak = self.start
        self._worker = Periodic("memplan-rss", interval, self._sample)

    def _sample(self) -> None:
        self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._worker.stop()
        self._sample()
