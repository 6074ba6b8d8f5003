"""The process's reading threads and the read-ahead window every reader shares."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest

from memplan import _io
from memplan._io import CHUNK, THREAD_PREFIX, OpenFile, Range, Serial, Window, executor


def _io_threads() -> int:
    return sum(t.name.startswith(THREAD_PREFIX) for t in threading.enumerate())


# --- the window ----------------------------------------------------------------------------


class Gated:
    """Reads that wait for ``gate``, run on threads of their own, as a reader's would."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.read: list[str] = []
        self.started: list[str] = []

    def value(self, key: str) -> str:
        self.started.append(key)
        self.gate.wait(10)
        self.read.append(key)
        if key == "bad":
            raise OSError("unreadable")
        return key.upper()

    def start(self, key: str) -> Future[str]:
        return executor().submit(self.value, key)

    def wait_started(self, count: int) -> bool:
        deadline = time.monotonic() + 10
        while len(self.started) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(self.started) >= count

    @staticmethod
    def size(key: str) -> int | None:
        return None if key == "unknown" else 10


def _settled(window: Window) -> bool:
    deadline = time.monotonic() + 5
    while window.stats().held and time.monotonic() < deadline:
        time.sleep(0.01)  # reads let go leave the window as they land, on their own threads
    return window.stats().held == 0


def test_keys_are_read_in_order_within_the_window_and_each_once() -> None:
    window, reads = Window(20), Gated()
    window.extend("me", ["a", "b", "c", "a", "d"], reads.start, reads.size)
    assert window.stats("me") == _io.WindowStats(20, 20, 2, 2)
    reads.gate.set()
    assert window.take("me", "c", reads.value) == "C"  # out of turn: read now, and never again
    assert [window.take("me", k, reads.value) for k in "abd"] == ["A", "B", "D"]
    assert window.drop("me") == []
    assert sorted(reads.read) == ["a", "b", "c", "d"]
    assert window.stats() == _io.WindowStats(20, 0, 0, 0)


def test_a_failed_read_is_raised_to_the_taker_and_frees_its_share_of_the_window() -> None:
    window, reads = Window(20), Gated()
    reads.gate.set()
    window.extend("me", ["bad", "unknown", "b", "c"], reads.start, reads.size)
    with pytest.raises(OSError, match="unreadable"):
        window.take("me", "bad", reads.value)
    assert window.take("me", "unknown", reads.value) == "UNKNOWN"  # no size: read when asked
    assert window.take("me", "b", reads.value) == "B" and window.take("me", "c", reads.value) == "C"
    assert window.stats().held == 0 and reads.read.count("unknown") == 1


def test_a_read_that_cannot_start_is_raised_to_the_taker() -> None:
    window = Window(20)

    def start(key: str) -> Future[str]:
        raise OSError(f"cannot start {key}")

    window.extend("me", ["a"], start, lambda _: 1)
    with pytest.raises(OSError, match="cannot start a"):
        window.take("me", "a", str.upper)
    assert window.stats().held == 0


def test_drop_waits_for_nothing_and_hands_back_what_is_still_running() -> None:
    window, reads = Window(100), Gated()
    window.extend("me", ["a", "b"], reads.start, reads.size)
    assert reads.wait_started(2)
    running = window.drop("me")  # returns at once
    assert len(running) == 2 and not any(f.done() for f in running)
    assert window.stats().held == 20  # until they land
    reads.gate.set()
    assert [f.result(10) for f in running] == ["A", "B"]
    assert _settled(window)


def test_replace_keeps_reads_still_wanted_and_lets_the_others_go() -> None:
    window, reads = Window(20), Gated()
    window.extend("me", ["a", "b", "c"], reads.start, reads.size)  # a and b fill the window
    assert reads.wait_started(2)  # running: letting a go cannot cancel it
    window.replace("me", ["b", "d"], reads.start, reads.size)
    assert window.stats("me").in_flight == 1 and window.stats("me").queued == 1  # b kept, d waits
    assert window.stats().held == 20  # a's bytes stay counted until its read lands
    reads.gate.set()
    assert window.take("me", "b", reads.value) == "B" and window.take("me", "d", reads.value) == "D"
    assert _settled(window)
    assert "c" not in reads.read and reads.read.count("b") == 1


def test_the_same_plan_again_goes_on_with_the_reads_under_way() -> None:
    window, reads = Window(20), Gated()
    window.replace("me", ["a", "b", "c", "d"], reads.start, reads.size)
    window.replace("me", ["a", "b", "c", "d"], reads.start, reads.size)
    assert window.stats("me") == _io.WindowStats(20, 20, 2, 2)
    reads.gate.set()
    assert [window.take("me", k, reads.value) for k in "abcd"] == ["A", "B", "C", "D"]
    assert sorted(reads.read) == ["a", "b", "c", "d"]  # none read twice


def test_owners_sharing_a_window_hold_it_together_and_make_room_for_each_other() -> None:
    window, reads = Window(20), Gated()
    reads.gate.set()
    window.extend("first", ["a1", "a2", "a3"], reads.start, lambda _: 10)
    window.extend("second", ["b1", "b2"], reads.start, lambda _: 10)
    assert (window.stats("first").in_flight, window.stats("second").in_flight) == (2, 0)
    assert window.take("first", "a1", reads.value) == "A1"  # its room goes to the first owner in line
    assert window.stats().held == 20 and window.stats("first").in_flight == 2
    for key in ("a2", "a3", "b1", "b2"):
        assert window.take("first" if key[0] == "a" else "second", key, reads.value) == key.upper()
        assert window.stats().held <= 20
    assert window.stats() == _io.WindowStats(20, 0, 0, 0)


def test_a_read_larger_than_the_window_is_made_when_nothing_else_is_held() -> None:
    window, reads = Window(5), Gated()
    reads.gate.set()
    window.extend("me", ["a", "b"], reads.start, reads.size)
    assert window.stats("me").in_flight == 1
    assert window.take("me", "a", reads.value) == "A" and window.stats("me").in_flight == 1


# --- the executor --------------------------------------------------------------------------


def _file(tmp_path: Path, nbytes: int) -> Path:
    path = tmp_path / "data"
    path.write_bytes((bytes(range(251)) * (nbytes // 251 + 1))[:nbytes])
    return path


def test_reads_of_many_requests_fill_the_buffer_on_a_bounded_number_of_threads(tmp_path: Path) -> None:
    size = 2 * CHUNK + 123
    path = _file(tmp_path, size)
    want = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        bufs = [bytearray(size - 7) for _ in range(8)]
        before = executor().stats().requests
        readers = [
            threading.Thread(target=executor().read, args=(OpenFile(fd), [Range(path, 7, memoryview(buf))]))
            for buf in bufs
        ]
        for thread in readers:
            thread.start()
        for thread in readers:
            thread.join(30)
    finally:
        os.close(fd)
    assert all(bytes(buf) == want[7:] for buf in bufs)
    assert executor().stats().requests - before >= 8 * 3
    assert _io_threads() <= _io.max_threads()


def test_start_returns_at_once_and_then_runs_once_every_request_has_landed(tmp_path: Path) -> None:
    path = _file(tmp_path, 3 * CHUNK)
    buf = bytearray(3 * CHUNK)
    fd = os.open(path, os.O_RDONLY)
    try:
        future = executor().start(OpenFile(fd), [Range(path, 0, memoryview(buf))], lambda: bytes(buf[:4]))
        assert future.result(30) == path.read_bytes()[:4]
        assert bytes(buf) == path.read_bytes()
        assert executor().start(OpenFile(fd), [], lambda: "nothing to read").result(0) == "nothing to read"
    finally:
        os.close(fd)


def test_a_short_file_fails_the_read_naming_the_file(tmp_path: Path) -> None:
    import memplan

    path = _file(tmp_path, 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(memplan.CheckpointError, match="short"):
            executor().read(OpenFile(fd), [Range(path, 0, memoryview(bytearray(2 * CHUNK)), "w")])
        future = executor().start(OpenFile(fd), [Range(path, 50, memoryview(bytearray(CHUNK)))], lambda: 1)
        with pytest.raises(memplan.CheckpointError, match="short"):
            future.result(30)
    finally:
        os.close(fd)


def test_a_read_asked_for_on_a_reading_thread_runs_there(tmp_path: Path) -> None:
    """A reading thread that waited for another read could wait for ever: every reading thread
    could be one that waits."""
    path = _file(tmp_path, 2 * CHUNK)
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(2 * CHUNK)
    seen: list[str] = []

    def nested() -> None:
        seen.append(threading.current_thread().name)
        executor().read(OpenFile(fd), [Range(path, 0, memoryview(buf))])
        seen.append(threading.current_thread().name)

    class Nesting:
        def use(self, file: Path, tensor: str | None = None) -> object:
            nested()
            return OpenFile(fd).use(file)

    try:
        executor().start(Nesting(), [Range(path, 0, memoryview(bytearray(1)))], lambda: None).result(30)  # type: ignore[arg-type]
    finally:
        os.close(fd)
    assert bytes(buf) == path.read_bytes() and seen[0] == seen[1] and seen[0].startswith(THREAD_PREFIX)


def test_serial_jobs_run_one_at_a_time_in_order_and_a_cancelled_one_is_skipped() -> None:
    serial, ran, running = Serial(), [], []
    gate = threading.Event()

    def job(n: int) -> Callable[[], int]:
        def run() -> int:
            running.append(n)
            assert len(running) == 1, "two jobs at once"
            if n == 0:
                gate.wait(10)
            ran.append(n)
            running.remove(n)
            return n

        return run

    futures = [serial.submit(job(n)) for n in range(6)]
    assert futures[3].cancel()
    gate.set()
    assert [f.result(10) for f in futures if not f.cancelled()] == [0, 1, 2, 4, 5]
    assert ran == [0, 1, 2, 4, 5]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_reads_on_threads_of_its_own(tmp_path: Path) -> None:
    path = _file(tmp_path, 2 * CHUNK)
    fd = os.open(path, os.O_RDONLY)
    executor().read(OpenFile(fd), [Range(path, 0, memoryview(bytearray(2 * CHUNK)))])  # threads up
    pid = os.fork()
    if pid == 0:  # the child: the parent's reading threads are not here
        code = 1
        try:
            buf = bytearray(2 * CHUNK)
            future = executor().start(OpenFile(fd), [Range(path, 0, memoryview(buf))], lambda: bytes(buf))
            code = 0 if future.result(20) == path.read_bytes() else 2
        finally:
            os._exit(code)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_importing_memplan_makes_no_io_thread() -> None:
    import subprocess

    code = (
        "import threading, memplan, memplan._io as io;"
        "assert io._executor._current is None;"
        "assert not [t for t in threading.enumerate() if t.name.startswith(io.THREAD_PREFIX)]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_read_taken_while_it_is_being_started_is_not_cancelled() -> None:
    window, reads = Window(20), Gated()
    reads.gate.set()
    starting, go_on = threading.Event(), threading.Event()

    def slow_start(key: str) -> Future[str]:
        starting.set()
        go_on.wait(10)
        return reads.start(key)

    queuer = threading.Thread(target=window.extend, args=("me", ["a"], slow_start, reads.size))
    queuer.start()
    assert starting.wait(10)
    taker: list[str] = []
    thread = threading.Thread(target=lambda: taker.append(window.take("me", "a", str.lower)))
    thread.start()
    go_on.set()
    thread.join(10)
    queuer.join(10)
    assert taker == ["A"] and window.stats().held == 0
