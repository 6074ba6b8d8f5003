"""Checkpoints saved already quantized, and memplan models saved again: each round trip gives
the logits transformers gives for the same folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import memplan
from memplan import Policy, Workload
from memplan.errors import UnsupportedQuantization
from tests.conftest import generic_where_bnb_cannot_repack

IDS = torch.tensor([[1, 17, 33, 4, 250, 9, 77]])
SPEC = "cuda:0=1GiB,cpu=8GiB"


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits  # type: ignore[no-any-return]


def transformers_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits(generic_where_bnb_cannot_repack(AutoModelForCausalLM.from_pretrained(path).eval()))


def bnb_config(kind: str) -> object:
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=kind == "nf4-dq",
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip


@pytest.fixture(scope="module", params=["int8", "nf4", "nf4-dq"])
def saved_quantized(
    request: pytest.FixtureRequest, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    """A model quantized by transformers+bnb and saved with save_pretrained."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("prequantized") / request.param
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama, quantization_config=bnb_config(request.param), dtype=torch.bfloat16
    )
    model.save_pretrained(folder)
    return request.param, folder


def test_a_prequantized_checkpoint_is_planned_at_its_stored_size(saved_quantized: tuple[str, Path]) -> None:
    kind, folder = saved_quantized
    checkpoint = memplan.inspect(folder)
    stored = checkpoint.architecture.quantization
    assert stored is not None and stored.method == kind.removesuffix("-dq") and stored.loadable
    chosen = memplan.plan(checkpoint, memplan.probe(SPEC), Workload(context=64))  # no --allow-quantization
    strategy = chosen.strategy
    assert isinstance(strategy, memplan.Quantized) and strategy.prequantized
    assert strategy.method == stored.method
    weights = chosen.estimate.on(memplan.Device("cuda", 0)).weights
    assert weights == checkpoint.nbytes  # what is stored is what is placed
    assert "pre-quantized" in chosen.explain() and "never re-quantized" in chosen.explain()


def test_a_prequantized_checkpoint_loads_like_transformers(
    saved_quantized: tuple[str, Path], bnb_cpu_path: str
) -> None:
    _, folder = saved_quantized
    model = memplan.load(folder, progress=False)
    assert model.memplan.report.strategy.prequantized  # type: ignore[union-attr]
    assert torch.equal(logits(model), transformers_logits(folder))


def test_another_quantization_method_is_planned_and_refused_by_name(tiny_llama: Path, tmp_path: Path) -> None:
    import shutil

    folder = shutil.copytree(tiny_llama, tmp_path / "gptq")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    checkpoint = memplan.inspect(folder)
    chosen = memplan.plan(checkpoint, memplan.probe(SPEC), Workload(context=64))
    assert "gptq" in chosen.explain() and "cannot load" in chosen.explain()
    with pytest.raises(UnsupportedQuantization) as caught:
        memplan.load(folder, progress=False)
    assert caught.value.method == "gptq"


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_a_quantized_memplan_model_saves_a_checkpoint_transformers_reloads(
    tiny_llama: Path, tmp_path: Path, method: str, bnb_cpu_path: str
) -> None:
    chosen = memplan.plan(
        memplan.inspect(tiny_llama), memplan.probe(SPEC), Workload(context=64),
        Policy(order=(method,), allow_quantization=True),
    )  # fmt: skip
    model = memplan.load(tiny_llama, plan=chosen, progress=False)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "bitsandbytes"
    assert torch.equal(transformers_logits(tmp_path / "saved"), logits(model))
    again = memplan.load(tmp_path / "saved", progress=False)
    assert torch.equal(logits(again), logits(model))


def test_a_prequantized_nf4_checkpoint_computes_in_its_stored_compute_dtype(
    tiny_llama: Path, tmp_path: Path, bnb_cpu_path: str
) -> None:
    """An fp32 model saved as nf4 with bnb_4bit_compute_dtype=bfloat16 computes in bfloat16."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    saved = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=config, dtype=torch.float32)
    saved.save_pretrained(tmp_path / "nf4")
    model = memplan.load(tmp_path / "nf4", progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.compute_dtype == torch.bfloat16
    assert torch.equal(logits(model), transformers_logits(tmp_path / "nf4"))


# --- damaged pre-quantized checkpoints (trust issue 20.3, 20.5) ----------------------------------


def _damaged(folder: Path, to: Path, *, drop: str = "", method: str = "") -> Path:
    """A copy of ``folder`` without the first tensor ending in ``drop``, or with a
    quantization_config for ``method`` over tensors of another."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, to)
    (weights,) = to.glob("*.safetensors")
    tensors = load_file(weights)
    if drop:
        del tensors[next(n for n in sorted(tensors) if n.endswith(drop) and ".layers.1." in n)]
        save_file(tensors, weights, metadata={"format": "pt"})
    if method:
        config = json.loads((to / "config.json").read_text())
        config["quantization_config"] = bnb_config(method).to_dict()  # type: ignore[attr-defined]
        (to / "config.json").write_text(json.dumps(config))
    return to


DAMAGES = [
    ("nf4-dq", ".weight.nested_absmax", "", "weight.nested_absmax"),
    ("nf4-dq", ".weight.nested_quant_map", "", "weight.nested_quant_map"),
    ("nf4", ".weight.quant_map", "", "weight.quant_map"),
    ("nf4", ".weight.quant_state.bitsandbytes__nf4", "", "quant_state.bitsandbytes__nf4"),
    ("nf4", ".weight.absmax", "", "weight.absmax"),
    ("int8", ".SCB", "", "SCB"),
    ("int8", "", "nf4", ".SCB"),  # int8 tensors under an nf4 config
    ("nf4", "", "int8", ".weight.absmax"),  # nf4 tensors under an int8 config
]


@pytest.mark.parametrize(("kind", "drop", "method", "named"), DAMAGES)
def test_a_damaged_prequantized_checkpoint_is_refused_naming_the_tensor(
    saved_quantized: tuple[str, Path], tmp_path: Path, kind: str, drop: str, method: str, named: str
) -> None:
    saved, folder = saved_quantized
    if saved != kind:
        pytest.skip(f"this damage is to a {kind} checkpoint")
    damaged = _damaged(folder, tmp_path / "damaged", drop=drop, method=method)
    with pytest.raises(memplan.CheckpointError) as caught:
        memplan.load(damaged, progress=False)
    assert caught.value.tensor is not None and caught.value.tensor.endswith(named)
    assert Path(caught.value.file).parent == damaged


def test_a_layer_whose_packed_state_says_nested_needs_its_nested_states(
    saved_quantized: tuple[str, Path], tmp_path: Path
) -> None:
    """Both nested tensors gone, so every name a layer of the method needs is there: only the
    packed quant_state, read with the layer, says the layer is nested. Built anyway, bitsandbytes
    would take the uint8 absmax for its scales."""
    from safetensors.torch import load_file

    from memplan.loaders._prequantized import DamagedState, check_states

    saved, folder = saved_quantized
    if saved != "nf4-dq":
        pytest.skip("a double-quant checkpoint")
    (weights,) = folder.glob("*.safetensors")
    layer = "model.layers.1.mlp.down_proj."
    states = {k.removeprefix(layer): v for k, v in load_file(weights).items() if k.startswith(layer)}
    shape = (64, 160)  # down_proj: 160 inputs, 64 outputs
    check_states("nf4", states, shape)
    del states["weight.nested_absmax"], states["weight.nested_quant_map"]
    with pytest.raises(DamagedState, match="says the layer is nested"):
        check_states("nf4", states, shape)


def _packed_json(tensor: torch.Tensor) -> dict[str, object]:
    return json.loads(bytes(tensor.numpy().tobytes()).decode())  # type: ignore[no-any-return]


def _pack_json(described: dict[str, object]) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(described).encode()), dtype=torch.uint8)


def _edited(described: dict[str, object], **changes: object) -> torch.Tensor:
    return _pack_json({**described, **changes})


# (checkpoint, the state altered in layers.0.mlp.down_proj, how): damage that keeps every name
# and loaded before, with other logits or an untyped error at the first forward.
LAYOUT_DAMAGES = {
    "json-quant-type": ("nf4-dq", "weight.quant_state.bitsandbytes__nf4", lambda t: _edited(_packed_json(t), quant_type="fp4")),
    "json-blocksize": ("nf4-dq", "weight.quant_state.bitsandbytes__nf4", lambda t: _edited(_packed_json(t), blocksize=128)),
    "json-shape": ("nf4-dq", "weight.quant_state.bitsandbytes__nf4", lambda t: _edited(_packed_json(t), shape=[160, 64])),
    "json-nested-blocksize": ("nf4-dq", "weight.quant_state.bitsandbytes__nf4", lambda t: _edited(_packed_json(t), nested_blocksize=128)),
    "absmax-truncated": ("nf4-dq", "weight.absmax", lambda t: t[: t.numel() // 2].clone()),
    "absmax-float16": ("nf4", "weight.absmax", lambda t: t.half()),
    "nested-quant-map-short": ("nf4-dq", "weight.nested_quant_map", lambda t: t[:16].clone()),
    "weight-truncated": ("nf4", "weight", lambda t: t[: t.shape[0] // 2].clone()),
    "scb-truncated": ("int8", "SCB", lambda t: t[:-1].clone()),
    "scb-bfloat16": ("int8", "SCB", lambda t: t.bfloat16()),
    "int8-weight-transposed": ("int8", "weight", lambda t: t.T.contiguous()),
}  # fmt: skip


@pytest.mark.parametrize("damage", sorted(LAYOUT_DAMAGES))
def test_a_prequantized_layer_whose_states_disagree_with_its_layout_is_refused(
    saved_quantized: tuple[str, Path], tmp_path: Path, damage: str
) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    kind, state, alter = LAYOUT_DAMAGES[damage]
    saved, folder = saved_quantized
    if saved != kind:
        pytest.skip(f"this damage is to a {kind} checkpoint")
    damaged = shutil.copytree(folder, tmp_path / "damaged")
    (weights,) = damaged.glob("*.safetensors")
    tensors = load_file(weights)
    name = f"model.layers.0.mlp.down_proj.{state}"
    tensors[name] = alter(tensors[name])
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(memplan.CheckpointError) as caught:
        memplan.load(damaged, progress=False)
    # the state altered, or the one the altered description disagrees with
    assert (caught.value.tensor or "").startswith("model.layers.0.mlp.down_proj.")


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_an_nf4_checkpoint_packed_into_another_storage_dtype_loads_like_transformers(
    tiny_llama: Path, tmp_path: Path, storage: torch.dtype, bnb_cpu_path: str
) -> None:
    """bnb_4bit_quant_storage (QLoRA/FSDP): the packed pairs in bf16 or f32 elements."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=storage,
    )  # fmt: skip
    saved = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=config, dtype=torch.bfloat16)
    saved.save_pretrained(tmp_path / "nf4")
    model = memplan.load(tmp_path / "nf4", progress=False)
    assert torch.equal(logits(model), transformers_logits(tmp_path / "nf4"))
