"""Per-entry retention policies."""

from __future__ import annotations

from dataclasses import dataclass

from memplan.errors import InvalidOption
from memplan.residency.pressure import LEVELS, PressureLevel

__all__ = ["RetentionPolicy"]


@dataclass(frozen=True)
class RetentionPolicy:
    """How hard the residency manager works to keep an entry on a fast tier.

    - ``max_idle_s``: demote one tier when unused this long (``None``: never for idleness).
    - ``max_pressure``: the highest pressure level the entry rides out when idle; above it,
      the entry is demoted. Critical pressure demotes everything not pinned or leased.
    - ``priority``: scales the entry's eviction value (2.0 is kept as if used twice as often).
    - ``persistent``: keep its copy on a durable tier (disk, remote) when the manager closes,
      so a restart finds it there.
    - ``pinned_tier``: the tier (by name) it must stay on; the manager refuses requests that
      would move it.
    - ``drop``: a model added by name (:meth:`ResidencyManager.add_model`) may be dropped
      instead of demoted when the manager makes room, answers pressure or cleans up idle
      entries: where loading it again from its source took less time (measured, at its last
      load) than writing it to the tier below and bringing it back (measured per route, or the
      tiers' nominal bandwidths before any move), or where no tier below has room. Its next use
      loads it again. Explicit :meth:`~ResidencyManager.demote` calls always move it.
    """

    max_idle_s: float | None = None
    max_pressure: PressureLevel = "low"
    priority: float = 1.0
    persistent: bool = False
    pinned_tier: str | None = None
    drop: bool = False

    def __post_init__(self) -> None:
        if self.max_pressure not in LEVELS:
            raise InvalidOption("max_pressure", self.max_pressure, f"be one of {', '.join(LEVELS)}")
        if self.priority <= 0:
            raise InvalidOption("priority", self.priority, "be > 0")
        if self.max_idle_s is not None and self.max_idle_s < 0:
            raise InvalidOption("max_idle_s", self.max_idle_s, "be >= 0")
