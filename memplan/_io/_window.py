"""The read-ahead window: one byte budget for the reads a load makes ahead of its consumers.
:mod:`memplan._io` says who waits for whom."""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

__all__ = ["Window", "WindowStats"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True)
class WindowStats:
    """A window's state, or one owner's share of it."""

    size: int
    held: int  # bytes read ahead and not taken, and reads let go that have not landed yet
    in_flight: int  # reads started and not taken
    queued: int  # reads waiting for room


@dataclass(eq=False)
class _Entry:
    owner: Hashable
    key: Hashable
    size: int
    start: Callable[[Any], Future[Any]]
    done: Future[Any] = field(default_factory=Future)  # what take() waits for
    inner: Future[Any] | None = None  # the read itself, once started
    landed: bool = False
    gone: bool = False  # taken, or let go: nobody will take it from the window
    let_go: bool = False  # nobody will take it at all: cancelled if it has not started
    released: bool = False  # its bytes have left the window


class Window:
    """Reads ahead of consumers that know what they will ask for, and in which order, with at
    most ``size`` bytes read and not yet taken (a read larger than that is made when nothing
    else is held). Several owners share it (a repeat quantized load reads the cache's states
    and the checkpoint's other tensors ahead at once, and the planner counts one window): the
    first owner to queue has its reads started first as room is made.

    Each owner passes ``start(key)``, which starts a read and returns its future without
    waiting, and ``size_of(key)`` (None: never read ahead; :meth:`take` reads it). Thread-safe.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._queues: dict[Hashable, deque[_Entry]] = {}  # per owner, in the order owners came
        self._queued: dict[tuple[Hashable, Hashable], _Entry] = {}
        self._started: dict[tuple[Hashable, Hashable], _Entry] = {}  # not yet taken
        self._holding: set[_Entry] = set()  # entries whose bytes are in the window
        self._held = 0

    def extend(
        self,
        owner: Hashable,
        keys: Iterable[K],
        start: Callable[[K], Future[Any]],
        size_of: Callable[[K], int | None],
    ) -> None:
        """Queue ``keys`` (those not queued or read ahead already) behind ``owner``'s others."""
        sized = [(key, size_of(key)) for key in dict.fromkeys(keys)]
        with self._lock:
            self._queue(owner, sized, start)
        self._top_up()

    def replace(
        self,
        owner: Hashable,
        keys: Iterable[K],
        start: Callable[[K], Future[Any]],
        size_of: Callable[[K], int | None],
    ) -> None:
        """Make ``keys``, in this order, ``owner``'s reads ahead: reads started (or landed)
        that ``keys`` holds are kept, never read twice, and the queue follows the new order;
        reads ``keys`` lacks are let go (cancelled, or their bytes leave the window as they
        land). The same keys again change nothing: the reads under way go on."""
        sized = [(key, size_of(key)) for key in dict.fromkeys(keys)]
        wanted = {key for key, _ in sized}
        with self._lock:
            let_go = [e for e in self._started.values() if e.owner == owner and e.key not in wanted]
            for entry in let_go:
                del self._started[owner, entry.key]
            self._let_go(let_go)
            self._unqueue(owner)
            self._queue(owner, sized, start)
        self._cancel(let_go)
        self._top_up()

    def take(self, owner: Hashable, key: K, read: Callable[[K], V]) -> V:
        """``key``'s value: the read ahead's, or ``read(key)`` now (and dropped from the
        queue) when its turn has not come or it was never queued."""
        with self._lock:
            entry = self._started.pop((owner, key), None)
            if entry is None:
                queued = self._queued.pop((owner, key), None)
                if queued is not None:
                    queued.gone = True  # its turn reads nothing
            else:
                entry.gone = True
        if entry is None:
            return read(key)
        try:
            return cast(V, entry.done.result())
        finally:  # a Ctrl-C before it landed: its bytes leave as it lands
            with self._lock:
                freed = self._release(entry) if entry.landed else 0
            if freed:
                self._top_up()

    def drop(self, owner: Hashable) -> list[Future[Any]]:
        """Let every read of ``owner``'s go and empty its queue, waiting for nothing; returns
        the futures of reads still under way, for an owner that must wait for them."""
        with self._lock:
            let_go = [e for e in self._started.values() if e.owner == owner]
            for entry in let_go:
                del self._started[owner, entry.key]
            freed = self._let_go(let_go)
            self._unqueue(owner)
            self._queues.pop(owner, None)
            running = [e.done for e in let_go if not e.landed]
        self._cancel(let_go)
        if freed:
            self._top_up()
        return running

    def stats(self, owner: Hashable | None = None) -> WindowStats:
        """The whole window's state, or ``owner``'s share."""

        def mine(entry: _Entry) -> bool:
            return owner is None or entry.owner == owner

        with self._lock:
            return WindowStats(
                self.size,
                sum(e.size for e in self._holding if mine(e)),
                sum(1 for e in self._started.values() if mine(e)),
                sum(1 for e in self._queued.values() if mine(e)),
            )

    # -- under the lock: bookkeeping only ------------------------------------------------
    def _queue(
        self, owner: Hashable, sized: list[tuple[Any, int | None]], start: Callable[[Any], Any]
    ) -> None:
        queue = self._queues.setdefault(owner, deque())
        for key, size in sized:
            if size is not None and (owner, key) not in self._queued and (owner, key) not in self._started:
                entry = _Entry(owner, key, size, start)
                self._queued[owner, key] = entry
                queue.append(entry)

    def _unqueue(self, owner: Hashable) -> None:
        queue = self._queues.get(owner, deque())
        for entry in queue:
            entry.gone = True
            self._queued.pop((owner, entry.key), None)
        queue.clear()

    def _let_go(self, entries: list[_Entry]) -> int:
        freed = 0
        for entry in entries:
            entry.gone = entry.let_go = True
            if entry.landed:
                freed += self._release(entry)
        return freed

    def _release(self, entry: _Entry) -> int:
        if entry.released:
            return 0
        entry.released = True
        self._holding.discard(entry)
        self._held -= entry.size
        return entry.size

    def _claim(self) -> list[_Entry]:
        claimed = []
        for queue in self._queues.values():
            while queue:
                entry = queue[0]
                if entry.gone:  # taken out of turn, or replaced
                    queue.popleft()
                    continue
                if self._held and self._held + entry.size > self.size:
                    break  # full for this owner's next read: a release tops it up again
                queue.popleft()
                del self._queued[entry.owner, entry.key]
                self._started[entry.owner, entry.key] = entry
                self._holding.add(entry)
                self._held += entry.size
                entry.done.set_running_or_notify_cancel()  # waited on, never cancelled itself
                claimed.append(entry)
        return claimed

    # -- outside the lock: starting, cancelling, landing -----------------------------------
    def _top_up(self) -> None:
        with self._lock:
            claimed = self._claim()
        wired = 0
        try:
            for entry in claimed:
                self._start(entry)
                wired += 1
        except BaseException:  # a Ctrl-C: what was claimed and not wired is waited on by nobody's read
            for entry in claimed[wired:]:
                self._abandon(entry)
            raise

    def _start(self, entry: _Entry) -> None:
        try:
            inner = entry.start(entry.key)
        except Exception as exc:  # the taker raises it
            inner = Future()
            inner.set_exception(exc)
        with self._lock:
            entry.inner = inner
            cancel = entry.let_go  # while it was starting
        if cancel:
            inner.cancel()
        inner.add_done_callback(functools.partial(self._landed, entry))

    def _abandon(self, entry: _Entry) -> None:
        """An entry claimed whose read may never report: its bytes leave the window and whoever
        waits for it (a taker, a closing owner) sees it cancelled, so nothing waits forever."""
        if entry.inner is not None:
            entry.inner.cancel()
        with self._lock:
            entry.landed = entry.gone = entry.let_go = True
            self._release(entry)
        _complete(entry.done, CancelledError())

    def _cancel(self, entries: list[_Entry]) -> None:
        for entry in entries:
            if entry.inner is not None:  # else its starter cancels it
                entry.inner.cancel()

    def _landed(self, entry: _Entry, inner: Future[Any]) -> None:
        with self._lock:
            entry.landed = True
            freed = self._release(entry) if entry.gone else 0
        if inner.cancelled():
            _complete(entry.done, CancelledError())
        elif inner.exception() is not None:
            _complete(entry.done, inner.exception())
        else:
            _complete(entry.done, None, inner.result())
        if freed:
            self._top_up()


def _complete(done: Future[Any], error: BaseException | None, result: Any = None) -> None:
    """Settle ``done`` once: a read that lands after its entry was abandoned settles nothing."""
    try:
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)
    except InvalidStateError:
        pass
