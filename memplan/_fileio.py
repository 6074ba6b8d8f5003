"""Positional reads that fill a caller's buffer: shared by the checkpoint reader and the disk tier."""

from __future__ import annotations

import os
from pathlib import Path

from memplan.errors import CheckpointError

__all__ = ["read_exactly"]


def read_exactly(fd: int, view: memoryview, offset: int, *, file: Path, tensor: str | None = None) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` with positional reads; a short file is a
    :class:`CheckpointError` naming ``file`` and ``tensor``."""
    done = 0
    while done < len(view):
        try:
            got = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise CheckpointError(file, f"read failed: {exc.strerror}", tensor) from exc
        if got == 0:
            missing = len(view) - done
            raise CheckpointError(file, f"file ends {missing} bytes short of this read (truncated?)", tensor)
        done += got
