"""Threads of ours: cleanup waits for the work in flight, not for threads; a periodic worker
starts once, and again after a stop that a Ctrl-C cut short."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from memplan._periodic import Periodic
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


def test_periodic_started_from_many_threads_at_once_runs_one_worker() -> None:
    worker = Periodic("memplan-test-once", 0.01, lambda: None)
    go = threading.Barrier(8)

    def start() -> None:
        go.wait()
        worker.start()

    starters = [threading.Thread(target=start) for _ in range(8)]
    for thread in starters:
        thread.start()
    for thread in starters:
        thread.join()
    try:
        assert sum(t.name == "memplan-test-once" and t.is_alive() for t in threading.enumerate()) == 1
    finally:
        worker.stop()


def test_periodic_started_while_a_cut_short_stop_ends_its_pass_runs_again() -> None:
    """As after a Ctrl-C inside stop(): the stop was asked for, the last pass is still running."""
    passes: list[float] = []
    in_pass = threading.Event()

    def work() -> None:
        passes.append(time.monotonic())
        in_pass.set()
        time.sleep(0.2)

    worker = Periodic("memplan-test-restart", 0.01, work, immediately=True)
    worker.start()
    in_pass.wait()
    worker._stop.set()  # the stop's wait was interrupted: only its request remains
    worker.start()
    restarted = time.monotonic()
    try:
        deadline = restarted + 5
        while not any(at > restarted for at in passes) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any(at > restarted for at in passes), "no pass ran after start()"
    finally:
        worker.stop()


def test_after_all_calls_once_every_future_is_done_and_waits_for_none() -> None:
    from concurrent.futures import Future

    from memplan._threads import after_all

    called: list[str] = []
    futures: list[Future[None]] = [Future(), Future()]
    after_all(futures, lambda: called.append("then"))  # returns at once
    futures[0].set_result(None)
    assert called == []
    futures[1].set_exception(OSError("failed"))  # done is done, however it ended
    assert called == ["then"]
    after_all([], lambda: called.append("now"))
    assert called == ["then", "now"]
