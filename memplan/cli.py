"""The ``memplan`` command. Exit codes: 0 ok, 1 bad input or does not fit, 2 usage."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from memplan.errors import MemplanError
from memplan.gpu import Inventory, probe
from memplan.units import format_size

__all__ = ["main", "render_inventory"]

EXIT_OK, EXIT_BAD_INPUT, EXIT_USAGE = 0, 1, 2


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


def _cmd_probe(args: argparse.Namespace) -> int:
    inventory = probe(args.simulate)
    print(inventory.to_json() if args.json else render_inventory(inventory))
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memplan", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    probe_cmd = commands.add_parser("probe", help="measure host, CUDA, MPS and disk memory")
    probe_cmd.add_argument("--json", action="store_true", help="print JSON for scripts")
    probe_cmd.add_argument(
        "--simulate",
        metavar="SPEC",
        help="simulated devices instead of real ones, e.g. 'cuda:0=24GiB@20GiB,cpu=64GiB'",
    )
    probe_cmd.set_defaults(run=_cmd_probe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except MemplanError as exc:
        print(f"memplan: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
