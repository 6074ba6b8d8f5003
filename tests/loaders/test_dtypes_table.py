"""One dtype table: every dtype a header may name is one `inspect` accepts, and every one torch
has loads as saved (the header reader once knew dtypes the loader refused)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

import memplan  # noqa: E402
from memplan import CheckpointError  # noqa: E402
from memplan.loaders._reader import TensorReader  # noqa: E402

TORCH_DTYPES = [
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "complex64",
    "float8_e4m3fn",
    "bfloat16",
]


@pytest.mark.parametrize("name", TORCH_DTYPES)
def test_a_tensor_saved_in_any_torch_dtype_safetensors_writes_reads_back_equal(
    tmp_path: Path, name: str
) -> None:
    dtype = getattr(torch, name)
    saved = torch.arange(1, 13, dtype=torch.float32).reshape(3, 4).to(dtype)
    safetensors_torch.save_file({"w": saved, "b": torch.ones(4)}, tmp_path / "model.safetensors")
    checkpoint = memplan.inspect(tmp_path)
    with TensorReader(checkpoint) as reader:
        read = reader.read("w")
    assert read.dtype == dtype and torch.equal(read.view(torch.uint8), saved.view(torch.uint8))


def _write_header_only(path: Path, dtype: str, numel: int, bits: int) -> None:
    nbytes = numel * bits // 8
    header = json.dumps({"w": {"dtype": dtype, "shape": [numel], "data_offsets": [0, nbytes]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(nbytes))


@pytest.mark.parametrize(("dtype", "bits"), [("F4", 4), ("F6_E2M3", 6), ("F6_E3M2", 6)])
def test_a_dtype_torch_lacks_inspects_and_its_load_names_the_file_and_tensor(
    tmp_path: Path, dtype: str, bits: int
) -> None:
    _write_header_only(tmp_path / "model.safetensors", dtype, 8, bits)
    checkpoint = memplan.inspect(tmp_path)
    assert checkpoint.tensors["w"].nbytes == 8 * bits // 8
    with TensorReader(checkpoint) as reader, pytest.raises(CheckpointError) as info:
        reader.read("w")
    assert info.value.tensor == "w" and info.value.file == str(tmp_path / "model.safetensors")


def test_every_dtype_torch_has_is_the_torch_dtype_safetensors_maps_it_to() -> None:
    """The table agrees with the safetensors library's own mapping, both ways."""
    from safetensors.torch import _TYPES  # the library's safetensors name -> torch dtype

    from memplan._dtypes import DTYPES

    table = {entry.name: entry for entry in DTYPES}
    for name, dtype in _TYPES.items():
        assert table[name].torch is not None and getattr(torch, table[name].torch) == dtype, name
    for entry in DTYPES:
        if entry.torch is not None:
            dtype = getattr(torch, entry.torch)
            assert (dtype.is_floating_point, dtype.itemsize * 8) == (entry.floating, entry.bits), entry.name
