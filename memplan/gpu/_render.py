"""The inventory as a table for people, shared by ``memplan probe`` and ``memplan demo``."""

from __future__ import annotations

from memplan.gpu.device import Inventory
from memplan.units import format_size

__all__ = ["render_inventory"]


def render_inventory(inventory: Inventory) -> str:
    """A table of the inventory, one device a row, then any source that failed."""
    header = ("DEVICE", "TOTAL", "FREE", "USED", "OTHERS", "SOURCE", "NAME")
    rows = [
        (
            str(m.device),
            format_size(m.total),
            format_size(m.free),
            f"{m.used_ratio:.0%}",
            format_size(m.reserved_by_others) if m.reserved_by_others else "-",
            m.source,
            m.name,
        )
        for m in inventory
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]
    if inventory.simulated:
        lines.insert(0, "simulated devices (MEMPLAN_SIMULATE / --simulate)")
    if not rows:
        lines.append("(no devices measured)")
    lines.extend(f"warning: {problem}" for problem in inventory.problems)
    return "\n".join(lines)
