"""The process's positional reads and read jobs: bounded pools made on first use, never at
import, and made again in a child after ``fork``. :mod:`memplan._io` says who waits for whom."""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

from memplan._fileio import read_exactly
from memplan._threads import settle

__all__ = [
    "CHUNK",
    "THREAD_PREFIX",
    "IOExecutor",
    "IOStats",
    "OpenFile",
    "Range",
    "Serial",
    "Source",
    "executor",
    "max_threads",
    "on_read_thread",
]

T = TypeVar("T")

CHUNK = 16 << 20  # one request; 8 MiB requests read the same shards a fifth slower here
THREAD_PREFIX = "memplan-io"
_JOBS = 4  # quantized layers read at once (each a few requests), a .bin's load, the cache's writer
# Requests in flight: one 16 MiB read at a time reached ~500 MiB/s on a cold NVMe here, four
# ~1.5 GiB/s, eight kept it busy; more threads than that only help where there are cores to spare.
_READS_MIN, _READS_MAX = 8, 16


def _read_threads() -> int:
    return min(_READS_MAX, max(_READS_MIN, 2 * (os.cpu_count() or 1)))


def max_threads() -> int:
    """The most threads the executor runs: its reading threads and its job threads."""
    return _read_threads() + _JOBS


class Range(NamedTuple):
    """``len(view)`` bytes of ``file`` from ``offset`` into ``view``, a buffer the caller owns."""

    file: Path
    offset: int
    view: memoryview
    tensor: str | None = None  # named in an error


class Source(Protocol):
    """Where a read gets its descriptor: for as long as the ``with`` lasts, it stays open.
    ``tensor`` is what the read is for, for an error to name."""

    def use(self, file: Path, tensor: str | None = None) -> AbstractContextManager[int]: ...


@dataclass(frozen=True)
class OpenFile:
    """A :class:`Source` of one descriptor the caller opened and closes after its reads."""

    fd: int

    def use(self, file: Path, tensor: str | None = None) -> AbstractContextManager[int]:
        return nullcontext(self.fd)


@dataclass(frozen=True)
class IOStats:
    """What the executor is allowed and what it has read."""

    read_threads: int
    job_threads: int
    requests: int
    bytes_read: int


_lane = threading.local()


def _mark(lane: str) -> None:
    _lane.name = lane


def on_read_thread() -> bool:
    """Whether this is one of the executor's reading threads."""
    return getattr(_lane, "name", None) == "read"


class IOExecutor:
    """The process's positional reads and read jobs; see the module's notes on who waits for whom."""

    def __init__(self, read_threads: int, job_threads: int) -> None:
        self.read_threads = read_threads
        self.job_threads = job_threads
        self._reads = ThreadPoolExecutor(
            read_threads, thread_name_prefix=f"{THREAD_PREFIX}-read", initializer=_mark, initargs=("read",)
        )
        self._jobs = ThreadPoolExecutor(
            job_threads, thread_name_prefix=f"{THREAD_PREFIX}-job", initializer=_mark, initargs=("job",)
        )
        self._lock = threading.Lock()
        self._requests = self._bytes = 0

    @staticmethod
    def split(part: Range) -> list[Range]:
        """``part`` as requests of at most :data:`CHUNK` bytes, in file order."""
        file, offset, view, tensor = part
        return [Range(file, offset + at, view[at : at + CHUNK], tensor) for at in range(0, len(view), CHUNK)]

    def read(self, source: Source, parts: Iterable[Range]) -> None:
        """Fill every part, all requests in flight together; return once all have landed. On a
        failure or a Ctrl-C the requests not started are cancelled and those running waited
        for, so nothing writes into a caller's buffer after this returns or raises."""
        requests = [request for part in parts for request in self.split(part)]
        if len(requests) <= 1 or on_read_thread():  # one request: a thread hop would cost more
            for request in requests:
                self._pread(source, request)
            return
        futures = [self._reads.submit(self._pread, source, request) for request in requests]
        try:
            for future in futures:
                future.result()
        except BaseException:
            settle(futures)
            raise

    def submit_read(self, source: Source, part: Range) -> Future[None]:
        """One request of at most :data:`CHUNK` bytes on a reading thread (here, on one)."""
        if not on_read_thread():
            return self._reads.submit(self._pread, source, part)
        done: Future[None] = Future()
        try:
            self._pread(source, part)
            done.set_result(None)
        except Exception as exc:
            done.set_exception(exc)
        return done

    def start(self, source: Source, parts: Iterable[Range], then: Callable[[], T]) -> Future[T]:
        """Start filling ``parts`` and return at once: a future of ``then()``, called on the
        thread that finishes the last request (or here, for nothing to read). ``cancel()``
        cancels the requests not started; the future is done once the others have landed."""
        requests = [request for part in parts for request in self.split(part)]
        gathered: _Gathered[T] = _Gathered(then)
        gathered.watch([self._reads.submit(self._pread, source, request) for request in requests])
        return gathered

    def submit(self, job: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``job(*args)`` on a job thread. A job may wait for reads, never for another job."""
        return self._jobs.submit(job, *args)

    def stats(self) -> IOStats:
        with self._lock:
            return IOStats(self.read_threads, self.job_threads, self._requests, self._bytes)

    def _pread(self, source: Source, part: Range) -> None:
        with source.use(part.file, part.tensor) as fd:
            read_exactly(fd, part.view, part.offset, file=part.file, tensor=part.tensor)
        with self._lock:
            self._requests += 1
            self._bytes += len(part.view)


class _Gathered(Future[T]):
    """Done once each of its parts is: ``then()``'s value, or the first part's failure."""

    def __init__(self, then: Callable[[], T]) -> None:
        super().__init__()
        self.set_running_or_notify_cancel()  # cancel() cancels its parts instead (below)
        self._then = then
        self._parts: list[Future[None]] = []
        self._lock = threading.Lock()
        self._left = 0
        self._failure: BaseException | None = None

    def watch(self, parts: list[Future[None]]) -> None:
        self._parts, self._left = parts, len(parts)
        if not parts:
            self._finish()
        for part in parts:
            part.add_done_callback(self._one_done)

    def cancel(self) -> bool:
        for part in self._parts:
            part.cancel()
        return False  # done once the parts already running have landed

    def _one_done(self, part: Future[None]) -> None:
        failure = CancelledError() if part.cancelled() else part.exception()
        with self._lock:
            self._left -= 1
            last = self._left == 0
            if self._failure is None:
                self._failure = failure
        if last:
            self._finish()

    def _finish(self) -> None:
        if self._failure is not None:
            self.set_exception(self._failure)
            return
        try:
            self.set_result(self._then())
        except BaseException as exc:
            self.set_exception(exc)


_current: IOExecutor | None = None
_current_lock = threading.Lock()


def executor() -> IOExecutor:
    """The process's executor, made on first use."""
    global _current
    found = _current
    if found is None:
        with _current_lock:
            if _current is None:  # threads start as work arrives, not here
                _current = IOExecutor(_read_threads(), _JOBS)
            found = _current
    return found


def _forget_after_fork() -> None:
    """A child has none of its parent's threads: a pool believing it has would never run work."""
    global _current, _current_lock
    _current, _current_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


class Serial:
    """Jobs run one after the other, in the order given, on the executor's job threads: a
    background writer with no thread of its own. A job whose future is cancelled before it
    starts is skipped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[tuple[Future[Any], Callable[[], Any]]] = deque()
        self._busy = False

    def submit(self, job: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            self._queue.append((future, job))
            first, self._busy = not self._busy, True
        if first:
            executor().submit(self._next)
        return future

    def _next(self) -> None:
        with self._lock:
            future, job = self._queue.popleft()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(job())
            except BaseException as exc:
                future.set_exception(exc)
        with self._lock:
            more = self._busy = bool(self._queue)
        if more:  # one job a turn: reads waiting for a job thread get one between writes
            executor().submit(self._next)
