"""How a plan chooses (:class:`Policy`): the candidates in order, the headroom left on each
device, whether quantizing is allowed, and the seed's fixed-ratio rule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from memplan._dtypes import compute_dtype
from memplan.errors import InvalidOption
from memplan.gpu.device import Device, Inventory
from memplan.planner.workload import Overheads

__all__ = ["CANDIDATES", "SEED_THRESHOLDS", "Policy"]

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
            raise InvalidOption(
                "policy order", unknown, f"name only known strategies ({', '.join(CANDIDATES)})"
            )
        if not 0 <= self.headroom < 1:
            raise InvalidOption("headroom", self.headroom, "be in [0, 1)")
        if self.prefetch_depth < 1:
            raise InvalidOption("prefetch_depth", self.prefetch_depth, "be at least 1")
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

    def usable(self, inventory: Inventory, device: Device) -> int:
        """A device's free bytes less this policy's headroom; 0 for a device ``inventory`` lacks."""
        memory = inventory.get(device)
        return int(memory.free * (1 - self.headroom)) if memory else 0
