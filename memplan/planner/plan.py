"""``plan(checkpoint, inventory, workload, policy) -> Plan``: the first strategy that fits, and why.

Every candidate in the policy's order is built and estimated, so the plan says for each one why
it was taken or not, and how much memory it would need. Pure: no I/O, no tensors.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from memplan._codec import decode, encode
from memplan.errors import DoesNotFit, MemplanError, PlanFormatError
from memplan.gpu.device import Device, Inventory
from memplan.planner.checkpoint import Checkpoint
from memplan.planner.corrections import Corrections
from memplan.planner.estimate import (
    Estimate,
    Overheads,
    WeightFormat,
    Workload,
    activation_bytes,
    compute_dtype,
    estimate,
    kv_bytes_by_layer,
    kv_cache_bytes,
    largest_slot_bytes,
    layer_weight_bytes,
    module_weight_bytes,
    non_layer_weight_bytes,
    normalize_dtype,
)
from memplan.planner.quantization import PreQuantized
from memplan.planner.strategies import (
    READ_AHEAD_BYTES,
    READ_REQUEST_BYTES,
    Full,
    Quantized,
    Sharded,
    Strategy,
    Streamed,
    describe,
)
from memplan.units import format_size

__all__ = ["CANDIDATES", "PLAN_FORMAT_VERSION", "Decision", "Plan", "Policy", "plan"]

PLAN_FORMAT_VERSION = 1  # what to_json writes and the only version from_json reads

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
    of comparing estimated peaks with each device's budget. ``dtype`` (the compute dtype; None means
    the checkpoint's) takes a name such as ``"bf16"`` or a ``torch.dtype``, and keeps its canonical
    name (``"BF16"``).
    """

    name: str = "default"
    order: tuple[str, ...] = CANDIDATES
    allow_quantization: bool = False
    headroom: float = 0.10
    dtype: str | None = None
    prefetch_depth: int = 2
    double_quant: bool = True
    skip_modules: tuple[str, ...] | None = None  # llm_int8_skip_modules for quantized candidates
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
        if self.dtype is not None:  # a name or a torch.dtype; kept as its canonical name
            object.__setattr__(self, "dtype", compute_dtype(self.dtype))

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


# --- building each candidate's strategy ---------------------------------------------------


def _is_leading(module: str) -> bool:
    """Modules that run before the decoder layers (token and position embeddings)."""
    last = module.rsplit(".", 1)[-1]
    return "embed" in last or last in ("wte", "wpe", "word_embeddings")


def _device_budget(ctx: _Context, device: Device, reserve: int) -> int:
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


def _fill(ctx: _Context, devices: list[Device], spill: Device | None) -> Sharded | str:
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


def _streamed(ctx: _Context, source: str, device: Device) -> Streamed | str:
    """The deepest prefetch (up to the policy's) that fits, then as many resident layers as fit."""
    ckpt, overheads = ctx.checkpoint, ctx.overheads
    sizes = layer_weight_bytes(ckpt, WeightFormat(ctx.dtype))
    origin: Literal["host", "disk"] = "host" if source == "host" else "disk"
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


def _build(ctx: _Context, candidate: str) -> Strategy | str:
    """The strategy ``candidate`` means on this inventory, or why it does not apply."""
    stored = ctx.checkpoint.architecture.quantization
    if stored is not None and stored.loadable:
        return _build_prequantized(ctx, candidate, stored)
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
            skip_modules=ctx.policy.skip_modules,
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


def _build_prequantized(ctx: _Context, candidate: str, stored: PreQuantized) -> Strategy | str:
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


def _window(checkpoint: Checkpoint) -> int:
    """The read-ahead window a load of ``checkpoint`` gets when memory is not tight: an eighth of
    the model, in whole requests, between one request and :data:`READ_AHEAD_BYTES`. A small model
    loads as fast through a small window, and a window the size of the model would stage all of it."""
    requests = max(1, checkpoint.nbytes // 8 // READ_REQUEST_BYTES)
    return min(requests * READ_REQUEST_BYTES, READ_AHEAD_BYTES)


def _judge_windows(ctx: _Context, candidate: str, strategy: Strategy) -> Decision:
    """The strategy with its default window, or where that does not fit, the largest smaller one
    (halving, down to one request) that does: a smaller window costs speed, not a better strategy."""
    window = _window(ctx.checkpoint)
    judged = _judge_peaks(ctx, candidate, replace(strategy, read_ahead=window))
    while not judged.fits and window > READ_REQUEST_BYTES:
        window = max(READ_REQUEST_BYTES, window // 2 // READ_REQUEST_BYTES * READ_REQUEST_BYTES)
        smaller = _judge_peaks(ctx, candidate, replace(strategy, read_ahead=window))
        if smaller.fits:
            reason = f"{smaller.reason}; read-ahead window {format_size(window)} to fit"
            return replace(smaller, reason=reason)
    return judged


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
        if by_ratio:
            judged = _judge_ratio(ctx, candidate, replace(built, read_ahead=_window(ctx.checkpoint)), ratio)
        else:
            judged = _judge_windows(ctx, candidate, built)
        if isinstance(built, Streamed) and not ctx.checkpoint.layers:
            whole = f"no repeated layers to stream, so the whole model stays on {built.compute_device}"
            judged = replace(judged, reason=f"{whole}: {judged.reason}")
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
        return json.dumps({"version": PLAN_FORMAT_VERSION, **encode(self)}, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """The plan :meth:`to_json` wrote; anything else is a :class:`PlanFormatError`."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise PlanFormatError(f"not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise PlanFormatError(f"expected a JSON object, got {type(data).__name__}")
        version = data.pop("version", None)
        if type(version) is not int or version != PLAN_FORMAT_VERSION:  # True and 1.0 are not 1
            raise PlanFormatError(
                f"version {version!r} is not {PLAN_FORMAT_VERSION}, the one this memplan reads"
            )
        try:
            plan: Plan = decode(cls, data)
        # The codec reports a wrong shape as whichever error the constructor or lookup raised, and
        # the configs' own checks raise MemplanError: all of them mean "not a plan we wrote".
        except (
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
            IndexError,
            RecursionError,
            MemplanError,
        ) as exc:
            raise PlanFormatError(f"{type(exc).__name__}: {exc}") from None
        if plan.chosen_index is not None and not 0 <= plan.chosen_index < len(plan.decisions):
            raise PlanFormatError(
                f"chosen_index {plan.chosen_index} is not one of its {len(plan.decisions)} decisions"
            )
        return plan

    def explain(self) -> str:
        return "\n".join(_explain_lines(self))


def _runtime_line(p: Plan) -> str:
    if p.inventory.runtime_in_use is not None:
        held = format_size(p.inventory.runtime_in_use)
        return f"host runtime: in use already ({held} resident when probed, out of the free memory)"
    runtime = format_size(p.policy.overheads.host_runtime)
    return f"host runtime: {runtime} (Python, torch, memplan: not loaded when probed)"


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
        _runtime_line(p),
        "",
    ]
    chosen = p.chosen
    if chosen is None or chosen.strategy is None or chosen.estimate is None:
        lines.append("chosen: nothing fits")
    else:
        window = format_size(chosen.strategy.read_ahead)
        lines.append(f"chosen: {describe(chosen.strategy)}; read-ahead window {window}")
        for d in chosen.estimate.devices:
            parts = [
                ("weights", d.weights), ("KV cache", d.kv_cache), ("activations", d.activations),
                ("buffers", d.buffers), ("overhead", d.overhead), ("learned correction", d.correction),
            ]  # fmt: skip
            shown = ", ".join(f"{label} {format_size(v)}" for label, v in parts if v)
            staged = f" (while loading: {format_size(d.staging)} read ahead, in place of the forward's)"
            lines.append(
                f"  {d.device!s:7} peak {format_size(d.peak)}: {shown}" + (staged if d.staging else "")
            )
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
    workload = (workload or Workload()).for_model(checkpoint)
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
    if closest is None:  # nothing was estimated short: every candidate said why it does not apply
        reasons = "; ".join(f"{d.candidate}: {d.reason}" for d in result.decisions)
        detail = f"no strategy applies to {result.model.name} here ({reasons})"
        return DoesNotFit(0, 0, None, detail=detail, plan=result)
    detail = f"no strategy fits {result.model.name}; closest is {closest.candidate}"
    return DoesNotFit(needed, available, device, detail=detail, plan=result)


def _usable(inventory: Inventory, policy: Policy, device: Device) -> int:
    """A device's free bytes less the policy's headroom; 0 for a device the inventory lacks."""
    memory = inventory.get(device)
    return int(memory.free * (1 - policy.headroom)) if memory else 0
