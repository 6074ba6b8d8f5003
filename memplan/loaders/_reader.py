"""Tensor bytes straight from safetensors files into tensors, by positional reads.

The header was validated by :func:`memplan.inspect`; this reads the data it points at into a
buffer the caller owns (a fresh host tensor, an arena slot, a pinned staging buffer), so a load
never holds an mmap of the whole file nor a second copy of a tensor. The reads run on the
process's reading threads (:mod:`memplan._io`), a tensor larger than one request in parallel
requests; positional reads let threads share descriptors.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from memplan._dtypes import TORCH_NAMES
from memplan._fileio import FileIdentity
from memplan._io import Range, Window, executor, on_read_thread
from memplan._threads import after_all
from memplan._torchbin import load_bin
from memplan.errors import CheckpointError
from memplan.planner import READ_AHEAD_BYTES, Checkpoint, TensorInfo

if TYPE_CHECKING:
    import torch

__all__ = ["TensorReader", "torch_dtype"]

_FILES_PER_THREAD = 4  # descriptors each reading thread keeps open, the most recently used
_PROC_FDS = Path("/proc/self/fd")  # where a descriptor opens again as the same file (Linux)
_REOPEN = _PROC_FDS.is_dir()
_CHANGED = "changed on disk since it was inspected (replaced or rewritten): inspect and load it again"


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
        self.window = Window(window)  # the read-ahead's byte budget, which a quantized-weights cache shares
        self._on_bytes = on_bytes
        self._files = _Descriptors(checkpoint.identities)
        self._lock = threading.Lock()
        self._bins: dict[Path, Future[dict[str, torch.Tensor]]] = {}  # each .bin loaded once

    def read_ahead(self, names: Iterable[str]) -> None:
        """Read ``names`` (in this order) ahead of :meth:`read` asking for them: the one plan of
        reads ahead, which a later call changes without starting over. Reads already started
        or landed that ``names`` holds are kept (never read twice) and the rest of the queue
        follows the new order; reads ``names`` lacks are let go. The same names again change
        nothing: the reads under way go on."""
        self.window.replace(self, names, self._start, self._size)

    def start_reading(self, names: Iterable[str]) -> None:
        """:meth:`read_ahead` for the names the checkpoint has (others are left out, not an
        error): for a load that reads every tensor, in its model's own order, before it has
        mapped its names. A later :meth:`read_ahead` of what the load reads continues it."""
        tensors = self.checkpoint.tensors
        self.read_ahead(name for name in names if name in tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.checkpoint.tensors[name]
        except KeyError:
            lacks = "the model needs it, the checkpoint lacks it"
            raise CheckpointError(self.checkpoint.path, lacks, name) from None

    def read(self, name: str) -> torch.Tensor:
        """A new host tensor with ``name``'s data, in the file's dtype and shape."""
        return self.window.take(self, name, lambda key: self._read_new(self.info(key)))

    def _size(self, name: str) -> int | None:
        info = self.checkpoint.tensors.get(name)
        return None if info is None else info.nbytes

    def _start(self, name: str) -> Future[torch.Tensor]:
        """Start reading ``name`` into a new tensor, returning at once (the window's reads)."""
        info = self.checkpoint.tensors[name]
        if info.file.suffix == ".bin":
            return executor().submit(self._read_new, info)
        out = _empty(info)

        def landed() -> torch.Tensor:
            self._landed([info])
            return out

        return executor().start(self._files, self._ranges([(info, out)]), landed)

    def _read_new(self, info: TensorInfo) -> torch.Tensor:
        out = _empty(info)
        self.read_into(info, out)
        return out

    def read_into(self, info: TensorInfo, out: torch.Tensor) -> None:
        """Fill the contiguous host tensor ``out`` (``info.nbytes`` long) with ``info``'s bytes."""
        self.read_all_into([(info, out)])

    def read_all_into(self, pairs: list[tuple[TensorInfo, torch.Tensor]]) -> None:
        """:meth:`read_into` for every ``(info, out)`` pair, all their reads in flight together:
        a module's tensors one after the other left the disk with one request for each tensor
        of a chunk or less."""
        for info, out in pairs:
            if info.nbytes and info.file.suffix == ".bin":
                self._copy_from_bin(info, out)
        # Several reads in flight keep a cold disk busy; one synchronous stream reaches a fraction.
        executor().read(self._files, self._ranges(pairs))
        self._landed([info for info, _ in pairs])

    @staticmethod
    def _ranges(pairs: list[tuple[TensorInfo, torch.Tensor]]) -> list[Range]:
        """The positional reads that fill the safetensors tensors of ``pairs``."""
        import torch

        def view(out: torch.Tensor) -> memoryview:
            return memoryview(out.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]

        return [
            Range(info.file, info.offset, view(out), info.name)
            for info, out in pairs
            if info.nbytes and info.file.suffix != ".bin"
        ]

    def _landed(self, infos: list[TensorInfo]) -> None:
        """After the reads of ``infos``: their files are the ones first opened, and the bytes count."""
        for file in {info.file for info in infos if info.nbytes}:
            self._files.check(file)
        for info in infos:
            if info.file.suffix != ".bin":
                self._count(info.nbytes)

    def _copy_from_bin(self, info: TensorInfo, out: torch.Tensor) -> None:
        """A ``.bin`` holds pickled storages, not tensors at offsets: copy from its memory map."""
        source = self._bin(info.file)[info.name]
        out.copy_(source.reshape(out.shape))
        self._count(info.nbytes)

    def _bin(self, file: Path) -> dict[str, torch.Tensor]:
        """``file``'s tensors, loaded once: the first thread to ask loads it, with no lock held;
        others asking meanwhile wait for that thread, and reads of other files go on."""
        loading: Future[dict[str, torch.Tensor]] | None = None
        try:  # from before the future is published: a Ctrl-C anywhere leaves no waiter hanging
            with self._lock:
                found = self._bins.get(file)
                if found is None:
                    loading = self._bins[file] = Future()
            if found is not None:
                return found.result()
            with self._files.use(file):  # the file as first seen, or an error
                pass
            loaded = load_bin(file)
            self._files.check(file, by_path=True)  # and it was that file torch mapped
        except BaseException as exc:
            if loading is not None:
                with self._lock:  # the next read tries again
                    if self._bins.get(file) is loading:
                        del self._bins[file]
                loading.set_exception(exc)
            raise
        assert loading is not None  # published above, when nobody was loading it
        loading.set_result(loaded)
        return loaded

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes
        if self._on_bytes is not None:
            self._on_bytes(nbytes)

    def close(self) -> None:
        """Let the reads ahead go and give the descriptors back, waiting for nothing (a garbage
        collection may run this): reads still under way give them back as the last one lands.
        A later read opens them again, as the same files."""
        running = self.window.drop(self)
        with self._lock:
            self._bins = {}
        self._files.close()
        if running:  # a read let go may have opened a descriptor after the close above
            after_all(running, self._files.close)

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _empty(info: TensorInfo) -> torch.Tensor:
    import torch

    return torch.empty(info.shape, dtype=torch_dtype(info.dtype, tensor=info.name, file=info.file))


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

    The process's reading threads read through descriptors of their own, opened again from the
    held one (so the same file): the kernel keeps one read-ahead state per open file, which
    parallel reads at distant offsets through one descriptor defeat (a fifth slower on the same
    shards here). Other threads (a forward's, a ``state_dict()`` caller's) share the held one.

    No file is opened, stat'ed or closed under the lock. A descriptor is in use from
    :meth:`use` to the end of its ``with``; close() gives every one back once none is.
    """

    def __init__(self, inspected: Mapping[Path, FileIdentity]) -> None:
        self._lock = threading.Lock()
        self._held: dict[Path, int] = {}
        # Each file as inspect read its header, kept across close(): a file first opened after it
        # was replaced holds tensors where the old header said, or none (other weights, no error).
        self._identity: dict[Path, FileIdentity] = dict(inspected)
        self._mine: dict[int, dict[Path, int]] = {}  # reading thread -> file -> fd, oldest use first
        self._users = 0
        self._closing = False  # close() was asked while descriptors were in use

    @contextmanager
    def use(self, file: Path, tensor: str | None = None) -> Iterator[int]:
        """A descriptor of ``file`` for this thread to read through while the ``with`` lasts."""
        with self._using():
            held = self._held_fd(file, tensor)
            yield self._own_fd(file, held) if _REOPEN and on_read_thread() else held

    @contextmanager
    def _using(self) -> Iterator[None]:
        with self._lock:
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                fds = self._give_back() if self._closing and not self._users else []
            _close_all(fds)

    def _held_fd(self, file: Path, tensor: str | None) -> int:
        """The descriptor held for ``file``: opened outside the lock, the first one published."""
        with self._lock:
            held = self._held.get(file)
        if held is not None:
            return held
        fd = _open_shard(file, file)
        try:
            found = FileIdentity.of(fd)
        except OSError as exc:
            os.close(fd)
            raise CheckpointError(file, f"cannot stat shard: {exc.strerror}") from exc
        with self._lock:
            same = self._identity.setdefault(file, found).same_bytes(found)
            held = self._held.get(file)
            if held is None and same:
                held = self._held[file] = fd
                return fd
        os.close(fd)  # another thread's was published first, or the file is another now
        if held is None:
            raise CheckpointError(file, _CHANGED, tensor)
        return held

    def _own_fd(self, file: Path, held: int) -> int:
        """This reading thread's own descriptor of ``file``; its least recently used one closed
        past :data:`_FILES_PER_THREAD` (nobody else reads through it)."""
        me = threading.get_ident()
        with self._lock:
            mine = self._mine.setdefault(me, {})
            fd = mine.pop(file, None)
            if fd is not None:
                mine[file] = fd
                return fd
            evicted = mine.pop(next(iter(mine))) if len(mine) >= _FILES_PER_THREAD else None
        if evicted is not None:
            os.close(evicted)
        fd = _open_shard(file, _PROC_FDS / str(held))
        with self._lock:
            self._mine.setdefault(me, {})[file] = fd
        return fd

    def check(self, file: Path, *, by_path: bool = False) -> None:
        """Raise if ``file`` (the one held, or ``by_path`` the one its name now leads to) has
        changed since it was first opened: bytes just read from a file rewritten in place may
        be the new ones, or a mix."""
        with self._using():
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
        """Give every descriptor back: now, or as the last read using one finishes."""
        with self._lock:
            self._closing = True
            fds = self._give_back() if not self._users else []
        _close_all(fds)

    def _give_back(self) -> list[int]:
        fds = [*self._held.values(), *(fd for mine in self._mine.values() for fd in mine.values())]
        self._held, self._mine, self._closing = {}, {}, False
        return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
