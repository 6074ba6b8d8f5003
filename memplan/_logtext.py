"""Failures as text for log records.

A record that holds an exception (as an argument, or as ``exc_info``) holds its traceback, the
frames on it, and every tensor those frames held, for as long as a handler keeps the record:
pytest's capture, a ``MemoryHandler``, an error reporter's breadcrumbs. On an accelerator that is
memory a budget believes free. So what memplan logs and goes on from is logged as text.
"""

from __future__ import annotations

import traceback

__all__ = ["failure_text"]


def failure_text(exc: BaseException, *, trace: bool = False) -> str:
    """``exc``'s message; with ``trace``, the whole formatted traceback (for failures nobody
    expected, where ``log.exception`` would have been used)."""
    if trace:
        return "".join(traceback.format_exception(exc)).rstrip()
    return str(exc)
