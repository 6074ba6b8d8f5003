"""Each candidate's strategy on one inventory: ``full`` on the roomiest device, ``sharded`` and
``offloaded`` whole modules filled over devices within their budgets, ``streamed-*`` the deepest
prefetch that fits with as many resident layers as fit, ``int8``/``nf4`` where the policy allows.
A builder is registered by candidate name; where a candidate does not apply it says why."""

from __future__ import annotations

import bisect
import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from memplan.gpu.device import Device, Inventory
from memplan.planner.corrections import Corrections
from memplan.planner.estimate import Estimate, estimate
from memplan.planner.model import Checkpoint
from memplan.planner.policy import Policy
from memplan.planner.quantization import PreQuantized
from memplan.planner.runtime import activation_bytes, kv_bytes_by_layer, kv_cache_bytes
from memplan.planner.strategies import Full, Quantized, Sharded, Strategy, Streamed
from memplan.planner.weights import (
    WeightFormat,
    largest_slot_bytes,
    layer_weight_bytes,
    module_weight_bytes,
    non_layer_weight_bytes,
)
from memplan.planner.workload import Overheads, Workload
from memplan.units import format_size

__all__ = ["BUILDERS", "Context", "build"]

Builder = Callable[["Context", str], Strategy | str]
BUILDERS: dict[str, Builder] = {}  # candidate name -> how to build its strategy


@dataclass(frozen=True)
class Context:
    """What one plan is made for: the checkpoint, the machine, the workload and the policy."""

    checkpoint: Checkpoint
    inventory: Inventory
    workload: Workload
    policy: Policy
    corrections: Corrections | None
    dtype: str

    def usable(self, device: Device) -> int:
        return self.policy.usable(self.inventory, device)

    @functools.cached_property  # asked for by every estimate of every candidate
    def overheads(self) -> Overheads:
        """The policy's overheads, less the part of the host runtime the inventory found in use
        already (this process imported torch before it probed: what it holds is out of the free
        memory). What it has yet to import (transformers, bitsandbytes) is still to come."""
        in_use = self.inventory.runtime_in_use
        if in_use is None:
            return self.policy.overheads
        return replace(
            self.policy.overheads, host_runtime=max(0, self.policy.overheads.host_runtime - in_use)
        )

    def accelerators(self) -> list[Device]:
        return [m.device for m in self.inventory.accelerators]

    def best_accelerator(self) -> Device | None:
        accelerators = self.inventory.accelerators
        return max(accelerators, key=lambda m: m.free).device if accelerators else None

    def estimate(self, strategy: Strategy) -> Estimate:
        return estimate(
            self.checkpoint,
            self.workload,
            strategy,
            overheads=self.overheads,
            corrections=self.corrections,
        )

    def budget_line(self, device: Device) -> str:
        memory = self.inventory.get(device)
        free = format_size(memory.free) if memory else "0 B"
        return (
            f"{format_size(self.usable(device))} usable ({free} free - {self.policy.headroom:.0%} headroom)"
        )


def build(ctx: Context, candidate: str) -> Strategy | str:
    """The strategy ``candidate`` means on this inventory, or why it does not apply."""
    stored = ctx.checkpoint.architecture.quantization
    if stored is not None and stored.loadable:
        return _build_prequantized(ctx, candidate, stored)
    return BUILDERS[candidate](ctx, candidate)


def _builds(*candidates: str) -> Callable[[Builder], Builder]:
    def register(builder: Builder) -> Builder:
        BUILDERS.update(dict.fromkeys(candidates, builder))
        return builder

    return register


@_builds("full")
def _full(ctx: Context, candidate: str) -> Strategy | str:
    return Full(ctx.best_accelerator() or Device("cpu"), ctx.dtype)


@_builds("int8", "nf4")
def _quantized(ctx: Context, candidate: str) -> Strategy | str:
    if not ctx.policy.allow_quantization:
        return "quantization is not allowed by the policy (--allow-quantization)"
    best = ctx.best_accelerator()
    if best is not None and best.kind == "mps":
        return "bitsandbytes does not quantize on MPS"
    return Quantized(
        "int8" if candidate == "int8" else "nf4",
        best or Device("cpu"),
        ctx.dtype,
        ctx.policy.double_quant,
        skip_modules=ctx.policy.skip_modules,
    )


@_builds("sharded")
def _sharded(ctx: Context, candidate: str) -> Strategy | str:
    accelerators = ctx.accelerators()
    if len(accelerators) < 2:
        return f"needs two or more accelerators; the inventory has {len(accelerators)}"
    return _fill(ctx, accelerators, None)


@_builds("offloaded")
def _offloaded(ctx: Context, candidate: str) -> Strategy | str:
    accelerators = ctx.accelerators()
    if not accelerators:
        return "needs an accelerator to offload from"
    return _fill(ctx, accelerators, Device("cpu"))


@_builds("streamed-host")
def _streamed_host(ctx: Context, candidate: str) -> Strategy | str:
    best = ctx.best_accelerator()
    if best is None:
        return "needs an accelerator to stream host memory to"
    return _streamed(ctx, "host", best)


@_builds("streamed-disk")
def _streamed_disk(ctx: Context, candidate: str) -> Strategy | str:
    return _streamed(ctx, "disk", ctx.best_accelerator() or Device("cpu"))


def _build_prequantized(ctx: Context, candidate: str, stored: PreQuantized) -> Strategy | str:
    """A bitsandbytes checkpoint loads as stored, whole, on one device: "full" means that."""
    best = ctx.best_accelerator()
    if candidate in ("int8", "nf4"):
        return f"the checkpoint is already quantized (bitsandbytes {stored.method})"
    if candidate != "full":
        return f"a pre-quantized bitsandbytes checkpoint loads whole on one device, not {candidate}"
    if best is not None and best.kind == "mps":
        return "bitsandbytes does not run on MPS"
    method: Literal["int8", "nf4"] = "int8" if stored.method == "int8" else "nf4"
    return Quantized(method, best or Device("cpu"), ctx.dtype, stored.double_quant, prequantized=True)


# --- filling devices ----------------------------------------------------------------------


def _is_leading(module: str) -> bool:
    """Modules that run before the decoder layers (token and position embeddings)."""
    last = module.rsplit(".", 1)[-1]
    return "embed" in last or last in ("wte", "wpe", "word_embeddings")


def _device_budget(ctx: Context, device: Device, reserve: int) -> int:
    slack = 1 + ctx.overheads.allocator_slack if device.is_accelerator else 1
    act = activation_bytes(ctx.checkpoint, ctx.workload, ctx.dtype)
    overheads = ctx.overheads
    runtimes = overheads.fixed(device) + (0 if device.is_accelerator else overheads.load_runtime)
    return ctx.usable(device) - runtimes - int((act + reserve) * slack)


def _ordered_modules(ckpt: Checkpoint, sizes: dict[str, int]) -> list[str]:
    layer_prefixes = [layer.prefix for layer in ckpt.layers]
    in_layers = set(layer_prefixes)  # built once: a set per module made planning quadratic in layers
    others = [m for m in sizes if m not in in_layers]
    return [m for m in others if _is_leading(m)] + layer_prefixes + [m for m in others if not _is_leading(m)]


def _fill(ctx: Context, devices: list[Device], spill: Device | None) -> Sharded:
    """Whole modules in order over ``devices``, each within its budget; the rest to ``spill``."""
    ckpt, overheads = ctx.checkpoint, ctx.overheads
    sizes = module_weight_bytes(ckpt, WeightFormat(ctx.dtype))
    kv_of = kv_bytes_by_layer(ckpt, ctx.workload, ctx.dtype)
    # Offloaded layers run on the first accelerator with their KV cache there: keep room for it.
    reserve = sum(kv_of.values()) + max(sizes.values(), default=0) if spill else 0
    budgets = [_device_budget(ctx, d, reserve if i == 0 else 0) for i, d in enumerate(devices)]
    slots = list(devices)
    if spill is not None:
        budgets.append(ctx.usable(spill) - overheads.fixed(spill))
        slots.append(spill)
    order = _ordered_modules(ckpt, sizes)
    # Each module's cost on a host slot and on an accelerator (its KV cache, the allocator's slack),
    # priced in bulk: 100k layers are 100k modules.
    on_host = [sizes[m] for m in order]
    slack = 1 + overheads.allocator_slack
    on_accelerator = [int((sizes[m] + kv_of.get(m, 0)) * slack) for m in order]
    counts = _fill_counts([on_accelerator if d.is_accelerator else on_host for d in slots], budgets)
    placed = itertools.chain.from_iterable(itertools.repeat(d, n) for d, n in zip(slots, counts, strict=True))
    return Sharded(tuple(zip(order, placed, strict=True)), ctx.dtype, devices[0])


def _fill_counts(costs: list[list[int]], budgets: list[int]) -> list[int]:
    """How many modules, in order, each slot takes: as many as fit its budget, then the next slot
    takes over. What fits nowhere lands on the last slot, so the estimate shows what is missing."""
    counts, start = [], 0
    for slot_costs, budget in zip(costs[:-1], budgets[:-1], strict=True):
        # Costs are never negative, so the running totals are sorted and bisect finds the cut.
        taken = bisect.bisect_right(list(itertools.accumulate(slot_costs[start:])), budget)
        counts.append(taken)
        start += taken
    counts.append(len(costs[-1]) - start)
    return counts


def _streamed(ctx: Context, origin: Literal["host", "disk"], device: Device) -> Streamed:
    """The deepest prefetch (up to the policy's) that fits, then as many resident layers as fit."""
    ckpt, overheads = ctx.checkpoint, ctx.overheads
    sizes = layer_weight_bytes(ckpt, WeightFormat(ctx.dtype))
    if not sizes:  # nothing repeats (ALBERT's shared layer, XLM's parallel lists): all of it resident
        return Streamed(device, origin, 0, 1, ctx.dtype)
    largest = largest_slot_bytes(ckpt, WeightFormat(ctx.dtype))
    others = non_layer_weight_bytes(ckpt, WeightFormat(ctx.dtype))
    kv = kv_cache_bytes(ckpt, ctx.workload, ctx.dtype)
    slack = 1 + overheads.allocator_slack if device.is_accelerator else 1
    computed = sum(nbytes for _, nbytes in ckpt.computed_buffers)
    base = _device_budget(ctx, device, 0) - int((others + kv + computed) * slack)
    # What the first k layers hold once resident; sorted, as sizes are never negative.
    held = list(itertools.accumulate(int(size * slack) for size in sizes))
    for depth in range(ctx.policy.prefetch_depth, 0, -1):
        room = base - int((depth + 1) * largest * slack)
        if room >= 0:
            return Streamed(device, origin, bisect.bisect_right(held, room), depth, ctx.dtype)
    # The leanest stream does not fit either; its estimate shows by how much.
    return Streamed(device, origin, 0, 1, ctx.dtype)
