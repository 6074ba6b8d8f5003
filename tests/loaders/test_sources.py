"""Models where users keep them: repo ids in the Hugging Face cache (sharded, symlinked into
blobs/), ``.bin`` checkpoints, and one weights file with its configs beside it. Each loads to
the same logits as transformers' own loading of the same source."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import memplan
from memplan import ModelNotFound
from memplan.cli import main
from memplan.testing.hf_cache import cache_repo

IDS = torch.tensor([[1, 17, 33, 4, 250, 9, 77]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits  # type: ignore[no-any-return]


def reference(path: Path | str, **kwargs: object) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(path, **kwargs).eval())


@pytest.fixture
def hf_cache(tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``org/tiny-llama`` sharded in a cache laid out as huggingface_hub lays it out; offline."""
    cache = tmp_path / "hub"
    cache_repo(cache, "org/tiny-llama", tiny_llama)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_repo_id_loads_from_the_cache_like_transformers(hf_cache: Path, tiny_llama: Path) -> None:
    checkpoint = memplan.inspect("org/tiny-llama")
    assert len(checkpoint.files) == 3 and checkpoint.nbytes == memplan.inspect(tiny_llama).nbytes
    model = memplan.load("org/tiny-llama", progress=False)
    assert torch.equal(logits(model), reference("org/tiny-llama", cache_dir=hf_cache))


def test_a_symlinked_snapshot_folder_loads(hf_cache: Path, tiny_llama: Path) -> None:
    (snapshot,) = (hf_cache / "models--org--tiny-llama" / "snapshots").iterdir()
    assert all(p.is_symlink() for p in snapshot.glob("*.safetensors"))
    model = memplan.load(snapshot, progress=False)
    assert torch.equal(logits(model), reference(tiny_llama))


def test_a_snapshot_link_with_a_missing_blob_names_the_shard(hf_cache: Path) -> None:
    (snapshot,) = (hf_cache / "models--org--tiny-llama" / "snapshots").iterdir()
    shard = sorted(snapshot.glob("*.safetensors"))[1]
    shard.resolve().unlink()
    with pytest.raises(memplan.CheckpointError, match=shard.name):
        memplan.inspect(snapshot)


def test_an_absent_repo_id_says_what_to_run(hf_cache: Path) -> None:
    with pytest.raises(ModelNotFound, match="huggingface-cli download org/absent") as caught:
        memplan.inspect("org/absent")
    assert caught.value.repo_id == "org/absent"
    assert main(["plan", "org/absent", "--simulate", "cpu=8GiB"]) == 1


def test_every_cli_command_takes_a_repo_id(hf_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "org/tiny-llama", "--simulate", "cpu=8GiB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_layers"] == 4
    assert main(["load", "org/tiny-llama", "--revision", "main", "--simulate", "cpu=8GiB"]) == 0
    assert main(["doctor", "org/tiny-llama", "--simulate", "cpu=8GiB"]) in (0, 1)
    assert "Traceback" not in capsys.readouterr().err


def save_bin(source: Path, folder: Path, shards: int) -> None:
    """``source`` as transformers 4 saved it with safe_serialization=False: pytorch_model.bin, or
    pytorch_model-0000i-of-0000n.bin shards and their index (transformers 5 writes safetensors only)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source)
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    names, weight_map = list(state), {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i::shards]
        torch.save({n: state[n] for n in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("shards", [1, 3])
def test_a_bin_checkpoint_loads_like_transformers(tmp_path: Path, tiny_llama: Path, shards: int) -> None:
    folder = tmp_path / "bin"
    save_bin(tiny_llama, folder, shards)
    checkpoint = memplan.inspect(folder)
    assert checkpoint.nbytes == memplan.inspect(tiny_llama).nbytes and len(checkpoint.files) == shards
    model = memplan.load(folder, progress=False)
    assert torch.equal(logits(model), reference(folder))
    assert torch.equal(logits(model), reference(tiny_llama))
    assert "torch.load" in memplan.plan(checkpoint, memplan.probe("cpu=8GiB")).explain()


def test_a_bin_that_is_not_plain_tensors_is_refused_and_nothing_runs(
    tmp_path: Path, tiny_llama: Path
) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(tiny_llama / "config.json", folder)
    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {ran}",))

    with (folder / "pytorch_model.bin").open("wb") as f:
        pickle.dump({"model.embed_tokens.weight": Payload()}, f)
    with pytest.raises(memplan.CheckpointError, match="pytorch_model.bin"):
        memplan.inspect(folder)
    torch.save(
        {"model.embed_tokens.weight": torch.ones(2), "step": "not a tensor"}, folder / "pytorch_model.bin"
    )
    with pytest.raises(memplan.CheckpointError, match="step"):
        memplan.inspect(folder)
    assert not ran.exists()


def test_one_safetensors_file_with_its_config_loads_like_its_folder(tiny_llama_single: Path) -> None:
    model = memplan.load(tiny_llama_single / "model.safetensors", progress=False)
    assert torch.equal(logits(model), reference(tiny_llama_single))


def test_a_revision_the_cache_lacks_is_named(hf_cache: Path) -> None:
    with pytest.raises(ModelNotFound, match="revision 'nope'"):
        memplan.inspect("org/tiny-llama", revision="nope")
