"""Idle cleanup: entries unused past their retention policy's ``max_idle_s`` go one tier down,
and keys a failed drop left behind are freed again."""

from __future__ import annotations

from memplan.residency._keystore import KeyStore
from memplan.residency._moves import Mover

__all__ = ["idle_pass"]


def idle_pass(mover: Mover, keys: KeyStore) -> list[str]:
    """One pass; returns the entries demoted. Entries leased or moving now are retried next pass."""
    table = mover.table
    keys.retry_orphans()
    with table.state:
        now = table.clock()
        due = [
            e for e in table.entries.values()
            if e.policy.max_idle_s is not None and now - e.last_use >= e.policy.max_idle_s
            and mover.can_go_down(e)
        ]  # fmt: skip
    demoted = []
    for entry in due:
        moved = mover.demote_if_free(entry, f"idle past its {entry.policy.max_idle_s}s limit")
        if moved is None:
            table.count("idle_retries")
        elif moved:
            with table.state:
                entry.last_use = now  # the next step down waits another max_idle_s
            demoted.append(entry.name)
    return demoted
