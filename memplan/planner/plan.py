"""``plan(checkpoint, inventory, workload, policy) -> Plan``: the first strategy that fits, and why.

Every candidate in the policy's order is built and estimated, so the plan says for each one why
it was taken or not, and how much memory it would need. Where none fits, :class:`DoesNotFit`
carries a :class:`FailedPlan`: the same decisions, with nothing chosen. Pure: no I/O, no tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

__all__ = ["PLAN_FORMAT_VERSION", "FailedPlan", "Plan", "plan"]

PLAN_FORMAT_VERSION = 1  # what to_json writes and the only version from_json reads


@dataclass(frozen=True)
class _Planned:
    """What a plan was made for, and every candidate's decision in the policy's order."""

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

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps({"version": PLAN_FORMAT_VERSION, **encode(self)}, indent=indent)

    def explain(self) -> str:
        return "\n".join([*_context_lines(self), "", *self._choice_lines(), "", *self._decision_lines()])

    def _chosen_at(self) -> int | None:
        return None

    def _choice_lines(self) -> list[str]:
        return ["chosen: nothing fits"]

    def _decision_lines(self) -> list[str]:
        lines = ["strategies, in the policy's order:"]
        for i, decision in enumerate(self.decisions):
            fits, built = decision.fits, decision.strategy is not None
            mark = "chosen" if i == self._chosen_at() else "fits" if fits else "no" if built else "n/a"
            extra = f" (short by {format_size(decision.shortfall)})" if decision.shortfall else ""
            lines.append(f"  [{mark:>6}] {decision.candidate:14} {decision.reason}{extra}")
        return lines


@dataclass(frozen=True)
class Plan(_Planned):
    """The chosen strategy, its estimate, and every candidate's decision. JSON round-trips."""

    chosen_index: int
    strategy: Strategy = field(init=False, repr=False, compare=False)
    estimate: Estimate = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.chosen_index < len(self.decisions):
            raise PlanFormatError(
                f"chosen_index {self.chosen_index} is not one of its {len(self.decisions)} decisions"
            )
        chosen = self.decisions[self.chosen_index]
        if chosen.strategy is None or chosen.estimate is None:
            raise PlanFormatError(f"the chosen candidate {chosen.candidate} has no strategy and estimate")
        object.__setattr__(self, "strategy", chosen.strategy)
        object.__setattr__(self, "estimate", chosen.estimate)

    @property
    def chosen(self) -> Decision:
        return self.decisions[self.chosen_index]

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """The plan :meth:`to_json` wrote; anything else is a :class:`PlanFormatError` (a
        :class:`FailedPlan`'s JSON too: it chose nothing to load)."""
        data = _document(text)
        if "chosen_index" in data and data["chosen_index"] is None:
            raise PlanFormatError(
                "it chose no strategy (nothing fitted where it was made): read it as a FailedPlan"
            )
        plan: Plan = _decoded(cls, data)
        return plan

    def _chosen_at(self) -> int | None:
        return self.chosen_index

    def _choice_lines(self) -> list[str]:
        window = format_size(self.strategy.read_ahead)
        lines = [f"chosen: {self.strategy.describe()}; read-ahead window {window}"]
        for d in self.estimate.devices:
            parts = [
                ("weights", d.weights), ("KV cache", d.kv_cache), ("activations", d.activations),
                ("buffers", d.buffers), ("overhead", d.overhead), ("learned correction", d.correction),
            ]  # fmt: skip
            shown = ", ".join(f"{label} {format_size(v)}" for label, v in parts if v)
            staged = f" (while loading: {format_size(d.staging)} read ahead, in place of the forward's)"
            lines.append(
                f"  {d.device!s:7} peak {format_size(d.peak)}: {shown}" + (staged if d.staging else "")
            )
        lines.extend(f"  note: {note}" for note in self.estimate.notes)
        return lines


@dataclass(frozen=True)
class FailedPlan(_Planned):
    """What a plan decided where no candidate fits (:attr:`DoesNotFit.plan`): every candidate's
    decision, with what each lacks, and nothing chosen. Its JSON is a plan's, ``chosen_index`` null."""

    chosen_index: None = None

    def __post_init__(self) -> None:
        if self.chosen_index is not None:
            raise PlanFormatError(f"a failed plan chose nothing, not candidate {self.chosen_index!r}")

    @classmethod
    def from_json(cls, text: str) -> FailedPlan:
        """The failed plan :meth:`to_json` wrote; anything else is a :class:`PlanFormatError`."""
        failed: FailedPlan = _decoded(cls, _document(text))
        return failed


def _document(text: str) -> dict[str, Any]:
    """The JSON object of a plan of this format version, without its version."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise PlanFormatError(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PlanFormatError(f"expected a JSON object, got {type(data).__name__}")
    version = data.pop("version", None)
    if type(version) is not int or version != PLAN_FORMAT_VERSION:  # True and 1.0 are not 1
        raise PlanFormatError(f"version {version!r} is not {PLAN_FORMAT_VERSION}, the one this memplan reads")
    return data


def _decoded(cls: type[_Planned], data: dict[str, Any]) -> Any:
    try:
        return decode(cls, data)
    except PlanFormatError:
        raise
    # The codec reports a wrong shape as whichever error the constructor or lookup raised, and
    # the configs' own checks raise MemplanError: all of them mean "not a plan we wrote".
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError, MemplanError) as exc:
        raise PlanFormatError(f"{type(exc).__name__}: {exc}") from None


def _context_lines(p: _Planned) -> list[str]:
    kv = p.workload.kv_dtype or p.dtype
    return [
        f"model: {p.model} ({p.num_params / 1e9:.2f}B parameters, {format_size(p.model_bytes)} on disk, "
        f"{p.num_layers} layers, compute {p.dtype})",
        f"workload: batch {p.workload.batch}, context {p.workload.context} tokens, KV cache in {kv}",
        "devices: "
        + ", ".join(f"{m.device} {format_size(m.free)} free" for m in p.inventory)
        + (" (simulated)" if p.inventory.simulated else ""),
        f"policy: {p.policy.name}, {p.policy.headroom:.0%} headroom, quantization "
        + ("allowed" if p.policy.allow_quantization else "not allowed"),
        _runtime_line(p),
    ]


def _runtime_line(p: _Planned) -> str:
    if p.inventory.runtime_in_use is not None:
        held = format_size(p.inventory.runtime_in_use)
        return f"host runtime: in use already ({held} resident when probed, out of the free memory)"
    runtime = format_size(p.policy.overheads.host_runtime)
    return f"host runtime: {runtime} (Python, torch, memplan: not loaded when probed)"


def plan(
    checkpoint: Checkpoint,
    inventory: Inventory,
    workload: Workload | None = None,
    policy: Policy | None = None,
    *,
    corrections: Corrections | None = None,
) -> Plan:
    """Choose how to load ``checkpoint`` on ``inventory``; raise :class:`DoesNotFit` if nothing fits.

    The exception's ``plan`` attribute holds a :class:`FailedPlan`, with what each strategy lacks.
    """
    workload = (workload or Workload()).for_model(checkpoint)
    policy = policy or Policy()
    dtype = normalize_dtype(policy.dtype or checkpoint.architecture.torch_dtype or checkpoint.dtype)
    decisions, chosen = decide(Context(checkpoint, inventory, workload, policy, corrections, dtype))
    facts = (
        checkpoint.path, checkpoint.fingerprint, checkpoint.num_params, checkpoint.nbytes,
        len(checkpoint.layers), dtype, workload, policy, inventory, tuple(decisions),
    )  # fmt: skip
    if chosen is None:
        raise _does_not_fit(FailedPlan(*facts))
    return Plan(*facts, chosen)


def _does_not_fit(result: FailedPlan) -> DoesNotFit:
    judged = [(d.estimate, d) for d in result.decisions if d.estimate is not None and d.shortfall]
    if not judged:  # nothing was estimated short: every candidate said why it does not apply
        reasons = "; ".join(f"{d.candidate}: {d.reason}" for d in result.decisions)
        detail = f"no strategy applies to {result.model.name} here ({reasons})"
        return DoesNotFit(0, 0, None, detail=detail, plan=result)
    estimate, closest = min(judged, key=lambda pair: pair[1].shortfall)
    usable = {d.device: result.policy.usable(result.inventory, d.device) for d in estimate.devices}
    worst = max(estimate.devices, key=lambda d: d.peak - usable[d.device])
    detail = f"no strategy fits {result.model.name}; closest is {closest.candidate}"
    return DoesNotFit(worst.peak, usable[worst.device], worst.device, detail=detail, plan=result)
