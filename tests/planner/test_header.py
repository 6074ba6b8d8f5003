"""The safetensors header reader: agrees with the safetensors library on good files, and refuses a
corpus of malformed ones with a CheckpointError naming the file and, where there is one, the tensor."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from memplan import CheckpointError
from memplan import _safetensors as header_module
from memplan._safetensors import read_header


def raw_file(path: Path, header: bytes | str, data: bytes = b"", length: int | None = None) -> Path:
    raw = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def entry(
    dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None
) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape if shape is not None else [2], "data_offsets": offsets or [0, 8]}


def header_of(**tensors: object) -> str:
    return json.dumps(tensors)


def test_agrees_with_safetensors_on_real_files(tmp_path: Path) -> None:
    tensors = {
        "a": torch.zeros(3, 5, dtype=torch.float32),
        "b": torch.zeros(7, dtype=torch.bfloat16),
        "c": torch.zeros(2, 3, 4, dtype=torch.int8),
        "d": torch.zeros(0, 4, dtype=torch.float16),
        "e": torch.zeros((), dtype=torch.float64),
        "f": torch.zeros(4, dtype=torch.float8_e4m3fn),
        "g": torch.zeros(3, dtype=torch.bool),
    }
    path = tmp_path / "ok.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    ours = {t.name: t for t in header.tensors}
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == set(ours)
        for name in f.keys():  # noqa: SIM118  (safe_open is not a dict)
            s = f.get_slice(name)
            assert ours[name].dtype == s.get_dtype()
            assert list(ours[name].shape) == s.get_shape()
            assert ours[name].nbytes == tensors[name].numel() * tensors[name].element_size()


def too_long_length(p: Path) -> Path:
    return raw_file(p, "{}", length=2_000_000_000)


def past_the_end(p: Path) -> Path:
    return raw_file(p, '{"a":', length=4096)


def json_bomb(p: Path) -> Path:
    return raw_file(p, "{" + '"a":' * 1 + "[" * 100_000 + "]" * 100_000 + "}")


BAD = json.dumps({"a": entry()})
CORPUS: dict[str, tuple[Callable[[Path], Path], str, str | None]] = {
    "empty file": (lambda p: (p.write_bytes(b""), p)[1], "shorter than the 8-byte", None),
    "truncated length": (lambda p: (p.write_bytes(b"\x10\x00\x00"), p)[1], "shorter than the 8-byte", None),
    "2 GB header length": (too_long_length, "exceeds the 100000000-byte cap", None),
    "header past end of file": (past_the_end, "runs past the end", None),
    "truncated header": (lambda p: raw_file(p, BAD[:-5] + "     ", b""), "not valid JSON", None),
    "not utf-8": (lambda p: raw_file(p, b"{\xff\xfe}"), "not UTF-8", None),
    "not an object": (lambda p: raw_file(p, "[1, 2]"), "does not start with '{'", None),
    "leading junk": (lambda p: raw_file(p, ' {"a": 1}'), "does not start with '{'", None),
    "json bomb": (json_bomb, "nested too deeply", None),
    "duplicate key": (
        lambda p: raw_file(p, f'{{"a": {json.dumps(entry())}, "a": {json.dumps(entry())}}}', b"\0" * 8),
        "appears twice",
        None,
    ),
    "metadata not strings": (
        lambda p: raw_file(p, json.dumps({"__metadata__": {"k": 1}})),
        "__metadata__",
        None,
    ),
    "entry not an object": (lambda p: raw_file(p, json.dumps({"w": [1, 2]})), "exactly 'dtype'", "w"),
    "unknown field": (
        lambda p: raw_file(p, json.dumps({"w": {**entry(), "extra": 1}}), b"\0" * 8),
        "exactly 'dtype'",
        "w",
    ),
    "missing offsets": (
        lambda p: raw_file(p, json.dumps({"w": {"dtype": "F32", "shape": [2]}})),
        "exactly 'dtype'",
        "w",
    ),
    "unknown dtype": (
        lambda p: raw_file(p, header_of(w=entry("F12")), b"\0" * 8),
        "unknown dtype 'F12'",
        "w",
    ),
    "negative dim": (
        lambda p: raw_file(p, header_of(w=entry(shape=[-2, -1])), b"\0" * 8),
        "non-negative",
        "w",
    ),
    "float dim": (lambda p: raw_file(p, header_of(w=entry(shape=[2.0])), b"\0" * 8), "non-negative", "w"),
    "bool dim": (lambda p: raw_file(p, header_of(w=entry(shape=[True, 2])), b"\0" * 8), "non-negative", "w"),
    "shape overflows int64": (
        lambda p: raw_file(p, header_of(w=entry(shape=[2**40, 2**40])), b"\0" * 8),
        "more elements than int64",
        "w",
    ),
    "too many dims": (
        lambda p: raw_file(p, header_of(w=entry(shape=[1] * 65)), b"\0" * 8),
        "65 dimensions",
        "w",
    ),
    "offsets reversed": (
        lambda p: raw_file(p, header_of(w=entry(offsets=[8, 0])), b"\0" * 8),
        "end before",
        "w",
    ),
    "negative offset": (
        lambda p: raw_file(p, header_of(w=entry(offsets=[-8, 0])), b"\0" * 8),
        "two non-negative",
        "w",
    ),
    "three offsets": (
        lambda p: raw_file(p, header_of(w=entry(offsets=[0, 4, 8])), b"\0" * 8),
        "two non-negative",
        "w",
    ),
    "shape disagrees with span": (
        lambda p: raw_file(p, header_of(w=entry(shape=[3])), b"\0" * 8),
        "12 bytes",
        "w",
    ),
    "sub-byte dtype misaligned": (
        lambda p: raw_file(p, header_of(w=entry("F4", [3], [0, 2])), b"\0" * 2),
        "whole bytes",
        "w",
    ),
    "overlapping tensors": (
        lambda p: raw_file(p, header_of(a=entry(offsets=[0, 8]), b=entry(offsets=[4, 12])), b"\0" * 12),
        "overlaps",
        "b",
    ),
    "gap between tensors": (
        lambda p: raw_file(p, header_of(a=entry(offsets=[0, 8]), b=entry(offsets=[16, 24])), b"\0" * 24),
        "contiguous",
        "b",
    ),
    "data truncated": (lambda p: raw_file(p, header_of(w=entry()), b"\0" * 5), "truncated", None),
    "trailing bytes": (lambda p: raw_file(p, header_of(w=entry()), b"\0" * 20), "trailing", None),
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_malformed_file_is_refused_naming_file_and_tensor(tmp_path: Path, case: str) -> None:
    make, reason, tensor = CORPUS[case]
    path = make(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    assert info.value.file == str(path)
    assert reason in info.value.reason, info.value.reason
    assert info.value.tensor == tensor
    assert str(path) in str(info.value)


def test_corpus_has_at_least_twenty_cases() -> None:
    assert len(CORPUS) >= 20


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        read_header(tmp_path)  # a directory


class CountingFile:
    def __init__(self, inner: BinaryIO, counter: list[int]) -> None:
        self.inner, self.counter = inner, counter

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self.counter.append(len(data))
        return data

    def fileno(self) -> int:
        return self.inner.fileno()

    def __enter__(self) -> CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.close()


def test_reads_only_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(1024, 1024)}, path)
    reads: list[int] = []

    def counting_open(name: Path, mode: str, **kwargs: int) -> CountingFile:
        return CountingFile(open(name, mode, **kwargs), reads)

    monkeypatch.setattr(header_module, "open", counting_open, raising=False)
    header = read_header(path)
    assert header.file_bytes > 4 * 2**20
    assert sum(reads) == 8 + header.header_bytes < 200
