"""Every candidate in the policy's order, built and judged: a :class:`Decision` each, saying
whether it fits and why (or why it does not apply), with how much memory it would need."""

from __future__ import annotations

from dataclasses import dataclass, replace

from memplan.gpu.device import Device
from memplan.planner.candidates import Context, build
from memplan.planner.estimate import Estimate
from memplan.planner.model import Checkpoint
from memplan.planner.strategies import READ_AHEAD_BYTES, READ_REQUEST_BYTES, Full, Strategy, Streamed
from memplan.units import format_size

__all__ = ["Decision", "decide"]


@dataclass(frozen=True)
class Decision:
    """One candidate: the strategy built for it (if any), its estimate, and why it was (not) taken."""

    candidate: str
    strategy: Strategy | None
    estimate: Estimate | None
    fits: bool
    reason: str
    shortfall: int = 0


def decide(ctx: Context) -> tuple[list[Decision], int | None]:
    """Each candidate's decision, and the position of the first that fits (None where none does)."""
    ratio = _needed_over_available(ctx) if ctx.policy.thresholds else 0.0
    decisions: list[Decision] = []
    chosen: int | None = None
    for candidate in ctx.policy.order:
        built = build(ctx, candidate)
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


def _judge_peaks(ctx: Context, candidate: str, strategy: Strategy) -> Decision:
    """Fits when every measured device holds its estimated peak within its usable budget."""
    est = ctx.estimate(strategy)
    checked = [d for d in est.devices if d.device in ctx.inventory]
    over = [(d.peak - ctx.usable(d.device), d) for d in checked if d.peak > ctx.usable(d.device)]
    if not over:
        peaks = ", ".join(f"{format_size(d.peak)} on {d.device}" for d in checked)
        return Decision(candidate, strategy, est, True, f"{strategy.describe()}: peak {peaks}")
    shortfall, worst = max(over, key=lambda pair: pair[0])
    reason = f"needs {format_size(worst.peak)} on {worst.device}, which has {ctx.budget_line(worst.device)}"
    return Decision(candidate, strategy, est, False, reason, shortfall)


def _judge_ratio(ctx: Context, candidate: str, strategy: Strategy, ratio: float) -> Decision:
    """The seed's rule: a fixed ceiling on needed / available per strategy."""
    est = ctx.estimate(strategy)
    ceiling = dict(ctx.policy.thresholds)[candidate]
    if ratio <= ceiling:
        reason = f"{strategy.describe()}: needed/available = {ratio:.2f} <= {ceiling}"
        return Decision(candidate, strategy, est, True, reason)
    return Decision(candidate, strategy, est, False, f"needed/available = {ratio:.2f} > {ceiling}")


def _needed_over_available(ctx: Context) -> float:
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


def _judge_windows(ctx: Context, candidate: str, strategy: Strategy) -> Decision:
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
