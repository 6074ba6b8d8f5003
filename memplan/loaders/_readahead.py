"""Reading ahead of a consumer that asks for things in a known order, within a byte window.

Both the checkpoint reader and the quantized-weights cache know, before a load starts, what it
will ask for and in which order: reading those ahead, several at a time, keeps a cold disk busy
while the consumer converts, quantizes or places what it already has. The window bounds the host
memory this holds; the planner sizes it for each plan (``strategy.read_ahead``) and counts it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from memplan._threads import stop_pool

__all__ = ["ReadAhead", "Window"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Window:
    """A byte budget that several :class:`ReadAhead` share: a repeat quantized load reads the
    cache's states and the checkpoint's other tensors ahead at once, and the planner counts
    one window, not one for each."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.held = 0
        self._lock = threading.Lock()
        self._members: list[ReadAhead[Any, Any]] = []

    def _claim(self, nbytes: int) -> bool:
        """Count ``nbytes`` in if they fit; a read larger than the window is made when it is empty."""
        with self._lock:
            if self.held and self.held + nbytes > self.size:
                return False
            self.held += nbytes
            return True

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes
            members = list(self._members)
        for member in members:  # room made by one member may be what another waits for
            member._top_up()


class ReadAhead(Generic[K, V]):
    """``read(key)`` run ahead of :meth:`take`, in queue order, ``threads`` at once, with at most
    ``window`` bytes (by ``size(key)``; a :class:`Window` others may share) read and not yet
    taken. Thread-safe; :meth:`close` waits for the reads under way."""

    def __init__(
        self,
        read: Callable[[K], V],
        size: Callable[[K], int | None],
        *,
        window: int | Window,
        threads: int,
        name: str,
        initializer: Callable[[], None] | None = None,
    ) -> None:
        self.window = window if isinstance(window, Window) else Window(window)
        self.window._members.append(self)
        self._read = read
        self._size = size
        self._threads = threads
        self._name = name
        self._initializer = initializer  # run by each reading thread as it starts
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._queue: deque[tuple[K, int]] = deque()
        self._queued: set[K] = set()  # what the queue holds that has not been taken out of turn
        self._in_flight: dict[K, tuple[Future[V], int]] = {}
        # Reads nobody will take: left by a failure or a Ctrl-C, or let go by restart(), with
        # the bytes they still hold in the window; close() waits for them.
        self._abandoned: list[tuple[Future[V], int]] = []

    def extend(self, keys: Iterable[K]) -> None:
        """Queue ``keys`` (those not queued or in flight already); a key ``size`` has no size for
        is left out, for :meth:`take` to read (or fail on) itself."""
        sized = [(key, self._size(key)) for key in dict.fromkeys(keys)]
        with self._lock:
            for key, size in sized:
                if size is not None and key not in self._queued and key not in self._in_flight:
                    self._queue.append((key, size))
                    self._queued.add(key)
        self._top_up()

    def restart(self, keys: Iterable[K]) -> None:
        """Read ahead ``keys``, in this order, instead of what was queued: reads in flight that
        ``keys`` lacks are let go (their bytes leave the window once they land)."""
        wanted = list(dict.fromkeys(keys))
        keep = set(wanted)
        with self._lock:
            self._queue.clear()
            self._queued.clear()
            let_go = [self._in_flight.pop(k) for k in list(self._in_flight) if k not in keep]
            self._abandoned += let_go
        for future, _ in let_go:  # once it lands, its bytes leave the window
            future.add_done_callback(lambda _: self._top_up())
        self.extend(wanted)

    def _top_up(self) -> None:
        with self._lock:
            landed = sum(size for future, size in self._abandoned if future.done())
            self._abandoned = [(future, size) for future, size in self._abandoned if not future.done()]
        if landed:
            self.window._release(landed)
        with self._lock:
            while self._queue:
                key, size = self._queue[0]
                if key not in self._queued:  # taken out of turn: nobody will ask again
                    self._queue.popleft()
                    continue
                if not self.window._claim(size):
                    return  # full: a release tops this up again
                self._queue.popleft()
                self._queued.discard(key)
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        self._threads, thread_name_prefix=self._name, initializer=self._initializer
                    )
                self._in_flight[key] = (self._pool.submit(self._read, key), size)

    def take(self, key: K) -> V:
        """``key``'s value: the read ahead's, or read now (and dropped from the queue) when its
        turn has not come."""
        with self._lock:
            ahead = self._in_flight.pop(key, None)
            if ahead is None:
                self._queued.discard(key)
        if ahead is None:
            return self._read(key)
        future, size = ahead
        try:
            return future.result()
        except BaseException:
            with self._lock:  # still reading, maybe (a Ctrl-C here): close() waits for it
                self._abandoned.append((future, 0))  # its bytes leave the window below
            raise
        finally:
            self.window._release(size)  # tops this up, and any other reader sharing the window

    @property
    def held(self) -> int:
        """Bytes this holds in the window: reads in flight, and reads let go not yet landed."""
        with self._lock:
            return sum(size for _, size in [*self._in_flight.values(), *self._abandoned])

    @property
    def in_flight(self) -> int:
        """Reads started and not yet taken."""
        return len(self._in_flight)

    @property
    def queued(self) -> int:
        """Keys waiting for room in the window."""
        return len(self._queued)

    def close(self) -> None:
        """Drop the queue; cancel reads not started and return once the rest have finished."""
        with self._lock:
            self._queue.clear()
            self._queued.clear()
            pool, self._pool = self._pool, None
            dropped = [*self._in_flight.values(), *self._abandoned]
            self._in_flight, self._abandoned = {}, []
        if pool is not None:
            stop_pool(pool, [future for future, _ in dropped])
        self.window._release(sum(size for _, size in dropped))  # a take() under way frees its own
