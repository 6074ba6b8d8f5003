"""inspect() on checkpoints written by transformers, and on broken indexes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

import memplan
from memplan import CheckpointError


def transformers_param_count(path: Path) -> int:
    total = 0
    for shard in path.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for name in f.keys():  # noqa: SIM118
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


def test_sharded_transformers_checkpoint(tiny_llama: Path) -> None:
    ckpt = memplan.inspect(tiny_llama)
    assert len(ckpt.files) == 3
    assert ckpt.num_params == transformers_param_count(tiny_llama)
    assert ckpt.nbytes == 2 * ckpt.num_params  # all bf16
    assert ckpt.dtype == "BF16"
    arch = ckpt.architecture
    assert (arch.model_type, arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads) == (
        "llama", 4, 64, 4, 2)  # fmt: skip
    assert (arch.head_dim, arch.vocab_size, arch.intermediate_size, arch.tie_word_embeddings) == (
        16,
        512,
        160,
        False,
    )
    assert arch.architectures == ("LlamaForCausalLM",)
    assert [layer.prefix for layer in ckpt.layers] == [f"model.layers.{i}" for i in range(4)]
    assert all(len(layer.tensors) == 9 for layer in ckpt.layers)
    assert {t.name for t in ckpt.non_layer_tensors()} == {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    }
    q = ckpt.tensors["model.layers.2.self_attn.q_proj.weight"]
    assert (q.shape, q.dtype, q.layer, q.module) == ((64, 64), "BF16", 2, "model.layers.2.self_attn.q_proj")
    index = json.loads((tiny_llama / "model.safetensors.index.json").read_text())
    assert q.file == tiny_llama / index["weight_map"][q.name]


def test_single_file_and_tied_embeddings(tiny_llama_single: Path) -> None:
    ckpt = memplan.inspect(tiny_llama_single)
    assert [f.name for f in ckpt.files] == ["model.safetensors"]
    assert ckpt.architecture.tie_word_embeddings
    assert "lm_head.weight" not in ckpt.tensors
    one_file = memplan.inspect(tiny_llama_single / "model.safetensors")
    assert one_file.num_params == ckpt.num_params and one_file.fingerprint == ckpt.fingerprint


def test_fingerprint_is_the_shape_not_the_path(tiny_llama: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_llama, tmp_path / "elsewhere")
    assert memplan.inspect(copy).fingerprint == memplan.inspect(tiny_llama).fingerprint


def test_without_config_layers_come_from_names(tiny_llama: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_llama, tmp_path / "noconfig")
    (copy / "config.json").unlink()
    ckpt = memplan.inspect(copy)
    assert ckpt.architecture.num_layers == 4 and ckpt.architecture.hidden_size is None


def test_hollow_70b_has_the_real_shape(hollow_70b: Path) -> None:
    ckpt = memplan.inspect(hollow_70b)
    assert round(ckpt.num_params / 1e9, 2) == 70.55
    assert len(ckpt.layers) == 80 and len(ckpt.files) > 20


def test_inspect_does_not_import_torch(hollow_70b: Path) -> None:
    code = f"import sys, memplan; memplan.inspect({str(hollow_70b)!r}); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def broken_copy(src: Path, dst: Path, edit: dict[str, object]) -> Path:
    copy = shutil.copytree(src, dst)
    index_path = copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update(edit)
    index_path.write_text(json.dumps(index))
    return copy


@pytest.mark.parametrize(
    ("edit", "reason", "tensor"),
    [
        (
            {"model.norm.weight": "../model-00001-of-00003.safetensors"},
            "outside the model directory",
            "model.norm.weight",
        ),
        ({"model.norm.weight": "/etc/passwd"}, "outside the model directory", "model.norm.weight"),
        ({"model.norm.weight": "model-00009-of-00009.safetensors"}, "does not exist", "model.norm.weight"),
        ({"ghost.weight": "model-00001-of-00003.safetensors"}, "not in this shard", "ghost.weight"),
        ({"model.norm.weight": 7}, "must name a file", "model.norm.weight"),
    ],
)
def test_bad_index_entries(
    tiny_llama: Path, tmp_path: Path, edit: dict[str, object], reason: str, tensor: str
) -> None:
    copy = broken_copy(tiny_llama, tmp_path / "m", edit)
    with pytest.raises(CheckpointError) as info:
        memplan.inspect(copy)
    assert reason in info.value.reason and info.value.tensor == tensor


def test_a_shard_linked_from_outside_the_folder_is_read(tiny_llama: Path, tmp_path: Path) -> None:
    """The Hugging Face cache links snapshot files into blobs/: what must stay inside the folder
    is the name in the index, not the link's target."""
    copy = shutil.copytree(tiny_llama, tmp_path / "m")
    shard = copy / "model-00002-of-00003.safetensors"
    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    shard.rename(blob)
    shard.symlink_to(blob)
    assert memplan.inspect(copy).nbytes == memplan.inspect(tiny_llama).nbytes


@pytest.mark.parametrize("name", ["../m/model-00001-of-00003.safetensors", "sub/x.safetensors", ".."])
def test_index_names_with_a_path_are_refused(tiny_llama: Path, tmp_path: Path, name: str) -> None:
    copy = broken_copy(tiny_llama, tmp_path / "m", {"model.norm.weight": name})
    with pytest.raises(CheckpointError, match="outside the model directory"):
        memplan.inspect(copy)


def test_missing_shard_file_is_named(tiny_llama: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_llama, tmp_path / "m")
    (copy / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError) as info:
        memplan.inspect(copy)
    assert info.value.file.endswith("model-00002-of-00003.safetensors")


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda d: (d / "model.safetensors.index.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "model.safetensors.index.json").write_text("[]"), "not a JSON object"),
        (lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": {}}'), "no weight_map"),
        (lambda d: (d / "config.json").write_text("{"), "config.json is not valid JSON"),
    ],
)
def test_bad_index_or_config_files(tiny_llama: Path, tmp_path: Path, setup: object, reason: str) -> None:
    copy = shutil.copytree(tiny_llama, tmp_path / "m")
    setup(copy)  # type: ignore[operator]
    with pytest.raises(CheckpointError, match=reason):
        memplan.inspect(copy)


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        memplan.inspect(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        memplan.inspect(tmp_path)


def test_tensor_stored_twice_across_files(tiny_llama_single: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_llama_single, tmp_path / "m")
    shutil.move(copy / "model.safetensors", copy / "a.safetensors")
    shutil.copy(copy / "a.safetensors", copy / "b.safetensors")
    with pytest.raises(CheckpointError, match="also stored in a.safetensors"):
        memplan.inspect(copy)
