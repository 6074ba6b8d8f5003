"""``plan(checkpoint, inventory, workload, policy) -> Plan``: the first strategy that fits, and why.

Every candidate in the policy's order is built and estimated, so the plan says for each one why
it was taken or not, and how much memory it would need. Pure: no I/O, no tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from memplan._codec import decode, encode
from memplan._dtypes import normalize_dtype
from memplan.errors import DoesNotFit, MemplanError, PlanFormatError
from memplan.gpu.device import Inventory
from memplan.planner.candidates import Context
from memplan.planner.corrections import Corrections
from memplan.planner.decisions import Decision, decide
from memplan.planner.estimate import Estimate
from memplan.planner.model import Checkpoint
from memplan.planner.policy import Policy
from memplan.planner.strategies import Strategy
from memplan.planner.workload import Workload
from memplan.units import format_size

__all__ = ["PLAN_FORMAT_VERSION", "Plan", "plan"]

PLAN_FORMAT_VERSION = 1  # what to_json writes and the only version from_json reads


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
        lines.append(f"chosen: {chosen.strategy.describe()}; read-ahead window {window}")
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
    decisions, chosen = decide(Context(checkpoint, inventory, workload, policy, corrections, dtype))
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
            d.device: result.policy.usable(result.inventory, d.device) for d in closest.estimate.devices
        }
        worst = max(closest.estimate.devices, key=lambda d: d.peak - usable[d.device])
        device, needed, available = worst.device, worst.peak, usable[worst.device]
    if closest is None:  # nothing was estimated short: every candidate said why it does not apply
        reasons = "; ".join(f"{d.candidate}: {d.reason}" for d in result.decisions)
        detail = f"no strategy applies to {result.model.name} here ({reasons})"
        return DoesNotFit(0, 0, None, detail=detail, plan=result)
    detail = f"no strategy fits {result.model.name}; closest is {closest.candidate}"
    return DoesNotFit(needed, available, device, detail=detail, plan=result)
