"""torch, only if the process already imported it: the one check for code that must never be
what imports torch (seconds, and a dependency ``import memplan`` does not have) or initialises
CUDA (a context of several hundred MiB per device, and a process that can no longer ``fork``).

Nothing here imports torch.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Literal

__all__ = ["CudaState", "imported_torch"]

CudaState = Literal["available", "initialized"]


def imported_torch(*, cuda: CudaState | None = None) -> ModuleType | None:
    """The ``torch`` module if something already imported it, else None; never imports it.

    ``cuda="available"``: and only if torch sees a CUDA device (asks the driver, creates no
    context). ``cuda="initialized"``: and only if torch has already initialised CUDA, so asking it
    about memory costs nothing.
    """
    torch = sys.modules.get("torch")
    if torch is None or cuda is None:
        return torch
    ready = torch.cuda.is_available() if cuda == "available" else torch.cuda.is_initialized()
    return torch if ready else None
