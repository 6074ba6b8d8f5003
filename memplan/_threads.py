"""Threads of ours beside torch's: stopping workers on a path a Ctrl-C may interrupt, and
sharing the cores with torch's intra-op pool.

``Thread.join`` (and so ``ThreadPoolExecutor.shutdown(wait=True)``) on Python 3.11 can turn a
KeyboardInterrupt landing inside it into ``RuntimeError: release unlocked lock`` (its bpo-45274
recovery releases a lock the exiting thread still holds). What a cleanup needs is that the work
in flight has finished, not that the threads are gone: it waits for that work, then lets idle
threads exit by themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any

__all__ = ["one_intra_op_thread", "stop_pool"]


def stop_pool(pool: ThreadPoolExecutor, in_flight: Iterable[Future[Any]]) -> None:
    """Cancel ``pool``'s queued work and return once ``in_flight`` has finished, joining no thread."""
    pool.shutdown(wait=False, cancel_futures=True)
    # A future that shutdown cancelled never notifies its waiters: wait() on it would never return.
    wait([future for future in in_flight if not future.cancelled()])


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """torch's CPU ops on one thread inside, for work that shares the cores with a busy thread of
    ours (the quantized-weights cache writer). With two intra-op threads on a two-core machine
    every op waits for a worker the other thread has displaced: an int8 load of a 1B Llama took
    7.4-8.3 s so, 5.8-6.6 s on one. torch's OpenMP setting belongs to the calling thread, so
    other threads keep theirs; this thread's is put back on the way out."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
