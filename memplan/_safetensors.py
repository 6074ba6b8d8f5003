"""The safetensors format: read and validate one file's header without touching tensor data.

The planner reads a checkpoint's shape from these headers; the disk tier checks its own files with them.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the data
buffer. The checks here are those of the safetensors library (its Rust ``Metadata::validate``)
and a few more: a header cap, duplicate keys, unknown entry fields, and a byte count that must
match the file exactly, so a truncated download is caught before any load starts.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memplan._dtypes import BITS
from memplan._fileio import FileIdentity
from memplan.errors import CheckpointError

__all__ = ["MAX_HEADER_BYTES", "ShardHeader", "TensorEntry", "read_header"]

# The safetensors library refuses headers over 100 MB; so do we, before reading them.
MAX_HEADER_BYTES = 100_000_000
MAX_DIMS = 64
_INT64_MAX = 2**63 - 1

_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as its header describes it; ``offset`` is absolute in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    header_bytes: int
    file_bytes: int
    metadata: dict[str, str]
    tensors: tuple[TensorEntry, ...]
    identity: FileIdentity  # the file whose header this is: a reader opening it later checks it still is


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice")
        result[key] = value
    return result


def _read_prefix(path: Path) -> tuple[bytes, FileIdentity]:
    try:
        # Not blocking: a FIFO put in the file's place since it was found must not hang the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb", buffering=0) as f:  # two small reads: buffering would read ahead
            found = os.fstat(f.fileno())
            if not stat.S_ISREG(found.st_mode):
                raise CheckpointError(str(path), "not a regular file")
            size = found.st_size
            if size < 8:
                raise CheckpointError(
                    str(path), f"file is {size} bytes, shorter than the 8-byte header length"
                )
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(str(path), f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap")
            if 8 + n > size:
                raise CheckpointError(
                    str(path), f"header length {n} runs past the end of the {size}-byte file"
                )
            return f.read(n), FileIdentity.from_stat(found)
    except OSError as exc:
        raise CheckpointError(str(path), f"cannot read: {exc.strerror or exc}") from None


def _parse_json(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(str(path), "header is not UTF-8") from None
    if not text.startswith("{"):
        raise CheckpointError(str(path), "header does not start with '{'")
    try:
        parsed = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise CheckpointError(str(path), "header JSON is nested too deeply") from None
    except ValueError as exc:
        raise CheckpointError(str(path), f"header is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise CheckpointError(str(path), "header is not a JSON object")
    return parsed


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _metadata(path: Path, value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise CheckpointError(str(path), "__metadata__ must map strings to strings")
    return dict(value)


def _entry(path: Path, name: str, value: object) -> tuple[str, tuple[int, ...], int, int]:
    def bad(reason: str) -> CheckpointError:
        return CheckpointError(str(path), reason, tensor=name)

    if not isinstance(value, dict) or value.keys() != _ENTRY_KEYS:
        raise bad("entry must have exactly 'dtype', 'shape' and 'data_offsets'")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in BITS:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad("shape must be a list of non-negative integers")
    if len(shape) > MAX_DIMS:
        raise bad(f"{len(shape)} dimensions; at most {MAX_DIMS} are supported")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise bad("data_offsets must be two non-negative integers")
    begin, end = offsets
    if begin > end:
        raise bad(f"data_offsets [{begin}, {end}] end before they begin")
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > _INT64_MAX:
            raise bad(f"shape {shape} has more elements than int64 can count")
    bits = numel * BITS[dtype]
    if bits % 8:
        raise bad(f"{numel} elements of {dtype} do not fill whole bytes")
    if bits // 8 != end - begin:
        raise bad(f"shape {shape} of {dtype} is {bits // 8} bytes but data_offsets span {end - begin}")
    return dtype, tuple(shape), begin, end


def _check_layout(path: Path, spans: list[tuple[int, int, str]], data_bytes: int) -> None:
    expected = 0
    for begin, end, name in sorted(spans):
        if begin < expected:
            raise CheckpointError(
                str(path), f"data at byte {begin} overlaps the previous tensor", tensor=name
            )
        if begin > expected:
            raise CheckpointError(
                str(path), f"gap before byte {begin}: offsets must be contiguous", tensor=name
            )
        expected = end
    if expected != data_bytes:
        why = "truncated?" if expected > data_bytes else "trailing bytes"
        raise CheckpointError(
            str(path), f"tensors span {expected} data bytes, file holds {data_bytes} ({why})"
        )


def read_header(path: Path) -> ShardHeader:
    """The validated header of the safetensors file ``path``; reads N + 8 bytes, nothing more."""
    raw, identity = _read_prefix(path)
    size = identity.size
    parsed = _parse_json(path, raw)
    data_start = 8 + len(raw)
    metadata: dict[str, str] = {}
    entries: list[TensorEntry] = []
    spans: list[tuple[int, int, str]] = []
    for name, value in parsed.items():
        if name == "__metadata__":
            metadata = _metadata(path, value)
            continue
        dtype, shape, begin, end = _entry(path, name, value)
        entries.append(TensorEntry(name, dtype, shape, data_start + begin, end - begin))
        spans.append((begin, end, name))
    _check_layout(path, spans, size - data_start)
    return ShardHeader(path, len(raw), size, metadata, tuple(entries), identity)
