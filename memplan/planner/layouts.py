"""How each strategy lays bytes out per device: one layout function per strategy type, registered
with :func:`layout`, so a new strategy is one new function here (and its class).

A layout adds to a :class:`Ledger` what each device holds: weights, KV cache, activations,
buffers a loaded model keeps, and the staging a load holds only while it reads.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from memplan.gpu.device import Device
from memplan.planner.model import Checkpoint
from memplan.planner.runtime import activation_bytes, kv_bytes_by_layer, kv_cache_bytes
from memplan.planner.strategies import Full, Quantized, Sharded, Strategy, Streamed
from memplan.planner.weights import (
    WeightFormat,
    largest_quantized,
    largest_read,
    largest_slot_bytes,
    layer_weight_bytes,
    module_weight_bytes,
    non_layer_weight_bytes,
    quantized_count,
    same_dtypes,
    tensor_bytes,
)
from memplan.planner.workload import Overheads, Workload

__all__ = ["Ledger", "lay_out", "layout", "window_staging"]

S = TypeVar("S", Full, Quantized, Sharded, Streamed)
Layout = Callable[[Checkpoint, Workload, S, "Ledger"], None]

_LAYOUTS: dict[type, Callable[[Checkpoint, Workload, Any, Ledger], None]] = {}


@dataclass
class Ledger:
    """Per-device sums while an estimate is built, with the overheads it charges and what the
    estimate should note."""

    overheads: Overheads
    parts: dict[Device, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    notes: list[str] = field(default_factory=list)

    def add(self, device: Device, **amounts: int) -> None:
        for part, amount in amounts.items():
            self.parts[device][part] += amount


def layout(kind: type[S]) -> Callable[[Layout[S]], Layout[S]]:
    """Register the decorated function as how strategies of type ``kind`` lay bytes out."""

    def register(function: Layout[S]) -> Layout[S]:
        _LAYOUTS[kind] = function
        return function

    return register


def lay_out(checkpoint: Checkpoint, workload: Workload, strategy: Strategy, ledger: Ledger) -> None:
    """Add to ``ledger`` what ``strategy`` places on each device, by its registered layout."""
    _LAYOUTS[type(strategy)](checkpoint, workload, strategy, ledger)


def window_staging(window: int, read: int, kept: int, largest: int) -> int:
    """Bytes a device holds in flight beyond its weights while a load reads ``read`` bytes
    through a read-ahead window of ``window``, ``kept`` of them staying there as read.

    The reader holds up to a window of tensors not yet placed; a tensor larger than the window is
    read alone, whole, once the window is empty, and the window fills behind it while the load
    converts it: ``in_flight`` is the window, or that tensor and a window. (The tensor the load
    converts counts in the window until it is placed: measured on 1.1B Llamas, int8 and nf4
    loads peaked 120 and 171 MiB above their final footprint through a 256 MiB window, where
    ``window (1 - q)`` gives 123 and 184.) Placing keeps ``q = kept / read`` of each byte read,
    so after ``c`` bytes the device holds ``q c + min(in_flight, read - c)``: a peak of the final
    weights plus ``in_flight (1 - q)`` (nothing above the weights where every byte stays: read
    in place)."""
    if read <= 0:
        return 0
    in_flight = min(window if largest <= window else largest + window, read)
    return int(in_flight * max(0.0, 1.0 - kept / read))


# --- one device ---------------------------------------------------------------------------


def _one_device(
    checkpoint: Checkpoint, workload: Workload, strategy: Full | Quantized, ledger: Ledger
) -> int:
    """Every weight, the KV cache and activations on the strategy's device, and the read-ahead
    staging on its way there; returns the bytes the device keeps of what it reads itself."""
    device = strategy.device
    weights = sum(module_weight_bytes(checkpoint, WeightFormat.of(strategy)).values())
    kv = kv_cache_bytes(checkpoint, workload, strategy.dtype)
    act = activation_bytes(checkpoint, workload, strategy.dtype)
    ledger.add(device, weights=weights, kv_cache=kv, activations=act)
    window, read, largest = strategy.read_ahead, checkpoint.nbytes, largest_read(checkpoint)
    if device.is_accelerator:  # every byte passes through the host on its way
        ledger.add(Device("cpu"), staging=window_staging(window, read, 0, largest))
        return 0
    ledger.add(device, staging=window_staging(window, read, weights, largest))
    return weights


@layout(Full)
def _full(checkpoint: Checkpoint, workload: Workload, strategy: Full, ledger: Ledger) -> None:
    kept = _one_device(checkpoint, workload, strategy, ledger)
    # A load reads into the weights themselves unless it casts: then one tensor as read beside its cast.
    if kept and not same_dtypes(checkpoint, strategy.dtype):
        ledger.add(strategy.device, staging=largest_read(checkpoint))


@layout(Quantized)
def _quantized(checkpoint: Checkpoint, workload: Workload, strategy: Quantized, ledger: Ledger) -> None:
    _one_device(checkpoint, workload, strategy, ledger)
    overheads, host = ledger.overheads, Device("cpu")
    if strategy.method == "int8" or strategy.device.is_accelerator:
        ledger.add(host, buffers=overheads.bnb_runtime)
    else:
        ledger.add(host, buffers=overheads.cpu_4bit_repack)
    if strategy.prequantized:  # a pre-quantized layer is read into its weights as stored
        return
    ledger.add(strategy.device, staging=_quantize_transient(checkpoint, strategy))
    ledger.add(strategy.device, activations=_dequantized(checkpoint, strategy))
    ledger.notes.append(_quantized_note(checkpoint, strategy))


def _quantize_transient(checkpoint: Checkpoint, strategy: Quantized) -> int:
    """Each Linear weight lands in ``dtype`` and is quantised. On an accelerator bitsandbytes'
    nf4 also passes it through float32; memplan's CPU quantizers work through cache-sized blocks."""
    largest = largest_quantized(checkpoint, strategy)
    if largest is None:
        return 0
    staging = tensor_bytes(largest, strategy.dtype)
    if strategy.method == "nf4" and strategy.device.is_accelerator:
        return staging + 4 * largest.numel
    return staging


def _dequantized(checkpoint: Checkpoint, strategy: Quantized) -> int:
    """bitsandbytes' nf4 forward on an accelerator dequantises one weight at a time back to
    ``dtype``, beside the forward's activations."""
    largest = largest_quantized(checkpoint, strategy)
    if strategy.method != "nf4" or not strategy.device.is_accelerator or largest is None:
        return 0
    return tensor_bytes(largest, strategy.dtype)


def _quantized_note(checkpoint: Checkpoint, strategy: Quantized) -> str:
    """What the quantized figure assumes, since only the model class knows transformers' choice."""
    quantized = quantized_count(checkpoint, strategy.skip_modules)
    return (
        f"{strategy.method} bytes assume the {quantized} Linear weights of the repeated blocks are "
        "quantized; the load follows transformers' rule (Linears outside the blocks too, "
        "_keep_in_fp32_modules kept) and its report says how many were"
    )


# --- over devices -------------------------------------------------------------------------


@layout(Sharded)
def _sharded(checkpoint: Checkpoint, workload: Workload, strategy: Sharded, ledger: Ledger) -> None:
    sizes = module_weight_bytes(checkpoint, WeightFormat.of(strategy))
    slots = module_weight_bytes(checkpoint, WeightFormat.of(strategy), aligned=True)
    kv_of = kv_bytes_by_layer(checkpoint, workload, strategy.dtype)
    act = activation_bytes(checkpoint, workload, strategy.dtype)
    offloaded = strategy.offloaded  # scans the whole map: once, not once per module
    largest_offloaded = on_host = 0
    for device, modules in strategy.runs:  # one ledger entry per run of modules, not per module
        nbytes = [sizes.get(module, 0) for module in modules]
        kv = sum(kv_of.get(module, 0) for module in modules)
        ledger.add(device, weights=sum(nbytes))
        if device.is_accelerator or not offloaded:
            ledger.add(device, kv_cache=kv)
        else:  # offloaded: weights wait in host RAM, run (and keep their KV) on the execution device
            ledger.add(strategy.execution_device, kv_cache=kv)
            largest_offloaded = max(largest_offloaded, *(slots.get(module, 0) for module in modules))
        if not device.is_accelerator:
            on_host += sum(nbytes)
    for device in strategy.devices:
        if device.is_accelerator or not offloaded:
            ledger.add(device, activations=act)
    # offloaded modules visit the execution device one at a time, with the next one prefetched
    ledger.add(strategy.execution_device, buffers=2 * largest_offloaded)
    largest = largest_read(checkpoint)
    ledger.add(
        Device("cpu"), staging=window_staging(strategy.read_ahead, checkpoint.nbytes, on_host, largest)
    )


@layout(Streamed)
def _streamed(checkpoint: Checkpoint, workload: Workload, strategy: Streamed, ledger: Ledger) -> None:
    fmt = WeightFormat.of(strategy)
    sizes = layer_weight_bytes(checkpoint, fmt)
    arena = (strategy.prefetch_depth + 1) * largest_slot_bytes(checkpoint, fmt)
    resident = sum(sizes[: strategy.resident_layers])
    others = non_layer_weight_bytes(checkpoint, fmt)
    device = strategy.compute_device
    kv = kv_cache_bytes(checkpoint, workload, strategy.dtype)
    act = activation_bytes(checkpoint, workload, strategy.dtype)
    ledger.add(device, weights=others + resident, buffers=arena, kv_cache=kv, activations=act)
    host, window, largest = Device("cpu"), strategy.read_ahead, largest_read(checkpoint)
    if strategy.source == "host":  # streamed layers' copies are kept on the host as read
        copies = sum(sizes[strategy.resident_layers :])
        ledger.add(host, weights=copies)
        kept = copies + (others + resident if not device.is_accelerator else 0)
        ledger.add(host, staging=window_staging(window, checkpoint.nbytes, kept, largest))
    elif device.is_accelerator:  # pinned staging buffers between the files and the device
        ledger.add(host, buffers=arena, staging=window_staging(window, others + resident, 0, largest))
    elif not same_dtypes(checkpoint, strategy.dtype):  # resident tensors cast as they are read
        ledger.add(host, staging=largest)
