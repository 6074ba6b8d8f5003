"""memplan._threads: cleanup that waits for work, not threads; torch's pool shared and put back."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from memplan._threads import one_intra_op_thread, stop_pool


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


def test_one_intra_op_thread_holds_for_its_thread_only_and_is_put_back() -> None:
    before = torch.get_num_threads()
    seen: dict[str, int] = {}
    inside = threading.Event()
    done = threading.Event()

    def loader() -> None:
        with one_intra_op_thread():
            with one_intra_op_thread():  # nested: the outer setting survives the inner one
                pass
            seen["loader"] = torch.get_num_threads()
            inside.set()
            done.wait()
        seen["after"] = torch.get_num_threads()

    thread = threading.Thread(target=loader)
    thread.start()
    inside.wait()
    seen["other thread"] = torch.get_num_threads()  # a user's inference beside the load
    done.set()
    thread.join()
    assert seen == {"loader": 1, "other thread": before, "after": before}
    assert torch.get_num_threads() == before
