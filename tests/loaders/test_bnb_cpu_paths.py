"""4-bit models on both of bitsandbytes' CPU paths (issue 21.1): on a CPU with AVX512-BF16 it
repacks each 4-bit weight on the layer's first forward, which fails for a layer whose shape its
packed layout cannot take; memplan keeps those on the generic path and says so. Every path that
reads a 4-bit weight stays right after the repacking."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import memplan
from memplan import Policy, Workload
from tests.conftest import generic_where_bnb_cannot_repack
from tests.loaders.test_load import logits

SPEC = "cpu=8GiB"


def nf4(path: Path, **load: object) -> torch.nn.Module:
    chosen = memplan.plan(
        memplan.inspect(path), memplan.probe(SPEC), Workload(context=64),
        Policy(order=("nf4",), allow_quantization=True),
    )  # fmt: skip
    return memplan.load(path, plan=chosen, progress=False, quant_cache=False, **load)


def transformers_nf4(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
    return generic_where_bnb_cannot_repack(model.eval())  # type: ignore[return-value]


def test_4bit_layers_left_to_repack_are_the_ones_bitsandbytes_can_repack(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs on any CPU: the layers are built as on an AVX512-BF16 one, and bitsandbytes' own
    repacking (plain torch) is applied to a copy of each layer's weight, as its first forward would."""
    import bitsandbytes.nn.modules
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    model = nf4(tiny_llama)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bitsandbytes.nn.Linear4bit)}
    kept = sorted(n for n, m in layers.items() if not m.support_avx512bf16_for_cpu)
    assert kept == [f"model.layers.{i}.mlp.down_proj" for i in range(4)]  # 160 inputs: 2.5 blocks of 64
    (note,) = [n for n in model.memplan.report.notes if "generic CPU path" in n]
    assert "model.layers.0.mlp.down_proj (160 inputs, not a multiple of the blocksize 64)" in note
    assert "4 4-bit layers" in note
    for name, layer in layers.items():
        weight, state = layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state)
        if name in kept:
            with pytest.raises(RuntimeError):
                _convert_weight_packed_for_cpu(weight, state)
        else:
            _convert_weight_packed_for_cpu(weight, state)


def test_nothing_is_kept_back_where_the_cpu_lacks_the_feature(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: False)
    assert not [n for n in nf4(tiny_llama).memplan.report.notes if "generic CPU path" in n]


def test_an_nf4_model_gives_transformers_logits_forward_after_forward(
    tiny_llama: Path, bnb_cpu_path: str
) -> None:
    theirs = transformers_nf4(tiny_llama)
    model = nf4(tiny_llama)
    first = logits(model)
    assert torch.equal(first, logits(theirs))
    assert torch.equal(logits(model), first)  # after the repacking, where the CPU repacks


def test_an_nf4_model_saved_after_its_forwards_reloads_to_the_same_logits(
    tiny_llama: Path, tmp_path: Path, bnb_cpu_path: str
) -> None:
    """bitsandbytes unpacks a repacked weight as it saves it (``_save_to_state_dict``)."""
    from transformers import AutoModelForCausalLM

    model = nf4(tiny_llama)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    want = logits(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)  # what was loaded, exactly
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    assert torch.equal(logits(model), want)  # saving unpacked it: the next forward repacks
    again = memplan.load(tmp_path / "saved", progress=False)
    theirs = generic_where_bnb_cannot_repack(AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval())
    assert torch.equal(logits(again), logits(theirs))  # type: ignore[arg-type]
    assert torch.equal(logits(again), want)


def test_remove_hooks_leaves_the_4bit_layers_saving_exactly(tiny_llama: Path, bnb_cpu_path: str) -> None:
    """memplan.remove_hooks takes the load's hooks off; what keeps a 4-bit layer's save exact is
    part of the layer."""
    model = nf4(tiny_llama)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    memplan.remove_hooks(model)
    want = logits(model)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert torch.equal(logits(model), want)
