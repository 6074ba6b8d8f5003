"""ReadAhead: what the reader and the quantized-weights cache share."""

from __future__ import annotations

import threading
import time

import pytest

from memplan.loaders._readahead import ReadAhead, Window


def _gated(read: list[str], gate: threading.Event) -> ReadAhead[str, str]:
    def value(key: str) -> str:
        gate.wait(10)
        read.append(key)
        if key == "bad":
            raise OSError("unreadable")
        return key.upper()

    return ReadAhead(value, lambda key: None if key == "unknown" else 10, window=20, threads=4, name="t")


def test_keys_are_read_in_order_within_the_window_and_each_once() -> None:
    read: list[str] = []
    gate = threading.Event()
    ahead = _gated(read, gate)
    ahead.extend(["a", "b", "c", "a", "d"])
    assert (ahead.in_flight, ahead.held, ahead.queued) == (2, 20, 2)
    gate.set()
    assert ahead.take("c") == "C"  # out of turn: read now, and never again
    assert [ahead.take(k) for k in "abd"] == ["A", "B", "D"]
    ahead.close()
    assert sorted(read) == ["a", "b", "c", "d"]
    assert (ahead.in_flight, ahead.held, ahead.queued) == (0, 0, 0)


def test_a_failed_read_is_raised_to_the_taker_and_frees_its_share_of_the_window() -> None:
    read: list[str] = []
    gate = threading.Event()
    gate.set()
    ahead = _gated(read, gate)
    ahead.extend(["bad", "unknown", "b", "c"])
    with pytest.raises(OSError, match="unreadable"):
        ahead.take("bad")
    assert ahead.take("unknown") == "UNKNOWN"  # no size: never read ahead, read when asked
    assert ahead.take("b") == "B" and ahead.take("c") == "C"
    assert ahead.held == 0
    ahead.close()
    assert read.count("unknown") == 1


def test_close_cancels_what_has_not_started_and_waits_for_the_rest() -> None:
    read: list[str] = []
    started, gate = threading.Event(), threading.Event()

    def value(key: str) -> None:
        started.set()
        gate.wait(10)
        read.append(key)

    ahead = ReadAhead(value, lambda _: 1, window=100, threads=1, name="t")
    ahead.extend(["a", "b", "c"])
    assert started.wait(10)
    closer = threading.Thread(target=ahead.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # waiting for "a", which has started
    gate.set()
    closer.join(10)
    assert not closer.is_alive() and read == ["a"]


def test_restart_keeps_reads_still_wanted_and_lets_the_others_go() -> None:
    read: list[str] = []
    gate = threading.Event()
    ahead = _gated(read, gate)
    ahead.extend(["a", "b", "c"])  # a and b fill the window
    ahead.restart(["b", "d"])
    assert (ahead.in_flight, ahead.queued) == (1, 1)  # b kept, a let go, c dropped, d waits
    assert ahead.held == 20  # a's bytes stay counted until its read lands
    gate.set()
    assert ahead.take("b") == "B" and ahead.take("d") == "D"
    deadline = time.monotonic() + 5
    while (ahead.held or ahead.window.held) and time.monotonic() < deadline:
        time.sleep(0.01)  # a's bytes leave once its read lands, on its thread, maybe after d's
    assert ahead.held == 0 and ahead.window.held == 0
    ahead.close()
    assert sorted(read) == ["a", "b", "d"]


def test_read_aheads_sharing_a_window_hold_it_together_and_make_room_for_each_other() -> None:
    window = Window(20)
    read: list[str] = []
    first, second = (
        ReadAhead(lambda k: read.append(k) or k, lambda _: 10, window=window, threads=2, name="t")
        for _ in range(2)
    )
    first.extend(["a1", "a2", "a3"])
    second.extend(["b1", "b2"])
    assert (first.in_flight, second.in_flight, window.held) == (2, 0, 20)
    assert first.take("a1") == "a1"  # its room goes to whichever reader is first to claim it
    assert window.held == 20 and first.in_flight + second.in_flight == 2
    for key in ("a2", "a3", "b1", "b2"):
        assert (first if key[0] == "a" else second).take(key) == key
        assert window.held <= 20
    first.close()
    second.close()
    assert window.held == 0 and sorted(read) == ["a1", "a2", "a3", "b1", "b2"]
