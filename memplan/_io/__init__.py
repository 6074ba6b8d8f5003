"""Concurrency in one room: the process's reading threads and the read-ahead window.

Every reader in the package (the checkpoint reader, the quantized-weights cache, the disk tier)
reads through :func:`executor`: one bounded pool of reading threads that fill caller-owned
buffers with positional reads, in requests of at most :data:`CHUNK` bytes, and a few job threads
for work that is more than one request (a quantized layer's stored states, a ``.bin`` shard's
``torch.load``) and for the quantized cache's writes (:class:`Serial`). The pools are made on
first use, never at import, and made again in a child after ``fork``. The reads ahead of one
load share one :class:`Window`: a byte budget and the queue of reads waiting for room in it.

Lock order, and who waits for whom
----------------------------------
Every lock here and in the readers' read paths (:class:`Window`'s, :class:`Serial`'s, the
singleton's; the checkpoint reader's descriptor table and its ``.bin`` table) is a leaf: code
holding one takes no other lock of ours, opens, stats, reads or closes no file, runs no
``torch.load``, submits no work, completes no future, runs no callback and waits for nothing.
Each of those happens after the lock is released; what it found is published under the lock
again (a descriptor opened twice at once keeps the first and closes the other).

Waits go one way, so the bounded pools cannot deadlock:

* a caller's thread may wait for jobs and for reads;
* a job may wait for reads, never for another job;
* a read waits for nothing: :meth:`IOExecutor.read` called on a reading thread reads there, and
  what runs as a read lands (a :meth:`IOExecutor.start` ``then``, the window's bookkeeping)
  only counts, checks a file's identity and submits more.

A thread waiting for a once-only ``torch.load`` (the reader's ``.bin`` table) waits for a thread
already running it, never for queued work. Cleanup that a garbage collection may run waits for
nothing: a read let go keeps its bytes in the window until it lands, and the last read using a
reader's descriptors gives them back.
"""

from memplan._io._executor import (
    CHUNK,
    THREAD_PREFIX,
    IOExecutor,
    IOStats,
    OpenFile,
    Range,
    Serial,
    Source,
    executor,
    max_threads,
    on_read_thread,
)
from memplan._io._window import Window, WindowStats

__all__ = [
    "CHUNK",
    "THREAD_PREFIX",
    "IOExecutor",
    "IOStats",
    "OpenFile",
    "Range",
    "Serial",
    "Source",
    "Window",
    "WindowStats",
    "executor",
    "max_threads",
    "on_read_thread",
]
