"""A daemon thread that runs one piece of work every interval until stopped.

The monitor's sampler, the residency manager's idle cleanup and the loader's RSS sampler all
need the same thing: start (again) on demand, survive a failing pass, and stop within one
interval with the thread joined.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from memplan._logtext import failure_text

__all__ = ["Periodic"]

log = logging.getLogger(__name__)


class Periodic:
    """Runs ``work`` every ``interval_s`` on a thread named ``name``.

    ``immediately`` runs the first pass at start rather than one interval later. An exception
    in a pass goes to ``on_error`` (default: logged) and the next pass runs as planned.
    """

    def __init__(
        self,
        name: str,
        interval_s: float,
        work: Callable[[], object],
        *,
        immediately: bool = False,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self.work = work
        self.immediately = immediately
        self.on_error = on_error
        self.thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # a pass asked for now, or the stop
        self._stopped = threading.Event()
        self._starting = threading.Lock()  # two start() at once would make two threads

    def start(self) -> None:
        with self._starting:
            if self.thread is threading.current_thread():  # a pass restarting its own worker
                self._stop.clear()
                return
            if self.thread is not None and self.thread.is_alive() and not self._stopped.is_set():
                if not self._stop.is_set():
                    return  # running
                self._stopped.wait()  # a stop (perhaps one a Ctrl-C cut short) ends its last pass first
            self._stop.clear()
            self._wake.clear()
            self._stopped.clear()
            self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            self._passes()
        finally:
            self._stopped.set()

    def _passes(self) -> None:
        if not self.immediately and self._sleep():
            return
        while True:
            try:
                self.work()
            except Exception as exc:  # the thread must outlive one bad pass
                if self.on_error is None:
                    log.error("%s: a pass failed: %s", self.name, failure_text(exc, trace=True))
                else:
                    self.on_error(exc)
            if self._sleep():
                return

    def _sleep(self) -> bool:
        """Wait one interval, or until :meth:`wake` or :meth:`stop`; whether stopped."""
        self._wake.wait(self.interval_s)
        self._wake.clear()
        return self._stop.is_set()

    def wake(self) -> None:
        """Run the next pass now rather than at the end of the interval (after the one under way)."""
        self._wake.set()

    def stop(self) -> None:
        """Stop; returns within one interval (plus a pass in progress), once the last pass is done.

        Waits for the thread's last pass, not ``join``: see :mod:`memplan._threads`."""
        self._stop.set()
        self._wake.set()
        # From inside a pass (a callback that stops its monitor) the thread ends after this pass.
        if self.thread is not None and self.thread is not threading.current_thread():
            self._stopped.wait()
