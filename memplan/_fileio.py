"""File I/O shared by the checkpoint reader, the disk tier and the quantized-weights cache:
positional reads that fill a caller's buffer, new files written past the page cache, and what a
file is (to tell a file that changed from one that did not)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from memplan.errors import CheckpointError

__all__ = [
    "FileIdentity",
    "content_identity",
    "content_key",
    "private_dirs",
    "read_exactly",
    "write_new_file",
]

_ALIGN = 4096  # O_DIRECT wants buffer, offset and length on the device's logical block size
_STAGE = 8 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileIdentity:
    """What the kernel says a file is, without reading it."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    links: int

    @classmethod
    def of(cls, file: int | Path) -> FileIdentity:
        """The identity of an open descriptor, or of the file a path leads to."""
        return cls.from_stat(os.stat(file))

    @classmethod
    def from_stat(cls, found: os.stat_result) -> FileIdentity:
        return cls(
            found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_nlink
        )

    def same_bytes(self, now: FileIdentity) -> bool:
        """Whether ``now`` (this file, looked at again) may still hold the bytes it held.

        The mtime alone misses a same-size rewrite whose writer put the mtime back (``os.utime``,
        or a filesystem whose mtime ticks every 1-2 s); the ctime moves on every write, and
        nobody can set it back. It also moves on a chmod, a chown or a new hard link, which are
        taken for a change too (a typed error, never other bytes). One change is let through: the
        file's last name gone (a new download renamed over it), which leaves the bytes a holder
        of the file reads as they were, and no name to write them through."""
        if (self.device, self.inode, self.size, self.mtime_ns) != (
            now.device,
            now.inode,
            now.size,
            now.mtime_ns,
        ):
            return False
        return self.ctime_ns == now.ctime_ns or now.links == 0


def content_key(file: Path) -> str:
    """What the bytes of ``file`` are, as far as can be told without reading them: the file's
    (device, inode, size, mtime, ctime). A file replaced or written to gets another key (the ctime
    cannot be set back, nor survive an inode reused); a copy of the same bytes elsewhere does
    too: a miss, never a wrong hit.

    A Hugging Face cache blob adds the sha256 it is named by. The name alone would be the bytes'
    identity only while nobody writes to the blob, and a write through a snapshot's link lands
    in the blob itself: it keeps the name and gets other bytes. Two revisions that share a blob
    link the same file, so they share its key."""
    real = Path(os.path.realpath(file))
    i = FileIdentity.of(real)
    key = f"stat:{i.device}:{i.inode}:{i.size}:{i.mtime_ns}:{i.ctime_ns}"
    if real.parent.name == "blobs" and _SHA256.fullmatch(real.name):
        key = f"sha256:{real.name}:{key}"
    return key


def content_identity(keys: Iterable[str]) -> str:
    """One key for the bytes of several files, from their :func:`content_key`s in order."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def private_dirs(path: Path) -> None:
    """Create ``path`` and every missing folder above it readable by the owner alone (0700);
    ``mkdir(mode=0o700, parents=True)`` gives the parents it creates the default mode."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            folder.mkdir(mode=0o700)
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))


def read_exactly(fd: int, view: memoryview, offset: int, *, file: Path, tensor: str | None = None) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` with positional reads; a short file is a
    :class:`CheckpointError` naming ``file`` and ``tensor``."""
    done = 0
    while done < len(view):
        try:
            got = os.preadv(fd, [view[done:]], offset + done)
        except OSError as exc:
            raise CheckpointError(file, f"read failed: {exc.strerror}", tensor) from exc
        if got == 0:
            missing = len(view) - done
            raise CheckpointError(file, f"file ends {missing} bytes short of this read (truncated?)", tensor)
        done += got


def write_new_file(path: Path, parts: Sequence[memoryview], *, fsync: bool) -> None:
    """Create ``path`` (it must not exist; mode 0600) holding the bytes of ``parts`` (contiguous
    buffers of any format) one after the other.

    Written with O_DIRECT through a page-aligned staging buffer where the filesystem takes it:
    a buffered write cost 2.7-4.4 s of CPU per GiB on this machine (copying into the page cache
    and accounting for it), O_DIRECT 0.3 s, and the load that writes the cache needs that CPU.
    Elsewhere (tmpfs refuses O_DIRECT) the file is written through the page cache."""
    parts = [part.cast("B") if part.format != "B" or part.ndim != 1 else part for part in parts]
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    direct = getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(path, flags | direct, 0o600) if direct else None
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        fd = None
    if fd is None:
        fd = os.open(path, flags, 0o600)
        direct = 0
    try:
        if direct and not _written_direct(fd, parts):
            direct = 0
        if not direct:
            for part in parts:
                _write_all(fd, part)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _written_direct(fd: int, parts: Sequence[memoryview]) -> bool:
    """Write ``parts`` with O_DIRECT; False (with the file emptied and O_DIRECT cleared) where
    the filesystem opened the file so but refuses the writes (EINVAL)."""
    import fcntl

    try:
        _write_staged(fd, parts)
        return True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    return False


def _write_staged(fd: int, parts: Sequence[memoryview]) -> None:
    """``parts`` through an aligned buffer in whole aligned blocks; the file is cut back to its
    real length after its last block is written padded."""
    total = sum(len(part) for part in parts)
    stage = _take_stage()
    filled = 0
    for part in parts:
        taken = 0
        while taken < len(part):
            n = min(len(stage) - filled, len(part) - taken)
            stage[filled : filled + n] = part[taken : taken + n]
            filled, taken = filled + n, taken + n
            if filled == len(stage):
                _write_all(fd, memoryview(stage))
                filled = 0
    if filled:
        padded = -(-filled // _ALIGN) * _ALIGN
        stage[filled:padded] = bytes(padded - filled)  # no earlier file's bytes, even for a moment
        _write_all(fd, memoryview(stage)[:padded])
    os.ftruncate(fd, total)
    _give_back(stage)  # only after a write that succeeded: a failed one's traceback may hold a view


_stages: list[mmap.mmap] = []  # staging buffers kept for the next write: a fresh map costs a page
_stages_lock = threading.Lock()  # fault per 4 KiB, more than the copy through it
_KEPT_STAGES = 2


def _take_stage() -> mmap.mmap:
    with _stages_lock:
        if _stages:
            return _stages.pop()
    return mmap.mmap(-1, _STAGE)


def _give_back(stage: mmap.mmap) -> None:
    with _stages_lock:
        if len(_stages) < _KEPT_STAGES:
            _stages.append(stage)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]
