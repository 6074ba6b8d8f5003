"""New files written past the page cache hold exactly what was given, wherever O_DIRECT fails."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Any

import pytest

from memplan import _fileio


def _parts(sizes: list[int]) -> list[memoryview]:
    return [memoryview(os.urandom(size)) for size in sizes]


@pytest.mark.parametrize(
    "sizes",
    [[0], [1], [4095], [4096], [4097], [100, 5000, 1], [(8 << 20) - 1, 2], [8 << 20], [(8 << 20) + 4096, 7]],
)
def test_the_file_holds_the_parts_one_after_the_other(tmp_path: Path, sizes: list[int]) -> None:
    parts = _parts(sizes)
    _fileio.write_new_file(tmp_path / "f", parts, fsync=True)
    assert (tmp_path / "f").read_bytes() == b"".join(bytes(p) for p in parts)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o600


def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        _fileio.write_new_file(tmp_path / "f", _parts([10]), fsync=False)
    assert (tmp_path / "f").read_bytes() == b"keep"


def test_a_filesystem_that_refuses_o_direct_at_open_gets_a_buffered_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def no_direct(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    parts = _parts([5000, 3])
    _fileio.write_new_file(tmp_path / "f", parts, fsync=True)
    assert (tmp_path / "f").read_bytes() == b"".join(bytes(p) for p in parts)


def test_a_filesystem_that_opens_o_direct_but_refuses_its_writes_gets_a_buffered_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    refused = []

    def direct_refused(fd: int, data: Any) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", direct_refused)
    parts = _parts([(8 << 20) + 10, 3])
    _fileio.write_new_file(tmp_path / "f", parts, fsync=False)
    assert refused and (tmp_path / "f").read_bytes() == b"".join(bytes(p) for p in parts)


def test_other_write_errors_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space"):
        _fileio.write_new_file(tmp_path / "f", _parts([10]), fsync=False)


def test_parts_of_any_format_are_written_as_their_bytes(tmp_path: Path) -> None:
    import numpy as np

    floats = np.arange(3000, dtype=np.float32)
    grid = np.arange(2 * 700, dtype=np.int64).reshape(2, 700)
    _fileio.write_new_file(tmp_path / "f", [memoryview(floats), memoryview(grid)], fsync=False)
    assert (tmp_path / "f").read_bytes() == floats.tobytes() + grid.tobytes()
