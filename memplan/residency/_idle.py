"""Idle cleanup: entries unused past their retention policy's ``max_idle_s`` go one tier down,
and keys a failed drop left behind are freed again."""

from __future__ import annotations

import logging

from memplan._logtext import failure_text
from memplan.errors import TierError
from memplan.residency._keystore import KeyStore
from memplan.residency._moves import Mover

__all__ = ["idle_pass"]

log = logging.getLogger("memplan.residency")


def idle_pass(mover: Mover, keys: KeyStore) -> list[str]:
    """One pass; returns the entries demoted. Entries leased or moving now are retried next pass."""
    table = mover.table
    keys.retry_orphans()
    with table.state:
        now = table.clock()
        due = [
            e for e in table.entries.values()
            if e.policy.max_idle_s is not None and now - e.last_use >= e.policy.max_idle_s
            and (e.tier + 1 < len(table.tiers) or e.policy.drop)
        ]  # fmt: skip
    demoted = []
    for entry in due:
        if table.try_claim(entry) is not None:
            table.count("idle_retries")
            continue
        try:
            mover.demote(
                entry, {entry.name}, f"idle past its {entry.policy.max_idle_s}s limit", may_drop=True
            )
            with table.state:
                entry.last_use = now  # the next step down waits another max_idle_s
            demoted.append(entry.name)
        except TierError as exc:
            log.warning("idle demotion of %s failed: %s", entry.name, failure_text(exc))
        finally:
            table.land(entry)
    return demoted
