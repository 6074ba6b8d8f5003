"""Broken checkpoints fail with a CheckpointError naming file and tensor, and leave nothing charged."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import memplan
from memplan import Allocator, CheckpointError, Device
from memplan.loaders._reader import TensorReader, torch_dtype
from memplan.loaders.load import _progress_bar

CUDA0 = Device("cuda", 0)


def single_file_copy(src: Path, dst: Path, edit: object = None) -> Path:
    """``src`` rewritten as one model.safetensors (optionally edited) with its config.json."""
    dst.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(shard))
    if callable(edit):
        edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def load_on_budget(path: Path) -> tuple[Allocator, Exception]:
    inventory = memplan.probe("cuda:0=1GiB,cpu=8GiB")
    allocator = Allocator(inventory)
    with pytest.raises(CheckpointError) as info:
        memplan.load(path, allocator=allocator, progress=False)
    return allocator, info.value


def test_a_shape_that_disagrees_with_config_names_the_tensor(tiny_llama: Path, tmp_path: Path) -> None:
    broken = single_file_copy(tiny_llama, tmp_path / "m")
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(config))
    allocator, error = load_on_budget(broken)
    assert isinstance(error, CheckpointError)
    assert error.tensor is not None and "mlp" in error.tensor
    assert "the model expects [96, 64]" in error.reason or "[64, 96]" in error.reason
    assert allocator.usage(CUDA0).used == 0  # what was placed before the bad tensor is given back


def test_a_tensor_the_model_needs_but_the_file_lacks(tiny_llama: Path, tmp_path: Path) -> None:
    broken = single_file_copy(tiny_llama, tmp_path / "m", edit=lambda t: t.pop("model.norm.weight"))
    allocator, error = load_on_budget(broken)
    assert isinstance(error, CheckpointError)
    assert error.tensor == "model.norm.weight"
    assert allocator.usage(CUDA0).used == 0


def test_a_missing_shard_is_named(tiny_llama: Path, tmp_path: Path) -> None:
    broken = tmp_path / "m"
    shutil.copytree(tiny_llama, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    _, error = load_on_budget(broken)
    assert shard.name in str(error)


def test_a_file_truncated_after_inspection_fails_on_the_tensor_it_cut(
    tiny_llama: Path, tmp_path: Path
) -> None:
    copy = single_file_copy(tiny_llama, tmp_path / "m")
    checkpoint = memplan.inspect(copy)
    last = max(checkpoint.tensors.values(), key=lambda t: t.offset)
    os.truncate(last.file, last.offset + last.nbytes // 2)
    with TensorReader(checkpoint) as reader, pytest.raises(CheckpointError) as info:
        reader.read(last.name)
    # the file is not the one inspected: refused as it is opened, naming what was to be read
    assert info.value.tensor == last.name and "changed" in info.value.reason
    with pytest.raises(CheckpointError):  # and a fresh load refuses it before reading anything
        memplan.load(copy, progress=False)


def test_a_dtype_torch_lacks_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="F4 has no torch equivalent"):
        torch_dtype("F4", tensor="w", file=Path("model.safetensors"))


class TinyNet(torch.nn.Module):
    """A user's own model: built from a config dict, or with no arguments."""

    def __init__(self, config: dict[str, int] | None = None) -> None:
        super().__init__()
        width = (config or {}).get("width", 8)
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def test_any_model_class_built_from_its_config(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = TinyNet({"width": 16})
    (tmp_path / "net").mkdir()
    save_file(net.state_dict(), tmp_path / "net" / "model.safetensors")
    (tmp_path / "net" / "config.json").write_text(json.dumps({"width": 16}))
    plain = single = tmp_path / "net.safetensors"
    save_file(TinyNet().state_dict(), single)
    x = torch.randn(3, 16)
    loaded = memplan.load(tmp_path / "net", model_cls=lambda cfg: TinyNet(dict(cfg)), progress=False)
    assert torch.equal(loaded(x), net(x))
    assert memplan.load(plain, model_cls=TinyNet, progress=False).up.weight.shape == (16, 8)


def test_without_transformers_or_a_class_the_error_says_what_to_pass(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2, 2)}, path)
    with pytest.raises(memplan.MemplanError, match="model_cls"):
        memplan.load(path, progress=False)


def test_the_progress_bar_shows_on_a_terminal_only(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = memplan.inspect(tiny_llama)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    shown = _progress_bar(checkpoint, True)
    assert not shown.disable and shown.total == checkpoint.nbytes
    assert _progress_bar(checkpoint, False).disable
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert _progress_bar(checkpoint, True).disable
