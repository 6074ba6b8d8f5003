"""Every stack of repeated blocks is planned: encoders, decoders and towers, each from its own config."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

import memplan
from memplan import ContextTooLong, Workload
from memplan.planner import Full
from memplan.testing.checkpoints import write_safetensors_header

CPU = memplan.Device("cpu")
STACKS = {
    "llama": [("model.layers", "decoder")],
    "t5": [("encoder.block", "encoder"), ("decoder.block", "decoder")],
    "bart": [("model.encoder.layers", "encoder"), ("model.decoder.layers", "decoder")],
    "whisper": [("model.encoder.layers", "encoder"), ("model.decoder.layers", "decoder")],
    "clip": [("text_model.encoder.layers", "encoder"), ("vision_model.encoder.layers", "vision")],
    "vit": [("encoder.layer", "encoder")],
    "bert": [("encoder.layer", "encoder")],
}


@pytest.mark.parametrize("name", sorted(STACKS))
def test_every_stack_is_found_with_its_blocks(tiny_family: Callable[[str], Path], name: str) -> None:
    ckpt = memplan.inspect(tiny_family(name))
    assert [(s.prefix, s.role, s.count) for s in ckpt.stacks] == [(p, r, 2) for p, r in STACKS[name]]
    prefixes = [f"{prefix}.{i}" for prefix, _ in STACKS[name] for i in range(2)]
    assert [layer.prefix for layer in ckpt.layers] == prefixes
    plan = memplan.plan(ckpt, memplan.probe("cpu=8GiB"))
    assert plan.num_layers == 2 * len(STACKS[name])
    assert not any("no usable config.json" in note for note in plan.estimate.notes)


def test_t5_blocks_are_whole_blocks_not_their_sub_layers(tiny_family: Callable[[str], Path]) -> None:
    ckpt = memplan.inspect(tiny_family("t5"))
    block = ckpt.layers[2]
    assert block.prefix == "decoder.block.0" and block.index == 0
    assert {name.split(".")[5] for name in block.tensors} == {
        "SelfAttention",
        "EncDecAttention",
        "DenseReluDense",
        "layer_norm",
    }


def test_encoders_keep_no_kv_cache(tiny_family: Callable[[str], Path]) -> None:
    for name in ("bert", "vit", "clip"):
        est = memplan.estimate(memplan.inspect(tiny_family(name)), Workload(context=8), Full(CPU, "F32"))
        assert est.on(CPU).kv_cache == 0 and est.on(CPU).activations > 0


def test_decoder_kv_includes_cross_attention_over_the_encoder(tiny_family: Callable[[str], Path]) -> None:
    # 2 decoder layers x K and V x 4 heads x 8 dims x fp32, over its own 8 tokens plus the encoder's:
    # T5's encoder reads the same 8 tokens; Whisper's always 16 audio positions (max_source_positions).
    def kv(name: str) -> int:
        est = memplan.estimate(memplan.inspect(tiny_family(name)), Workload(context=8), Full(CPU, "F32"))
        return est.on(CPU).kv_cache

    assert kv("t5") == 2 * 2 * 4 * 8 * (8 + 8) * 4
    assert kv("whisper") == 2 * 2 * 4 * 8 * (8 + 16) * 4


def test_default_context_is_the_models_limit_up_to_4096(tiny_family: Callable[[str], Path]) -> None:
    def context(name: str) -> int | None:
        return memplan.plan(memplan.inspect(tiny_family(name)), memplan.probe("cpu=8GiB")).workload.context

    assert (context("bert"), context("whisper"), context("clip"), context("t5")) == (512, 32, 32, 4096)


def test_a_context_beyond_the_model_is_an_error_naming_its_limit(tiny_family: Callable[[str], Path]) -> None:
    with pytest.raises(ContextTooLong, match="at most 32 tokens") as info:
        memplan.plan(
            memplan.inspect(tiny_family("whisper")), memplan.probe("cpu=8GiB"), Workload(context=10**13)
        )
    assert (info.value.limit, info.value.context) == (32, 10**13)


def _minilm(path: Path) -> Path:
    """all-MiniLM-L6-v2's shapes (90 MB in fp32), headers only."""
    h, inter, vocab = 384, 1536, 30522
    tensors = [
        ("embeddings.word_embeddings.weight", (vocab, h)),
        ("embeddings.position_embeddings.weight", (512, h)),
    ]
    for i in range(6):
        p = f"encoder.layer.{i}"
        tensors += [(f"{p}.attention.self.{n}.weight", (h, h)) for n in ("query", "key", "value")]
        tensors += [
            (f"{p}.attention.output.dense.weight", (h, h)),
            (f"{p}.intermediate.dense.weight", (inter, h)),
        ]
        tensors += [(f"{p}.output.dense.weight", (h, inter))]
    path.mkdir()
    write_safetensors_header(path / "model.safetensors", tensors, "F32")
    config = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": h, "num_hidden_layers": 6,
              "num_attention_heads": 12, "intermediate_size": inter, "vocab_size": vocab,
              "max_position_embeddings": 512}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_a_90mb_bert_at_its_512_context_fits_a_gib(tmp_path: Path) -> None:
    plan = memplan.plan(memplan.inspect(_minilm(tmp_path / "minilm")), memplan.probe("cpu=1GiB"))
    assert plan.workload.context == 512 and isinstance(plan.strategy, Full)
    assert plan.estimate.on(CPU).kv_cache == 0
    assert plan.estimate.on(CPU).peak < 700 * 2**20


def test_int8_counts_only_what_bitsandbytes_replaces(tmp_path: Path) -> None:
    """Single experts are fused into 3-D tensors by transformers 5 and stay unquantized, as do
    embeddings inside a block (T5's relative_attention_bias)."""
    from memplan.planner import is_quantizable

    tensors = [("model.layers.0.mlp.experts.0.w1.weight", (64, 32)), ("model.layers.0.self_attn.q_proj.weight", (32, 32)),
               ("model.layers.0.attn.relative_attention_bias.weight", (32, 4))]  # fmt: skip
    path = tmp_path / "moe"
    path.mkdir()
    write_safetensors_header(path / "model.safetensors", tensors, "BF16")
    ckpt = memplan.inspect(path)
    assert [is_quantizable(ckpt.tensors[name]) for name, _ in tensors] == [False, True, False]


def test_a_text_decoder_beside_image_sizes_keeps_its_kv_cache(tmp_path: Path) -> None:
    """Fuyu's config gives image_size and patch_size at its top and its vocabulary in
    text_config; its decoder under language_model is no vision tower."""
    from transformers import FuyuConfig, FuyuForCausalLM

    config = FuyuConfig(
        text_config={"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 64},
        hidden_size=32, patch_size=8, image_size=32,
    )  # fmt: skip
    FuyuForCausalLM(config).save_pretrained(tmp_path / "fuyu")
    checkpoint = memplan.inspect(tmp_path / "fuyu")
    (decoder,) = [s for s in checkpoint.stacks if "language_model" in s.prefix]
    assert decoder.role == "decoder"
    estimate = memplan.estimate(
        checkpoint, memplan.Workload(context=64), memplan.Full(memplan.Device("cpu"), "F32")
    )
    assert estimate.on(memplan.Device("cpu")).kv_cache > 0
