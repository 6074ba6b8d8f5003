"""Stopping worker threads on a path a Ctrl-C may interrupt.

``Thread.join`` (and so ``ThreadPoolExecutor.shutdown(wait=True)``) on Python 3.11 can turn a
KeyboardInterrupt landing inside it into ``RuntimeError: release unlocked lock`` (its bpo-45274
recovery releases a lock the exiting thread still holds). What a cleanup needs is that the work
in flight has finished, not that the threads are gone: it waits for that work, then lets idle
threads exit by themselves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

__all__ = ["after_all", "settle", "stop_pool"]


def settle(futures: Iterable[Future[Any]]) -> None:
    """Cancel what has not started and return once the rest has finished."""
    # cancel() is False only for a future running or done. One cancelled before it ran never
    # notifies its waiters: wait() on it would never return, so it is left out.
    wait([future for future in futures if not future.cancel()])


def stop_pool(pool: ThreadPoolExecutor, in_flight: Iterable[Future[Any]]) -> None:
    """Cancel ``pool``'s queued work and return once ``in_flight`` has finished, joining no thread."""
    pool.shutdown(wait=False, cancel_futures=True)
    settle(in_flight)


def after_all(futures: Iterable[Future[Any]], then: Callable[[], None]) -> None:
    """Call ``then`` once every one of ``futures`` is done, without waiting here: now if they
    are, else on the thread that finishes the last. For cleanups a garbage collection may run,
    on any thread, the one running those futures too, where waiting for them would wait forever."""
    left = list(futures)
    if not left:
        then()
        return
    count = [len(left)]
    lock = threading.Lock()

    def one_done(_: Future[Any]) -> None:
        with lock:
            count[0] -= 1
            last = count[0] == 0
        if last:
            then()

    for future in left:
        future.add_done_callback(one_done)
