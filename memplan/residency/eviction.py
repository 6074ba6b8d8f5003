"""Which entry leaves a tier first: cost-aware (GDSF), LRU, or Belady's offline optimum.

Policies see entries through :class:`Candidate` (plain numbers), so they are pure and the same
objects drive the manager and trace replays.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from memplan.errors import InvalidOption

__all__ = ["GDSF", "LRU", "Belady", "Candidate", "Eviction", "get_eviction"]


@dataclass(frozen=True)
class Candidate:
    """An entry that could be evicted, as eviction policies see it."""

    name: str
    nbytes: int
    last_use: float
    uses: int
    priority: float
    reload_cost_s: float  # time to bring it back from the tier it would go to


class Eviction(ABC):
    """Orders eviction candidates, most evictable first; told about uses and evictions."""

    name: ClassVar[str]

    def touched(self, entry: str) -> None:  # noqa: B027 - stateless policies ignore it
        """``entry`` was requested."""

    def evicted(self, candidate: Candidate) -> None:  # noqa: B027
        """``candidate`` left its tier."""

    def forgotten(self, entry: str) -> None:  # noqa: B027
        """``entry`` was unregistered."""

    @abstractmethod
    def order(self, candidates: Sequence[Candidate]) -> list[Candidate]: ...


class LRU(Eviction):
    """Least recently used first."""

    name = "lru"

    def order(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        return sorted(candidates, key=lambda c: (c.last_use, c.name))


class GDSF(Eviction):
    """Greedy-dual-size-frequency: value = clock + uses * priority * reload cost / size.

    The lowest value leaves first. The clock rises to ``aging`` times each victim's value, so
    entries that were valuable long ago age out instead of squatting. ``aging=1`` is classic
    GDSF (Cherkasova, HPL-98-69R1); under steady popularity it ages so fast that it drifts
    towards LRU, and on our serving trace (benchmarks/residency_trace.py) 0.5 moved 8% fewer
    bytes. ``aging=0`` never ages (pure frequency).
    """

    name = "gdsf"

    def __init__(self, aging: float = 0.5) -> None:
        if not 0 <= aging <= 1:
            raise InvalidOption("GDSF aging", aging, "be within [0, 1]")
        self.aging = aging
        self.clock = 0.0
        self._base: dict[str, float] = {}  # clock when each entry was last touched

    def touched(self, entry: str) -> None:
        self._base[entry] = self.clock

    def value(self, c: Candidate) -> float:
        return self._base.get(c.name, self.clock) + c.uses * c.priority * c.reload_cost_s / max(c.nbytes, 1)

    def order(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        return sorted(candidates, key=lambda c: (self.value(c), c.last_use, c.name))

    def evicted(self, candidate: Candidate) -> None:
        self.clock = max(self.clock, self.aging * self.value(candidate))

    def forgotten(self, entry: str) -> None:
        self._base.pop(entry, None)


class Belady(Eviction):
    """The entry next needed furthest in the future first; needs the whole request trace."""

    name = "belady"

    def __init__(self, trace: Sequence[str]) -> None:
        self._when: dict[str, list[int]] = defaultdict(list)
        for position, entry in enumerate(trace):
            self._when[entry].append(position)
        self.position = -1

    def touched(self, entry: str) -> None:
        self.position += 1

    def next_use(self, entry: str) -> float:
        uses = self._when.get(entry, [])
        i = bisect.bisect_right(uses, self.position)
        return uses[i] if i < len(uses) else float("inf")

    def order(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        return sorted(candidates, key=lambda c: (-self.next_use(c.name), c.name))


_POLICIES: dict[str, type[Eviction]] = {"gdsf": GDSF, "lru": LRU, "belady": Belady}


def get_eviction(name: str, **options: Any) -> Eviction:
    """``"gdsf"`` (default of the manager), ``"lru"``, or ``"belady"`` (pass ``trace=``)."""
    try:
        return _POLICIES[name](**options)
    except KeyError:
        raise InvalidOption("eviction policy", name, f"be one of {', '.join(_POLICIES)}") from None
