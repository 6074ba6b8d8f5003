"""``estimate(checkpoint, workload, strategy) -> Estimate``: bytes per device, by what holds them.

Weights (by dtype or quantized format), KV cache, the transient peak of one layer's forward,
buffers a loaded model keeps (a streaming arena, bitsandbytes' runtime, the load's own threads
and modules), the staging a load holds only while it reads, runtime overhead, and a learned
correction from peaks measured on earlier loads. A load's staging is gone before the first
forward: a device's peak is the larger of the two, never their sum. Pure: shapes in, numbers out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from memplan.gpu.device import Device
from memplan.planner.corrections import Corrections
from memplan.planner.layouts import Ledger, lay_out
from memplan.planner.model import Checkpoint
from memplan.planner.strategies import Strategy
from memplan.planner.workload import Overheads, Workload

__all__ = ["DeviceEstimate", "Estimate", "estimate"]


@dataclass(frozen=True)
class DeviceEstimate:
    device: Device
    weights: int = 0
    kv_cache: int = 0
    activations: int = 0
    buffers: int = 0  # held while the model lives (arena, runtimes)
    overhead: int = 0
    correction: int = 0
    staging: int = 0  # held only while the load reads: gone before the first forward

    @property
    def peak(self) -> int:
        running = max(self.kv_cache + self.activations, self.staging)
        return self.weights + self.buffers + running + self.overhead + self.correction

    @property
    def at_load(self) -> int:
        """The uncorrected part a load alone reaches: no KV cache or activations until a forward runs."""
        return self.weights + self.buffers + self.staging + self.overhead


@dataclass(frozen=True)
class Estimate:
    strategy: Strategy
    devices: tuple[DeviceEstimate, ...]
    notes: tuple[str, ...] = ()

    def on(self, device: Device) -> DeviceEstimate:
        for d in self.devices:
            if d.device == device:
                return d
        return DeviceEstimate(device)

    @property
    def total(self) -> int:
        return sum(d.peak for d in self.devices)


def estimate(
    checkpoint: Checkpoint,
    workload: Workload,
    strategy: Strategy,
    *,
    overheads: Overheads | None = None,
    corrections: Corrections | None = None,
) -> Estimate:
    """Peak bytes per device for loading ``checkpoint`` with ``strategy`` and running ``workload``."""
    overheads = overheads or Overheads()
    workload = workload.for_model(checkpoint)
    ledger = Ledger(overheads)
    ledger.add(Device("cpu"), buffers=overheads.load_runtime)  # the host always pays the runtimes
    lay_out(checkpoint, workload, strategy, ledger)
    for module, nbytes in checkpoint.computed_buffers:  # they live where their module runs
        ledger.add(strategy.runs_on(module), buffers=nbytes)
    devices = [_finish(device, parts, overheads) for device, parts in sorted(ledger.parts.items())]
    if corrections is not None:
        key = strategy.correction_key
        devices = [
            _corrected(d, corrections.factor(checkpoint.fingerprint, key, d.device.kind)) for d in devices
        ]
    return Estimate(strategy, tuple(devices), checkpoint.notes + tuple(ledger.notes) + _notes(checkpoint))


def _notes(checkpoint: Checkpoint) -> tuple[str, ...]:
    """What the estimate leaves out for this checkpoint."""
    if checkpoint.components:
        return (
            "a diffusers pipeline: every component's weights; its denoising activations are not estimated",
        )
    if not _has_attention_facts(checkpoint):
        return ("no usable config.json: KV cache and activations are not estimated",)
    return ()


def _has_attention_facts(checkpoint: Checkpoint) -> bool:
    """Whether config.json gave the model's (or any stack's) attention shape."""
    architectures = (checkpoint.architecture, *(s.architecture for s in checkpoint.stacks))
    return any(a.head_dim is not None for a in architectures)


def _finish(device: Device, parts: dict[str, int], overheads: Overheads) -> DeviceEstimate:
    weights, kv, act, buffers = parts["weights"], parts["kv_cache"], parts["activations"], parts["buffers"]
    staging = parts["staging"]
    held = weights + buffers + max(kv + act, staging)
    slack = int(overheads.allocator_slack * held) if device.is_accelerator else 0
    return DeviceEstimate(device, weights, kv, act, buffers, overheads.fixed(device) + slack, staging=staging)


def _corrected(d: DeviceEstimate, factor: float) -> DeviceEstimate:
    return replace(d, correction=round(d.peak * (factor - 1)))
