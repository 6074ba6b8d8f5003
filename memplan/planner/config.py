"""config.json's dialects: the facts of an :class:`~memplan.planner.model.Architecture` as each
family spells them (GPT-2's ``n_embd``, T5's ``d_kv``, BART's ``encoder_layers``, a multimodal
model's ``text_config``), read as strictly as header numbers. Pure: mappings in, facts out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memplan.errors import CheckpointError
from memplan.planner.model import Architecture, Role
from memplan.planner.quantization import read_quantization

__all__ = [
    "MAX_CONFIG_INT",
    "fixed_tokens",
    "model_architecture",
    "read_architecture",
    "section",
]

# No real model has a dimension or count beyond int32; a larger one is a corrupt or hostile config
# (10**12 layers made a load build its skeleton forever).
MAX_CONFIG_INT = 2**31 - 1

# Config fields a model may give per stage (a list, or a dict by part): the layers of all stages
# add up; for a width or a head count the widest stage is what the estimate must hold.
_SUMMED = frozenset({"num_hidden_layers", "n_layer"})

# Encoder-decoder configs (BART, Whisper, T5) name each side's facts their own way.
_SIDE_KEYS: dict[Role, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "encoder": (
        ("num_hidden_layers", ("encoder_layers", "num_layers")),
        ("num_attention_heads", ("encoder_attention_heads",)),
        ("intermediate_size", ("encoder_ffn_dim",)),
        ("max_position_embeddings", ("max_source_positions",)),
    ),
    "decoder": (
        ("num_hidden_layers", ("decoder_layers", "num_decoder_layers", "num_layers")),
        ("num_attention_heads", ("decoder_attention_heads",)),
        ("intermediate_size", ("decoder_ffn_dim",)),
        ("max_position_embeddings", ("max_target_positions",)),
    ),
}


@dataclass(frozen=True)
class _ConfigReader:
    """Reads config numbers as strictly as header numbers: integers in range, or absent (null).

    A number given per stage (CvT's ``num_heads: [1, 2, 3]``, Lxmert's layers by part) is read as
    one: the sum for layer counts, the largest for the rest; every stage's value is checked."""

    cfg: Mapping[str, Any]
    source: str

    def count(self, *keys: str, minimum: int = 1) -> int | None:
        """The first of ``keys`` the config sets (null means not set)."""
        for key in keys:
            value = self.cfg.get(key)
            if value is None:
                continue
            stages = list(value.values()) if isinstance(value, dict) else value
            if isinstance(stages, list | tuple) and stages:
                numbers = [self._number(key, stage, minimum) for stage in stages]
                return min(sum(numbers), MAX_CONFIG_INT) if key in _SUMMED else max(numbers)
            return self._number(key, value, minimum)
        return None

    def _number(self, key: str, value: Any, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_CONFIG_INT:
            raise CheckpointError(
                self.source, f"{key} must be an integer from {minimum} to {MAX_CONFIG_INT}, got {value!r}"
            )
        return value


def read_architecture(config: Mapping[str, Any], source: str = "config.json") -> Architecture:
    """The facts of ``config``; a number out of range is a :class:`CheckpointError` on ``source``."""
    # Multimodal configs keep the language model's facts under text_config.
    text = config.get("text_config")
    cfg: Mapping[str, Any] = text if isinstance(text, dict) and "num_hidden_layers" not in config else config
    read = _ConfigReader(cfg, source)
    # GPT-2 and T5/BART spell the same facts their own way (n_embd, d_model, d_kv, d_ff).
    heads = read.count("num_attention_heads", "n_head", "num_heads")
    hidden = read.count("hidden_size", "n_embd", "d_model")
    head_dim = read.count("head_dim", "d_kv") or (hidden // heads if hidden and heads else None)
    if head_dim == 0:
        raise CheckpointError(source, f"num_attention_heads {heads} is more than hidden_size {hidden}")
    return Architecture(
        model_type=_str(cfg, "model_type") or _str(config, "model_type"),
        architectures=_names(config, source),
        num_layers=read.count("num_hidden_layers", "n_layer"),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=read.count("num_key_value_heads") or heads,
        head_dim=head_dim,
        vocab_size=read.count("vocab_size"),
        intermediate_size=read.count("intermediate_size", "n_inner", "d_ff", "ffn_dim"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
        # Dense models may say 0 experts; the estimate treats 0 as "no experts".
        num_experts=read.count("num_local_experts", "num_experts", "n_routed_experts", minimum=0),
        experts_per_token=read.count("num_experts_per_tok", "moe_topk", minimum=0),
        moe_intermediate_size=read.count("moe_intermediate_size", minimum=0),
        torch_dtype=_str(cfg, "torch_dtype", "dtype") or _str(config, "torch_dtype", "dtype"),
        quantization=read_quantization(config, source),
        max_positions=read.count("max_position_embeddings", "n_positions"),
    )


def model_architecture(config: Mapping[str, Any], source: str) -> Architecture:
    """The model's facts; an encoder-decoder's are its decoder's, the side that generates."""
    return read_architecture(_side(config, "decoder") if config.get("is_encoder_decoder") else config, source)


def section(config: Mapping[str, Any], role: Role) -> Mapping[str, Any]:
    """The part of config.json that describes a stack: ``vision_config``, an encoder-decoder's
    ``encoder``/``decoder``, one side of a BART/T5/Whisper config, or the whole config."""
    for key in (f"{role}_config", role):
        sub = config.get(key)
        if isinstance(sub, dict):
            return sub
    if role in ("encoder", "decoder") and config.get("is_encoder_decoder"):
        return _side(config, role)
    return config


def fixed_tokens(part: Mapping[str, Any], source: str) -> int | None:
    """The sequence length a tower's config fixes, whatever the prompt: audio encoders pad to
    ``max_source_positions`` frames; images are resized to ``image_size`` and cut into patches
    (plus a class token). Sizes given per axis (lists) leave it to the workload's context."""
    if part.get("num_mel_bins") is not None:
        return _ConfigReader(part, source).count("max_source_positions")
    image, patch = part.get("image_size"), part.get("patch_size")
    if type(image) is int and type(patch) is int and 0 < patch <= image:
        return (image // patch) ** 2 + 1
    return None


def _side(config: Mapping[str, Any], side: Role) -> dict[str, Any]:
    """``config`` as one side of an encoder-decoder reads: its own names for the facts it lacks."""
    view = dict(config)
    for key, names in _SIDE_KEYS.get(side, ()):
        found = next((config[n] for n in names if config.get(n) is not None), None)
        if key not in config and found is not None:
            view[key] = found
    return view


def _names(config: Mapping[str, Any], source: str) -> tuple[str, ...]:
    names = config.get("architectures") or ()
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(source, f"architectures must be a list of class names, got {names!r}")
    return tuple(names)


def _str(cfg: Mapping[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, str):
            return value
    return None
