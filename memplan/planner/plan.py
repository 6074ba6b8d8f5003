"""``plan(checkpoint, inventory, workload, policy) -> Plan``: the first strategy that fits, and why.

Every candidate in the policy's order is built and estimated, so the plan says for each one why
it was taken or not, and how much memory it would need. Pure: no I/O, no tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from memplan._codec import decode, encode
from memplan.errors import DoesNotFit, MemplanError
from memplan.gpu.device import Device, Inventory
from memplan.planner.checkpoint import Checkpoint
from memplan.planner.corrections import Corrections
from memplan.planner.estimate import (
    Estimate,
    Overheads,
    WeightFormat,
    Workload,
    activation_bytes,
    estimate,
    kv_bytes_per_layer,
    layer_weight_bytes,
    module_weight_bytes,
    non_layer_weight_bytes,
    normalize_dtype,
)
from memplan.planner.strategies import Full, Quantized, Sharded, Strategy, Streamed, describe
from memplan.units import format_size

__all__ = ["CANDIDATES", "Decision", "Plan", "Policy", "plan"]

CANDIDATES: tuple[str, ...] = (
    "full",
    "sharded",
    "int8",
    "nf4",
    "offloaded",
    "streamed-host",
    "streamed-disk",
)
SEED_THRESHOLDS: tuple[tuple[str, float], ...] = (
    ("full", 0.6), ("int8", 0.8), ("nf4", 0.8), ("sharded", 1.5), ("offloaded", 1.5),
)  # fmt: skip


@dataclass(frozen=True)
class Policy:
    """How to choose. ``order`` lists candidates from ``CANDIDATES``; the first that fits wins.

    With ``thresholds`` set, the choice follows the seed's ratio rules (needed / available) instead
    of comparing estimated peaks with each device's budget.
    """

    name: str = "default"
    order: tuple[str, ...] = CANDIDATES
    allow_quantization: bool = False
    headroom: float = 0.10
    dtype: str | None = None
    prefetch_depth: int = 2
    double_quant: bool = True
    overheads: Overheads = field(default_factory=Overheads)
    thresholds: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        unknown = [c for c in self.order if c not in CANDIDATES]
        if unknown:
            raise MemplanError(f"unknown strategies in policy order: {unknown}; known: {list(CANDIDATES)}")
        if not 0 <= self.headroom < 1:
            raise MemplanError(f"headroom must be in [0, 1), got {self.headroom}")
        if self.prefetch_depth < 1:
            raise MemplanError(f"prefetch_depth must be at least 1, got {self.prefetch_depth}")

    @classmethod
    def seed_thresholds(cls, **overrides: Any) -> Policy:
        """The seed's rule: needed/available <= 0.6 full, <= 0.8 quantized, <= 1.5 sharded, else streamed.

        "needed" is the full-precision peak, "available" all accelerators' usable memory (the host's
        when there is none). Streamed candidates have no ratio and are judged by estimated peaks.
        """
        fields: dict[str, Any] = {
            "name": "thresholds",
            "allow_quantization": True,
            "thresholds": SEED_THRESHOLDS,
            "order": ("full", "int8", "nf4", "sharded", "offloaded", "streamed-host", "streamed-disk"),
        }
        return cls(**{**fields, **overrides})


@dataclass(frozen=True)
class Decision:
    """One candidate: the strategy built for it (if any), its estimate, and why it was (not) taken."""

    candidate: str
    strategy: Strategy | None
    estimate: Estimate | None
    fits: bool
    reason: str
    shortfall: int = 0


@dataclass(frozen=True)
class _Context:
    checkpoint: Checkpoint
    inventory: Inventory
    workload: Workload
    policy: Policy
    corrections: Corrections | None
    dtype: str

    def usable(self, device: Device) -> int:
        return _usable(self.inventory, self.policy, device)

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
            overheads=self.policy.overheads,
            corrections=self.corrections,
        )

    def budget_line(self, device: Device) -> str:
        memory = self.inventory.get(device)
        free = format_size(memory.free) if memory else "0 B"
        return (
            f"{format_size(self.usable(device))} usable ({free} free - {self.policy.headroom:.0%} headroom)"
        )


# --- building each candidate's strategy ---------------------------------------------------


def _is_leading(module: str) -> bool:
    """Modules that run before the decoder layers (token and position embeddings)."""
    last = module.rsplit(".", 1)[-1]
    return "embed" in last or last in ("wte", "wpe", "word_embeddings")


def _device_budget(ctx: _Context, device: Device, reserve: int) -> int:
    slack = 1 + ctx.policy.overheads.allocator_slack if device.is_accelerator else 1
    act = activation_bytes(ctx.checkpoint.architecture, ctx.workload, ctx.dtype)
    return ctx.usable(device) - ctx.policy.overheads.fixed(device) - int((act + reserve) * slack)


def _ordered_modules(ckpt: Checkpoint, sizes: dict[str, int]) -> list[str]:
    layer_prefixes = [layer.prefix for layer in ckpt.layers]
    others = [m for m in sizes if m not in set(layer_prefixes)]
    return [m for m in others if _is_leading(m)] + layer_prefixes + [m for m in others if not _is_leading(m)]


def _fill(ctx: _Context, devices: list[Device], spill: Device | None) -> Sharded | str:
    """Whole modules in order over ``devices``, each within its budget; the rest to ``spill``."""
    ckpt, overheads = ctx.checkpoint, ctx.policy.overheads
    sizes = module_weight_bytes(ckpt, WeightFormat(ctx.dtype))
    kv_layer = kv_bytes_per_layer(ckpt.architecture, ctx.workload, ctx.dtype)
    layer_prefixes = {layer.prefix for layer in ckpt.layers}

    def cost(module: str, device: Device) -> int:
        if not device.is_accelerator:
            return sizes[module]
        kv = kv_layer if module in layer_prefixes else 0
        return int((sizes[module] + kv) * (1 + overheads.allocator_slack))

    # Offloaded layers run on the first accelerator with their KV cache there: keep room for it.
    reserve = kv_layer * len(layer_prefixes) + max(sizes.values(), default=0) if spill else 0
    budgets = {d: _device_budget(ctx, d, reserve if i == 0 else 0) for i, d in enumerate(devices)}
    slots = list(devices)
    if spill is not None:
        budgets[spill] = ctx.usable(spill) - overheads.fixed(spill)
        slots.append(spill)
    slot, device_map = 0, []
    for module in _ordered_modules(ckpt, sizes):
        # What finds no room lands on the last device, so the estimate shows how much is missing.
        while slot + 1 < len(slots) and budgets[slots[slot]] < cost(module, slots[slot]):
            slot += 1
        budgets[slots[slot]] -= cost(module, slots[slot])
        device_map.append((module, slots[slot]))
    return Sharded(tuple(device_map), ctx.dtype, devices[0])


def _streamed(ctx: _Context, source: str, device: Device) -> Streamed | str:
    """The deepest prefetch (up to the policy's) that fits, then as many resident layers as fit."""
    ckpt, overheads = ctx.checkpoint, ctx.policy.overheads
    sizes = layer_weight_bytes(ckpt, WeightFormat(ctx.dtype))
    if not sizes:
        return "the checkpoint has no decoder layers to stream"
    largest = max(sizes)
    others = non_layer_weight_bytes(ckpt, WeightFormat(ctx.dtype))
    kv = kv_bytes_per_layer(ckpt.architecture, ctx.workload, ctx.dtype) * len(sizes)
    slack = 1 + overheads.allocator_slack if device.is_accelerator else 1
    base = _device_budget(ctx, device, 0) - int((others + kv) * slack)
    origin: Literal["host", "disk"] = "host" if source == "host" else "disk"
    for depth in range(ctx.policy.prefetch_depth, 0, -1):
        room = base - int((depth + 1) * largest * slack)
        if room < 0:
            continue
        resident = 0
        while resident < len(sizes) and int(sizes[resident] * slack) <= room:
            room -= int(sizes[resident] * slack)
            resident += 1
        return Streamed(device, origin, resident, depth, ctx.dtype)
    # The leanest stream does not fit either; its estimate shows by how much.
    return Streamed(device, origin, 0, 1, ctx.dtype)


def _build(ctx: _Context, candidate: str) -> Strategy | str:
    """The strategy ``candidate`` means on this inventory, or why it does not apply."""
    accelerators, best = ctx.accelerators(), ctx.best_accelerator()
    if candidate == "full":
        return Full(best or Device("cpu"), ctx.dtype)
    if candidate in ("int8", "nf4"):
        if not ctx.policy.allow_quantization:
            return "quantization is not allowed by the policy (--allow-quantization)"
        if best is not None and best.kind == "mps":
            return "bitsandbytes does not quantize on MPS"
        return Quantized(
            "int8" if candidate == "int8" else "nf4",
            best or Device("cpu"),
            ctx.dtype,
            ctx.policy.double_quant,
        )
    if candidate == "sharded":
        if len(accelerators) < 2:
            return f"needs two or more accelerators; the inventory has {len(accelerators)}"
        return _fill(ctx, accelerators, None)
    if candidate == "offloaded":
        if not accelerators:
            return "needs an accelerator to offload from"
        return _fill(ctx, accelerators, Device("cpu"))
    if candidate == "streamed-host":
        if best is None:
            return "needs an accelerator to stream host memory to"
        return _streamed(ctx, "host", best)
    return _streamed(ctx, "disk", best or Device("cpu"))


# --- judging each candidate ---------------------------------------------------------------


def _judge_peaks(ctx: _Context, candidate: str, strategy: Strategy) -> Decision:
    """Fits when every measured device holds its estimated peak within its usable budget."""
    est = ctx.estimate(strategy)
    checked = [d for d in est.devices if d.device in ctx.inventory]
    over = [(d.peak - ctx.usable(d.device), d) for d in checked if d.peak > ctx.usable(d.device)]
    if not over:
        peaks = ", ".join(f"{format_size(d.peak)} on {d.device}" for d in checked)
        return Decision(candidate, strategy, est, True, f"{describe(strategy)}: peak {peaks}")
    shortfall, worst = max(over, key=lambda pair: pair[0])
    reason = f"needs {format_size(worst.peak)} on {worst.device}, which has {ctx.budget_line(worst.device)}"
    return Decision(candidate, strategy, est, False, reason, shortfall)


def _judge_ratio(ctx: _Context, candidate: str, strategy: Strategy, ratio: float) -> Decision:
    """The seed's rule: a fixed ceiling on needed / available per strategy."""
    est = ctx.estimate(strategy)
    ceiling = dict(ctx.policy.thresholds)[candidate]
    if ratio <= ceiling:
        reason = f"{describe(strategy)}: needed/available = {ratio:.2f} <= {ceiling}"
        return Decision(candidate, strategy, est, True, reason)
    return Decision(candidate, strategy, est, False, f"needed/available = {ratio:.2f} > {ceiling}")


def _needed_over_available(ctx: _Context) -> float:
    main = ctx.best_accelerator() or Device("cpu")
    needed = ctx.estimate(Full(main, ctx.dtype)).on(main).peak
    available = sum(ctx.usable(d) for d in ctx.accelerators() or [Device("cpu")])
    return needed / available if available else float("inf")


def _decide(ctx: _Context) -> tuple[list[Decision], int | None]:
    ratio = _needed_over_available(ctx) if ctx.policy.thresholds else 0.0
    decisions: list[Decision] = []
    chosen: int | None = None
    for candidate in ctx.policy.order:
        built = _build(ctx, candidate)
        if isinstance(built, str):
            decisions.append(Decision(candidate, None, None, False, built))
            continue
        by_ratio = candidate in dict(ctx.policy.thresholds)
        judged = (
            _judge_ratio(ctx, candidate, built, ratio) if by_ratio else _judge_peaks(ctx, candidate, built)
        )
        if judged.fits and chosen is None:
            chosen = len(decisions)
        decisions.append(judged)
    return decisions, chosen


# --- the plan -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The chosen strategy, its estimate, and every candidate's decision. JSON round-trips."""

    model: Path
    fingerprint: str
    num_params: int
    model_bytes: int
    num_layers: int
    dtype: str
    workload: Workload
    policy: Policy
    inventory: Inventory
    decisions: tuple[Decision, ...]
    chosen_index: int | None

    @property
    def chosen(self) -> Decision | None:
        return self.decisions[self.chosen_index] if self.chosen_index is not None else None

    @property
    def strategy(self) -> Strategy | None:
        return self.chosen.strategy if self.chosen else None

    @property
    def estimate(self) -> Estimate | None:
        return self.chosen.estimate if self.chosen else None

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps({"version": 1, **encode(self)}, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        data.pop("version", None)
        plan: Plan = decode(cls, data)
        return plan

    def explain(self) -> str:
        return "\n".join(_explain_lines(self))


def _explain_lines(p: Plan) -> list[str]:
    kv = p.workload.kv_dtype or p.dtype
    lines = [
        f"model: {p.model} ({p.num_params / 1e9:.2f}B parameters, {format_size(p.model_bytes)} on disk, "
        f"{p.num_layers} layers, compute {p.dtype})",
        f"workload: batch {p.workload.batch}, context {p.workload.context} tokens, KV cache in {kv}",
        "devices: "
        + ", ".join(f"{m.device} {format_size(m.free)} free" for m in p.inventory)
        + (" (simulated)" if p.inventory.simulated else ""),
        f"policy: {p.policy.name}, {p.policy.headroom:.0%} headroom, quantization "
        + ("allowed" if p.policy.allow_quantization else "not allowed"),
        "",
    ]
    chosen = p.chosen
    if chosen is None or chosen.strategy is None or chosen.estimate is None:
        lines.append("chosen: nothing fits")
    else:
        lines.append(f"chosen: {describe(chosen.strategy)}")
        for d in chosen.estimate.devices:
            parts = [
                ("weights", d.weights), ("KV cache", d.kv_cache), ("activations", d.activations),
                ("buffers", d.buffers), ("overhead", d.overhead), ("learned correction", d.correction),
            ]  # fmt: skip
            shown = ", ".join(f"{label} {format_size(v)}" for label, v in parts if v)
            lines.append(f"  {d.device!s:7} peak {format_size(d.peak)}: {shown}")
        lines.extend(f"  note: {note}" for note in chosen.estimate.notes)
    lines += ["", "strategies, in the policy's order:"]
    for i, decision in enumerate(p.decisions):
        fits, built = decision.fits, decision.strategy is not None
        mark = "chosen" if i == p.chosen_index else "fits" if fits else "no" if built else "n/a"
        extra = f" (short by {format_size(decision.shortfall)})" if decision.shortfall else ""
        lines.append(f"  [{mark:>6}] {decision.candidate:14} {decision.reason}{extra}")
    return lines


def plan(
    checkpoint: Checkpoint,
    inventory: Inventory,
    workload: Workload | None = None,
    policy: Policy | None = None,
    *,
    corrections: Corrections | None = None,
) -> Plan:
    """Choose how to load ``checkpoint`` on ``inventory``; raise :class:`DoesNotFit` if nothing fits.

    The exception's ``plan`` attribute holds the full plan, with what each strategy lacks.
    """
    workload = workload or Workload()
    policy = policy or Policy()
    dtype = normalize_dtype(policy.dtype or checkpoint.architecture.torch_dtype or checkpoint.dtype)
    ctx = _Context(checkpoint, inventory, workload, policy, corrections, dtype)
    decisions, chosen = _decide(ctx)
    result = Plan(
        checkpoint.path, checkpoint.fingerprint, checkpoint.num_params, checkpoint.nbytes,
        len(checkpoint.layers), dtype, workload, policy, inventory, tuple(decisions), chosen,
    )  # fmt: skip
    if chosen is None:
        raise _does_not_fit(result)
    return result


def _does_not_fit(result: Plan) -> DoesNotFit:
    judged = [d for d in result.decisions if d.estimate is not None and d.shortfall]
    closest = min(judged, key=lambda d: d.shortfall, default=None)
    device, needed, available = None, 0, 0
    if closest is not None and closest.estimate is not None:
        usable = {
            d.device: _usable(result.inventory, result.policy, d.device) for d in closest.estimate.devices
        }
        worst = max(closest.estimate.devices, key=lambda d: d.peak - usable[d.device])
        device, needed, available = worst.device, worst.peak, usable[worst.device]
    detail = f"no strategy fits {result.model.name}; closest is {closest.candidate if closest else 'none'}"
    return DoesNotFit(needed, available, device, detail=detail, plan=result)


def _usable(inventory: Inventory, policy: Policy, device: Device) -> int:
    """A device's free bytes less the policy's headroom; 0 for a device the inventory lacks."""
    memory = inventory.get(device)
    return int(memory.free * (1 - policy.headroom)) if memory else 0
