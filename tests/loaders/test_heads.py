"""Task heads and parameters as transformers leaves them: the class Auto would pick, new heads
initialised and reported, body tensors still required, ``requires_grad`` and ``hf_device_map``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import memplan
from memplan import Device, Streamed
from tests.compat.families import owning_memory
from tests.loaders.test_load import WORKLOAD, plan_only, tight_spec

IDS = torch.tensor([[2, 7, 31, 4, 60]])
CPU_ONLY = "cpu=8GiB"


def _bert_config() -> object:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "bert-base"
    BertModel(_bert_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_mlm_without_architectures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "bert-mlm"
    BertForMaskedLM(_bert_config()).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    del config["architectures"]
    (path / "config.json").write_text(json.dumps(config))
    return path


def _full(path: Path, **kwargs: object) -> torch.nn.Module:
    return memplan.load(path, plan=plan_only(path, "full", CPU_ONLY), progress=False, **kwargs)  # type: ignore[arg-type]


def test_a_config_without_architectures_loads_the_base_model_as_automodel_does(
    bert_mlm_without_architectures: Path,
) -> None:
    from transformers import AutoModel

    with pytest.warns(UserWarning, match="no place for cls.predictions"):
        model = _full(bert_mlm_without_architectures)
    want = owning_memory(AutoModel.from_pretrained(bert_mlm_without_architectures).eval())
    assert type(model) is type(want)
    with torch.no_grad():
        assert torch.equal(model(IDS).last_hidden_state, want(IDS).last_hidden_state)
    assert "cls.predictions.bias" in model.memplan.report.unused_tensors
    assert model.memplan.report.newly_initialized == ("pooler.dense.weight", "pooler.dense.bias")


def test_a_new_head_on_a_base_checkpoint_is_initialised_as_transformers_does(bert_base: Path) -> None:
    from transformers import BertForSequenceClassification

    torch.manual_seed(5)
    want = owning_memory(BertForSequenceClassification.from_pretrained(bert_base).eval())
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match=r"lacks classifier\.weight, classifier\.bias; newly initialised"):
        model = _full(bert_base, model_cls=BertForSequenceClassification)
    assert model.memplan.report.newly_initialized == ("classifier.weight", "classifier.bias")
    assert torch.equal(model.classifier.weight, want.classifier.weight)  # same draws from the same seed
    assert torch.equal(model.classifier.bias, torch.zeros(2))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, want(IDS).logits)


def test_a_body_tensor_missing_is_still_an_error(bert_base: Path, tmp_path: Path) -> None:
    from transformers import BertForSequenceClassification

    broken = tmp_path / "bert-broken"
    broken.mkdir()
    (broken / "config.json").write_text((bert_base / "config.json").read_text())
    tensors = load_file(bert_base / "model.safetensors")
    del tensors["pooler.dense.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(memplan.CheckpointError, match=r"bert\.pooler\.dense\.weight.*checkpoint lacks it"):
        _full(broken, model_cls=BertForSequenceClassification)


def test_parameters_require_grad_as_from_pretrained_leaves_them(tiny_llama: Path) -> None:
    model = _full(tiny_llama)
    assert all(p.requires_grad for p in model.parameters())
    loss = model(IDS, labels=IDS).loss
    loss.backward()  # fine-tuning works
    assert model.lm_head.weight.grad is not None
    frozen = _full(tiny_llama, trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_streamed_model_has_accelerates_device_map(tiny_llama: Path) -> None:
    cuda = Device("cuda", 0)
    strategy = Streamed(cuda, "disk", resident_layers=1, prefetch_depth=1, dtype="BF16")
    chosen = plan_only(tiny_llama, "streamed-disk", tight_spec(tiny_llama, strategy), prefetch_depth=1)
    model = memplan.load(tiny_llama, plan=chosen, progress=False)
    assert chosen.workload == WORKLOAD
    assert model.hf_device_map == {
        "model.layers.1": "disk", "model.layers.2": "disk", "model.layers.3": "disk",
        "model.embed_tokens": 0, "model.layers.0.self_attn.q_proj": 0, **model.hf_device_map,
    }  # fmt: skip
    assert set(model.hf_device_map.values()) == {0, "disk"}


def test_sharded_model_has_accelerates_device_map(tiny_llama: Path) -> None:
    each = memplan.inspect(tiny_llama).nbytes  # less headroom, neither device can hold the model alone
    chosen = plan_only(tiny_llama, "sharded", f"cuda:0={each},cuda:1={each},cpu=8GiB")
    model = memplan.load(tiny_llama, plan=chosen, progress=False)
    assert chosen.strategy.kind == "sharded"
    assert set(model.hf_device_map.values()) == {0, 1}
    assert model.hf_device_map["model.embed_tokens"] == 0 and model.hf_device_map["lm_head"] == 1
