"""Tiny random-init models of the transformers families memplan must load, and inputs for each.

Each family is a config small enough to build, save and run in well under a second on one core;
the inputs are built from the config, the way a user would feed that kind of model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "COLUMNS",
    "FAMILIES",
    "UNSUPPORTED",
    "Family",
    "covers",
    "inputs_for",
    "owning_memory",
    "save_family",
    "train_buffers",
]

_TEXT = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
_HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
_DECODER = _TEXT | _HEADS
_VISION = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "image_size": 32, "patch_size": 8,
}  # fmt: skip


@dataclass(frozen=True)
class Family:
    """One architecture: its config class and kwargs, the class saved, and which inputs it takes."""

    name: str
    config: str
    model: str
    kind: str  # causal | seq2seq | speech | encoder | vision | clip | vlm
    kwargs: dict[str, Any] = field(default_factory=dict)
    make_config: Callable[[], Any] | None = None  # for configs of several parts

    @property
    def generates(self) -> bool:
        return self.kind in {"causal", "seq2seq", "speech", "vlm"}

    def build_config(self) -> Any:
        import transformers

        if self.make_config is not None:
            return self.make_config()
        return getattr(transformers, self.config)(**self.kwargs)


def _llava() -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(**_VISION, projection_dim=32)
    text = LlamaConfig(**_DECODER)
    # 16 patches (+ CLS, dropped by the default "default" feature strategy) per image.
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=127, image_seq_length=16)


def _qwen2_vl() -> Any:
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=_DECODER | {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1]}},
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "patch_size": 4,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3},
        image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
    )  # fmt: skip


def _clip() -> Any:
    from transformers import CLIPConfig

    text = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 32}  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=_VISION, projection_dim=32)


_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}

FAMILIES: tuple[Family, ...] = (
    Family("llama", "LlamaConfig", "LlamaForCausalLM", "causal", _DECODER),
    Family("mistral", "MistralConfig", "MistralForCausalLM", "causal", _DECODER),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "causal", _DECODER),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "causal", _DECODER | {"head_dim": 8}),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", "causal", _DECODER | {"pad_token_id": 0}),
    Family("gemma", "GemmaConfig", "GemmaForCausalLM", "causal", _DECODER | {"head_dim": 8}),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM", "causal", _DECODER | {"head_dim": 8}),
    Family("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", "causal", _DECODER | {"head_dim": 8}),
    Family("gpt2", "GPT2Config", "GPT2LMHeadModel", "causal",
           {"vocab_size": 128, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128}),
    Family("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", "causal", _TEXT | {"num_attention_heads": 4}),
    Family("mixtral", "MixtralConfig", "MixtralForCausalLM", "causal",
           _DECODER | {"num_local_experts": 4, "num_experts_per_tok": 2}),
    Family("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", "causal",
           _DECODER | _MOE | {"num_experts": 4, "shared_expert_intermediate_size": 32}),
    Family("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", "causal",
           _DECODER | _MOE | {"num_experts": 4, "head_dim": 8}),
    Family("deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM", "causal",
           _DECODER | _MOE | {"num_key_value_heads": 4, "n_routed_experts": 4, "n_shared_experts": 1,
                              "first_k_dense_replace": 1,
                              "n_group": 1, "topk_group": 1, "kv_lora_rank": 16, "q_lora_rank": 16,
                              "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8}),
    Family("llava", "LlavaConfig", "LlavaForConditionalGeneration", "vlm", make_config=_llava),
    Family("qwen2_vl", "Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "vlm", make_config=_qwen2_vl),
    Family("t5", "T5Config", "T5ForConditionalGeneration", "seq2seq",
           {"vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
            "decoder_start_token_id": 0}),
    Family("bart", "BartConfig", "BartForConditionalGeneration", "seq2seq",
           {"vocab_size": 128, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
            "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64, "max_position_embeddings": 64}),
    Family("whisper", "WhisperConfig", "WhisperForConditionalGeneration", "speech",
           {"vocab_size": 128, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
            "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64, "num_mel_bins": 16, "max_source_positions": 16,
            "max_target_positions": 32, "decoder_start_token_id": 1, "pad_token_id": 0,
            "eos_token_id": 2, "bos_token_id": 1, "suppress_tokens": [], "begin_suppress_tokens": []}),
    Family("bert", "BertConfig", "BertModel", "encoder", _TEXT | {"num_attention_heads": 4}),
    Family("vit", "ViTConfig", "ViTModel", "vision", _VISION),
    Family("clip", "CLIPConfig", "CLIPModel", "clip", make_config=_clip),
)  # fmt: skip


# The matrix's columns: memplan's output equals transformers' (full, streamed from disk), equals
# transformers+bitsandbytes' (int8, on the CPU), and generate() gives transformers' tokens.
COLUMNS = ("full", "streamed-disk", "int8", "generate")

# (family, column) -> the error users get. Each is an xfail(strict=True) in the matrix and a cross
# in the README's table, so neither can claim what the other does not.
UNSUPPORTED: dict[tuple[str, str], tuple[type[Exception], str]] = {
    # bitsandbytes' CPU int8 matmul takes rows of a 2-D or 3-D input; DeepSeek's kv_b_proj gets a
    # 4-D one. transformers+bnb fails the same way, so there is no reference to equal.
    ("deepseek_v3", "int8"): (
        RuntimeError, "The size of tensor a (8) must match the size of tensor b (16) at non-singleton dimension 2"
    ),
}  # fmt: skip


def covers(family: Family, column: str) -> bool:
    """Whether the column applies: only generative families generate."""
    return column != "generate" or family.generates


def save_family(family: Family, path: Path) -> Path:
    """``family``'s tiny model, random-init with a fixed seed, saved with save_pretrained."""
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, family.model)(family.build_config())
    train_buffers(model)
    model.save_pretrained(path)
    return path


def train_buffers(model: torch.nn.Module) -> list[str]:
    """Move every persistent floating buffer off its ``__init__`` value, as training moves
    BatchNorm's running statistics or a router's correction bias (kept positive, as a running
    variance must be); the names moved. A load that keeps the init values then differs."""
    moved = []
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for attr, buffer in module._buffers.items():
                if buffer is None or attr in module._non_persistent_buffers_set:
                    continue
                if buffer.is_floating_point():
                    buffer.add_(torch.rand_like(buffer) + 0.5)
                    moved.append(f"{module_name}.{attr}" if module_name else attr)
    return moved


def owning_memory(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with each parameter in memory of its own.

    from_pretrained leaves tensors as views into the mapped file, at any alignment, and CPU BLAS
    kernels pick their summation order by alignment (CLIP's projection differed in the last bit).
    Compared with memplan's, which owns its memory, the same values must compute the same.
    """
    for param in model.parameters():
        param.data = param.data.clone()
    return model


def inputs_for(family: Family, config: Any) -> dict[str, torch.Tensor]:
    """A forward's keyword arguments for ``family``, built from its config with a fixed seed."""
    generator = torch.Generator().manual_seed(1)
    if family.kind == "vision":
        return {"pixel_values": _pixels(config, generator)}
    vocab = config.get_text_config().vocab_size
    ids = torch.randint(3, min(vocab, 100), (1, 8), generator=generator)
    if family.kind in {"causal", "encoder"}:
        return {"input_ids": ids}
    if family.kind == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :3]}
    if family.kind == "speech":
        frames = 2 * config.max_source_positions
        features = torch.randn(1, config.num_mel_bins, frames, generator=generator)
        return {"input_features": features, "decoder_input_ids": ids[:, :3]}
    if family.kind == "clip":
        return {"input_ids": ids, "pixel_values": _pixels(config.vision_config, generator)}
    return _vlm_inputs(family, config, ids, generator)


def _pixels(vision: Any, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(1, 3, vision.image_size, vision.image_size, generator=generator)


def _vlm_inputs(family: Family, config: Any, ids: torch.Tensor, generator: torch.Generator) -> dict[str, Any]:
    """Image tokens in the prompt, as many as the vision tower yields for one image."""
    if family.name == "llava":
        image = torch.full((1, config.image_seq_length), config.image_token_index)
        return {
            "input_ids": torch.cat([ids, image], dim=1),
            "pixel_values": _pixels(config.vision_config, generator),
        }
    vision = config.vision_config
    grid = torch.tensor([[1, 4, 4]])  # one frame of 4x4 patches, merged 2x2 into 4 tokens
    patch = vision.in_chans * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(16, patch, generator=generator)
    image = torch.full((1, 4), config.image_token_id)
    start, end = torch.tensor([[config.vision_start_token_id]]), torch.tensor([[config.vision_end_token_id]])
    prompt = torch.cat([ids, start, image, end], dim=1)
    kinds = (prompt == config.image_token_id).long()  # what the processor returns: 1 marks image tokens
    return {"input_ids": prompt, "pixel_values": pixels, "image_grid_thw": grid, "mm_token_type_ids": kinds}
