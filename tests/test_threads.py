"""memplan._threads: cleanup that waits for the work in flight, not for threads."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from memplan._threads import stop_pool


def test_stop_pool_returns_after_the_work_in_flight_and_cancels_the_queued() -> None:
    pool = ThreadPoolExecutor(1)
    done: list[int] = []
    started = threading.Event()

    def work(n: int) -> None:
        started.set()
        time.sleep(0.1)
        done.append(n)

    running = pool.submit(work, 1)
    queued = pool.submit(work, 2)
    started.wait()
    stop_pool(pool, [running, queued])
    assert done == [1] and queued.cancelled()
