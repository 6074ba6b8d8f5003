"""bitsandbytes, imported and run inside memplan's own calls without its noise.

bitsandbytes 0.50 logs on import, on a CPU with AVX512-BF16 and without the ``kernels`` package,
that it could not load the kernels-community 4-bit gemm (it falls back to its own native one);
and on every int8 forward on the CPU, for every layer, that bfloat16 inputs are cast to float16
(140 lines for one forward of a 1B Llama). Inside memplan's imports of bitsandbytes and its own
forward (the CLI's check) a filter on exactly those two loggers drops exactly those
messages for the call's duration (``memplan doctor`` says what the first one means). The process's
logging configuration and warning filters are never touched.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from memplan.errors import MissingDependency

__all__ = ["import_bitsandbytes", "quiet_bitsandbytes"]

_NOISE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "bitsandbytes.autograd._functions": "MatMul8bitLt: inputs will be cast",
}


class _Drop(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextmanager
def quiet_bitsandbytes() -> Iterator[None]:
    """Drop bitsandbytes' two known messages from its own loggers for the block."""
    filters = [(logging.getLogger(name), _Drop(prefix)) for name, prefix in _NOISE.items()]
    for logger, drop in filters:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger, drop in filters:
            logger.removeFilter(drop)


def import_bitsandbytes(feature: str = "quantized loading") -> Any:
    """The bitsandbytes module, imported quietly; :class:`MissingDependency` naming ``feature``
    and the extra that installs it where it is not installed.

    Asked for once per tensor of a quantized load: once imported, it is handed back without
    touching a logger (``logging.getLogger`` takes logging's module lock, and a Ctrl-C landing
    between its acquire and release leaves it held: every other thread's logging then waits
    for good)."""
    found = sys.modules.get("bitsandbytes")
    if found is not None and not getattr(found.__spec__, "_initializing", False):  # whole, not mid-import
        return found
    try:
        with quiet_bitsandbytes():
            import bitsandbytes
    except ImportError as exc:
        raise MissingDependency("bitsandbytes", "quant", feature) from exc
    return bitsandbytes
