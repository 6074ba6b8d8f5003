"""``memplan.load``: probe, plan, load, and on running out of memory fall back to the next strategy."""

from __future__ import annotations

import gc
import logging
import sys
import time
import weakref
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memplan._torch_imported import imported_torch
from memplan.errors import DeviceOutOfMemory, DoesNotFit, PlanMismatch
from memplan.gpu import Allocator, Device, Inventory, probe
from memplan.loaders._build import Loaded, LoadOptions, carry_out
from memplan.loaders._hooks import Hooks
from memplan.loaders._malloc import fix_mmap_threshold
from memplan.loaders._placement import Placement
from memplan.loaders._reader import TensorReader
from memplan.loaders._skeleton import ModelFactory, check_config, with_computed_buffers
from memplan.loaders.handle import ModelHandle
from memplan.loaders.report import Fallback, LoadReport, RssSampler
from memplan.planner import (
    Checkpoint,
    Corrections,
    Plan,
    Policy,
    Strategy,
    Workload,
    describe,
    inspect,
)
from memplan.planner import plan as make_plan

if TYPE_CHECKING:
    from torch import nn

__all__ = ["load"]

log = logging.getLogger("memplan.load")


def load(
    path: str | Path,
    *,
    revision: str | None = None,
    plan: Plan | None = None,
    model_cls: ModelFactory | None = None,
    workload: Workload | None = None,
    policy: Policy | None = None,
    progress: bool = True,
    allocator: Allocator | None = None,
    corrections: Corrections | None = None,
    trainable: bool = True,
    quant_cache: bool = True,
) -> nn.Module:
    """Load the model at ``path`` the way the plan says, and return it in eval mode.

    ``path`` is a model folder (safetensors or ``.bin``), one weights file with its configs
    beside it, or a Hugging Face repo id (the local cache first; ``revision`` picks a branch,
    tag or commit).

    Without ``plan``, probes the machine (``MEMPLAN_SIMULATE`` is honoured) and plans with
    ``workload`` and ``policy``. ``allocator`` is the budget to charge (share one with a residency
    manager); by default a fresh one over the probed inventory. When a strategy runs out of memory
    the load frees what it placed, re-plans on what is really free and takes the next strategy.
    The result carries ``model.memplan`` (:class:`ModelHandle`): its ``report``
    (:class:`LoadReport`) and ``close()``, which gives the model's budget back.

    Checkpoint names are converted as transformers converts them (renamed, experts fused); a head
    the checkpoint lacks is initialised as transformers does, warned about and listed in
    ``report.newly_initialized``. Parameters require grad as ``from_pretrained`` leaves them;
    ``trainable=False`` freezes them, so a forward outside ``torch.no_grad()`` keeps no graph.
    Streamed and offloaded weights take the same flag (it picks matmul's kernel even under
    ``no_grad``), but their memory is reused between forwards: a backward through a layer whose
    slot holds another layer by then raises ``RuntimeError`` rather than use those weights.
    Sharded and streamed models carry accelerate's ``model.hf_device_map``.

    A quantized load keeps its quantized weights in the spill folder and a repeat load of the
    same checkpoint and method reads them instead of quantizing again; ``quant_cache=False`` (or
    ``MEMPLAN_QUANT_CACHE=0``) turns that off.
    """
    checkpoint = inspect(path, revision=revision)
    check_config(checkpoint)
    if plan is not None:
        _check_plan(plan, checkpoint, workload, policy)
    else:  # a plan of its own counts the buffers the model computes (and so do its fallbacks)
        checkpoint = with_computed_buffers(checkpoint, model_cls)
    fix_mmap_threshold()
    inventory = allocator.inventory if allocator else plan.inventory if plan else probe()
    allocator = allocator or Allocator(inventory)
    keep = corrections is None and not inventory.simulated
    corrections = corrections if corrections is not None else Corrections.load()
    current = plan or make_plan(checkpoint, inventory, workload, policy, corrections=corrections)
    start = time.perf_counter()
    options = LoadOptions(trainable=trainable, quant_cache=quant_cache)
    model, handle = _first_that_loads(
        checkpoint, current, allocator, model_cls, progress, corrections, options
    )
    try:
        handle.report = replace(handle.report, seconds=time.perf_counter() - start)
        if keep:
            corrections.save()
    except BaseException:
        handle.close()  # the caller will never have the model: give its budget back now
        raise
    handle.attach(model)
    return model


def _first_that_loads(
    checkpoint: Checkpoint, current: Plan, allocator: Allocator, model_cls: ModelFactory | None,
    progress: bool, corrections: Corrections, options: LoadOptions,
) -> tuple[nn.Module, ModelHandle]:  # fmt: skip
    """The plan's strategy loaded, or on running out of memory the next one that does."""
    fallbacks: list[Fallback] = []
    while True:
        try:
            return _attempt(
                checkpoint, current, allocator, model_cls, progress, corrections, fallbacks, options
            )
        except DeviceOutOfMemory as exc:
            current = _fall_back(checkpoint, current, allocator, corrections, exc, fallbacks)


def _check_plan(plan: Plan, checkpoint: Checkpoint, workload: Workload | None, policy: Policy | None) -> None:
    """Refuse a plan made for another checkpoint, or asked to serve another workload or policy."""
    if plan.fingerprint != checkpoint.fingerprint:
        raise PlanMismatch(
            checkpoint.path,
            f"the plan is for {plan.model} (fingerprint {plan.fingerprint}), this checkpoint's "
            f"fingerprint is {checkpoint.fingerprint}: plan it with memplan.plan(memplan.inspect(...))",
        )
    # A workload that leaves the context to the model means the context the plan settled on.
    asked = workload.for_model(checkpoint) if workload is not None else None
    for what, given, planned in (("workload", asked, plan.workload), ("policy", policy, plan.policy)):
        if given is not None and given != planned:
            raise PlanMismatch(
                checkpoint.path, f"the plan was made for another {what}; pass the plan, or the {what}"
            )


def _attempt(
    checkpoint: Checkpoint, current: Plan, allocator: Allocator, model_cls: ModelFactory | None,
    progress: bool, corrections: Corrections, fallbacks: list[Fallback], options: LoadOptions,
) -> tuple[nn.Module, ModelHandle]:  # fmt: skip
    strategy, estimate = current.strategy, current.estimate
    placement, hooks = Placement(allocator), Hooks()
    try:  # everything up to the finaliser's registration: every exit gives the budget back
        before = {d: allocator.usage(d).used for d in allocator.devices()}
        for device in allocator.devices():
            allocator.reset_peak(device)
        _reset_cuda_peaks(allocator)
        with _progress_bar(checkpoint, progress) as bar, RssSampler() as rss:
            loaded, bytes_read = _carry_out(strategy, checkpoint, bar, placement, model_cls, hooks, options)
        # Measured as the estimate counts: from the runtime, or above it where it was in use already.
        in_use = current.inventory.runtime_in_use is not None
        peaks = _peaks(allocator, before, rss.peak - (rss.start if in_use else 0))
        report = LoadReport(
            checkpoint.name, strategy, estimate, tuple(fallbacks), 0.0, bytes_read,
            tuple(sorted(peaks.items())), allocator.simulated, unused_tensors=loaded.unused_tensors,
            newly_initialized=loaded.newly_initialized, notes=loaded.notes,
        )  # fmt: skip
        if not allocator.simulated:
            _record(corrections, checkpoint, current, peaks)
        # The model's bytes stay charged, and its hooks on, for as long as the model lives.
        unload = weakref.finalize(loaded.model, _unload, placement, hooks)
        return loaded.model, ModelHandle(report, placement, hooks, unload)
    except BaseException:
        _unload(placement, hooks)
        gc.collect()
        raise


def _carry_out(
    strategy: Strategy, checkpoint: Checkpoint, bar: Any, placement: Placement,
    model_cls: ModelFactory | None, hooks: Hooks, options: LoadOptions,
) -> tuple[Loaded, int]:  # fmt: skip
    """The loaded model and the bytes its load read. A streamer that reads the files at each
    forward owns the load's reader from then on (and closes it); otherwise it closes here."""
    reader = TensorReader(checkpoint, on_bytes=bar.update, window=strategy.read_ahead)
    try:
        loaded = carry_out(strategy, reader, placement, model_cls, hooks, options)
        return loaded, reader.bytes_read
    finally:
        if hooks.streamer is None or not hooks.streamer.reads_files:
            reader.close()


def _unload(placement: Placement, hooks: Hooks) -> None:
    hooks.remove()
    placement.release()


def _fall_back(
    checkpoint: Checkpoint, current: Plan, allocator: Allocator, corrections: Corrections,
    exc: DeviceOutOfMemory, fallbacks: list[Fallback],
) -> Plan:  # fmt: skip
    fallbacks.append(Fallback(current.strategy, str(exc)))
    # The text, not the exception: a kept log record must not keep the failed attempt's frames alive.
    log.warning("%s ran out of memory (%s); trying the next strategy", describe(current.strategy), str(exc))
    order = tuple(c for c in current.policy.order if c != current.chosen.candidate)
    if not order:
        raise exc
    # Plan again on what the allocator really has free now, not on what was probed.
    fresh = _inventory_from(allocator)
    try:
        return make_plan(
            checkpoint, fresh, current.workload, replace(current.policy, order=order), corrections=corrections
        )
    except DoesNotFit as nothing:
        raise nothing from exc


def _inventory_from(allocator: Allocator) -> Inventory:
    memories = []
    for memory in allocator.inventory:
        if allocator.tracks(memory.device):
            free = min(memory.free, allocator.available(memory.device))
            memory = replace(memory, free=free)
        memories.append(memory)
    return replace(allocator.inventory, devices=tuple(memories))


def _record(
    corrections: Corrections, checkpoint: Checkpoint, current: Plan, peaks: dict[Device, int]
) -> None:
    """Teach the planner: each device's measured load peak against the part of the estimate a load reaches."""
    key = current.strategy.correction_key
    for planned in current.estimate.devices:
        measured = peaks.get(planned.device, 0)
        if measured:
            corrections.record(checkpoint.fingerprint, key, planned.device.kind, planned.at_load, measured)


def _peaks(allocator: Allocator, before: dict[Device, int], rss: int) -> dict[Device, int]:
    peaks = {d: allocator.usage(d).peak - before[d] for d in allocator.devices() if d.is_accelerator}
    torch = imported_torch(cuda="initialized")
    if not allocator.simulated and torch is not None:
        for device in peaks:
            if device.kind == "cuda":
                peaks[device] = int(torch.cuda.max_memory_allocated(device.index))
    peaks[Device("cpu")] = rss
    return peaks


def _reset_cuda_peaks(allocator: Allocator) -> None:
    torch = imported_torch(cuda="available")
    if allocator.simulated or torch is None:
        return
    for device in allocator.devices():
        if device.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(device.index)


def _progress_bar(checkpoint: Checkpoint, progress: bool) -> Any:
    from tqdm.auto import tqdm

    quiet = not progress or not sys.stderr.isatty()
    return tqdm(
        total=checkpoint.nbytes, unit="B", unit_scale=True, unit_divisor=1024,
        desc=f"loading {checkpoint.name}", disable=quiet, leave=False,
    )  # fmt: skip
