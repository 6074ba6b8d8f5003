"""Tensor bytes straight from safetensors files into tensors, by positional reads.

The header was validated by :func:`memplan.inspect`; this reads the data it points at into a
buffer the caller owns (a fresh host tensor, an arena slot, a pinned staging buffer), so a load
never holds an mmap of the whole file nor a second copy of a tensor. A tensor larger than one
request is read in parallel chunks; positional reads let threads share descriptors.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from memplan._dtypes import TORCH_NAMES
from memplan._fileio import FileIdentity, read_exactly
from memplan._threads import settle, stop_pool
from memplan.errors import CheckpointError
from memplan.loaders._readahead import ReadAhead, Window
from memplan.planner.bin_header import load_bin
from memplan.planner.checkpoint import Checkpoint, TensorInfo
from memplan.planner.strategies import READ_AHEAD_BYTES

if TYPE_CHECKING:
    import torch

__all__ = ["TensorReader", "torch_dtype"]

_CHUNK = 16 << 20  # 8 MiB requests read the same shards a fifth slower here
_READERS = 8
_FILES_PER_THREAD = 4  # descriptors each reading thread keeps open, the most recently used
_PROC_FDS = Path("/proc/self/fd")  # where a descriptor opens again as the same file (Linux)
_REOPEN = _PROC_FDS.is_dir()
_CHANGED = "changed on disk since it was first read (replaced or rewritten): load the model again"
_AHEAD = 8  # tensors in flight at once; with the chunk readers, enough requests to keep a disk busy


def torch_dtype(name: str, *, tensor: str = "", file: Path | None = None) -> torch.dtype:
    """The torch dtype for a safetensors dtype name, or a :class:`CheckpointError` saying it has none."""
    import torch

    found = getattr(torch, TORCH_NAMES.get(name.upper(), ""), None)
    if not isinstance(found, torch.dtype):
        raise CheckpointError(file or Path("?"), f"dtype {name} has no torch equivalent here", tensor)
    return found


class TensorReader:
    """Reads tensors of one checkpoint; counts bytes read; thread-safe; close() or ``with``.

    :meth:`read_ahead` starts reading the tensors a load will ask for next, in that order, into
    tensors the reader owns, up to ``window`` bytes ahead of the consumer: while the consumer
    casts, converts, quantizes or copies one tensor, the next ones are already coming off the
    disk, several requests in flight. The window bounds the host memory this takes; the planner
    sizes it for each plan (``strategy.read_ahead``) and counts it.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        on_bytes: Callable[[int], None] | None = None,
        *,
        window: int = READ_AHEAD_BYTES,
    ) -> None:
        self.checkpoint = checkpoint
        self.bytes_read = 0
        self._on_bytes = on_bytes
        self._files = _Descriptors()
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._ahead: ReadAhead[str, torch.Tensor] = ReadAhead(
            lambda name: self._read_new(self.info(name)),
            self._size,
            window=window,
            threads=_AHEAD,
            name="memplan-ahead",
            initializer=self._files.own_thread,
        )

    @property
    def window(self) -> Window:
        """The read-ahead's byte budget, which a quantized-weights cache shares."""
        return self._ahead.window

    def read_ahead(self, names: Iterable[str]) -> None:
        """Read ``names`` (in this order) ahead of :meth:`read` asking for them, instead of what
        was queued before: reads under way that ``names`` lacks are let go."""
        self._ahead.restart(names)

    def start_reading(self, names: Iterable[str]) -> None:
        """Read the first window's worth of ``names`` the checkpoint has, in this order, before
        the load says what it reads: the load maps its names meanwhile, and :meth:`read_ahead`
        then takes over. For a load that reads every tensor, in its model's own order."""
        head: list[str] = []
        total = 0
        for info in (self.checkpoint.tensors.get(name) for name in names):
            if info is None:
                continue
            total += info.nbytes
            if head and total > self._ahead.window.size:
                break
            head.append(info.name)
        self._ahead.restart(head)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.checkpoint.tensors[name]
        except KeyError:
            lacks = "the model needs it, the checkpoint lacks it"
            raise CheckpointError(self.checkpoint.path, lacks, name) from None

    def read(self, name: str) -> torch.Tensor:
        """A new host tensor with ``name``'s data, in the file's dtype and shape."""
        return self._ahead.take(name)

    def _size(self, name: str) -> int | None:
        info = self.checkpoint.tensors.get(name)
        return None if info is None else info.nbytes

    def _read_new(self, info: TensorInfo) -> torch.Tensor:
        import torch

        out = torch.empty(info.shape, dtype=torch_dtype(info.dtype, tensor=info.name, file=info.file))
        self.read_into(info, out)
        return out

    def read_into(self, info: TensorInfo, out: torch.Tensor) -> None:
        """Fill the contiguous host tensor ``out`` (``info.nbytes`` long) with ``info``'s bytes."""
        self.read_all_into([(info, out)])

    def read_all_into(self, pairs: list[tuple[TensorInfo, torch.Tensor]]) -> None:
        """:meth:`read_into` for every ``(info, out)`` pair, all their reads in flight together:
        a module's tensors one after the other left the disk with one request for each tensor
        of a chunk or less."""
        import torch

        ranges = []
        for info, out in pairs:
            if info.nbytes and info.file.suffix == ".bin":
                self._copy_from_bin(info, out)
            elif info.nbytes:
                view = memoryview(out.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
                ranges += [
                    (info, view, at, min(_CHUNK, info.nbytes - at)) for at in range(0, info.nbytes, _CHUNK)
                ]
        # Several reads in flight keep a cold disk busy; one synchronous stream reaches a fraction.
        if len(ranges) == 1:
            self._read_range(*ranges[0])
        elif ranges:
            pool = self._pool()
            _all_or_none([pool.submit(self._read_range, *r) for r in ranges])
        for file in {info.file for info, _ in pairs if info.nbytes}:
            self._files.check(file)
        for info, _ in pairs:
            if info.file.suffix != ".bin":
                self._count(info.nbytes)

    def _read_range(self, info: TensorInfo, view: memoryview, start: int, length: int) -> None:
        fd = self._files.fd(info.file)
        read_exactly(fd, view[start : start + length], info.offset + start, file=info.file, tensor=info.name)

    def _copy_from_bin(self, info: TensorInfo, out: torch.Tensor) -> None:
        """A ``.bin`` holds pickled storages, not tensors at offsets: copy from its memory map."""
        with self._lock:
            if info.file not in self._bins:
                self._files.fd(info.file)  # the file as first seen, or an error
                self._bins[info.file] = load_bin(info.file)
                self._files.check(info.file, by_path=True)  # and it was that file torch mapped
            source = self._bins[info.file][info.name]
        out.copy_(source.reshape(out.shape))
        self._count(info.nbytes)

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes
        if self._on_bytes is not None:
            self._on_bytes(nbytes)

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    _READERS, thread_name_prefix="memplan-read", initializer=self._files.own_thread
                )
            return self._executor

    def close(self) -> None:
        self._ahead.close()  # first: its reads use the chunk pool and the descriptors
        with self._lock:
            self._bins = {}
            executor, self._executor = self._executor, None
        if executor is not None:  # idle: every chunk read belongs to a read that has returned
            stop_pool(executor, ())
        self._files.close()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_shard(file: Path, path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise CheckpointError(file, f"cannot open shard: {exc.strerror}") from exc


class _Descriptors:
    """The checkpoint's open files. Each file is opened once and held until :meth:`close`, so a
    file replaced on disk (a new download renamed over it) goes on being read as it was; one
    opened again after close(), or rewritten in place, must still be the file first opened
    (:meth:`check` after each read), or reading it fails.

    Threads of the reader's own pools read through descriptors of their own, opened again from
    the held one (so the same file): the kernel keeps one read-ahead state per open file, which
    parallel reads at distant offsets through one descriptor defeat (a fifth slower on the same
    shards here). Other threads (a forward's, a ``state_dict()`` caller's) share the held one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[Path, int] = {}
        self._identity: dict[Path, FileIdentity] = {}  # kept across close()
        self._own: set[int] = set()
        self._mine: dict[int, dict[Path, int]] = {}  # own thread -> file -> fd, oldest use first

    def own_thread(self) -> None:
        """Called by each thread of the reader's pools as it starts."""
        with self._lock:
            self._own.add(threading.get_ident())

    def fd(self, file: Path) -> int:
        """A descriptor of ``file`` for this thread to read through until close()."""
        with self._lock:
            held = self._held.get(file)
            if held is None:
                held = self._held[file] = self._open(file)
            me = threading.get_ident()
            if me not in self._own or not _REOPEN:
                return held
            mine = self._mine.setdefault(me, {})
            fd = mine.pop(file, None)
            if fd is None:
                if len(mine) >= _FILES_PER_THREAD:
                    os.close(mine.pop(next(iter(mine))))  # this thread's own: nobody else reads it
                fd = _open_shard(file, _PROC_FDS / str(held))
            mine[file] = fd
            return fd

    def _open(self, file: Path) -> int:
        fd = _open_shard(file, file)
        found = FileIdentity.of(fd)
        if not self._identity.setdefault(file, found).same_bytes(found):
            os.close(fd)
            raise CheckpointError(file, _CHANGED)
        return fd

    def check(self, file: Path, *, by_path: bool = False) -> None:
        """Raise if ``file`` (the one held, or ``by_path`` the one its name now leads to) has
        changed since it was first opened: bytes just read from a file rewritten in place may
        be the new ones, or a mix."""
        with self._lock:
            held = self._held.get(file)
            if held is None:
                return
            try:
                now = FileIdentity.of(file if by_path else held)
            except OSError as exc:  # gone since: whatever was read came from elsewhere
                raise CheckpointError(file, _CHANGED) from exc
            if not self._identity[file].same_bytes(now):
                raise CheckpointError(file, _CHANGED)

    def close(self) -> None:
        with self._lock:
            fds = [*self._held.values(), *(fd for mine in self._mine.values() for fd in mine.values())]
            self._held, self._mine, self._own = {}, {}, set()
        for fd in fds:
            os.close(fd)


def _all_or_none(chunks: list[Future[None]]) -> None:
    """Wait for every chunk; on a failure or a Ctrl-C, cancel the rest and wait for those already
    running, so that no read writes into the caller's tensor, or uses a descriptor close()
    gives back, once the caller has left."""
    try:
        for future in chunks:
            future.result()
    except BaseException:
        settle(chunks)
        raise
