"""A fixed sample of the architectures transformers' own test suite builds, one or more for each
way a model once failed to load equal (tools/reach_sweep.py runs the whole suite): configs given
per stage, layer numbers with gaps, layers shared or counted otherwise, configs ``AutoConfig``
cannot read, nothing to stream, modules the hooks do not see, names renamed to the leaf, kernels
picked by a tensor's flags, buffers a layer computes itself.

With the compatibility matrix's families (tests/compat/families.py) they make the sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["REACH", "Reach"]

Inputs = Callable[[Any, torch.Generator], dict[str, Any]]


@dataclass(frozen=True)
class Reach:
    """One architecture: its config and model classes, the config's kwargs, the inputs it takes,
    and what it once did wrong (the cause it stands for)."""

    name: str
    config: str
    model: str
    cause: str
    inputs: Inputs
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build_config(self) -> Any:
        import transformers

        return getattr(transformers, self.config)(**self.kwargs)


def _ids(config: Any, generator: torch.Generator) -> dict[str, Any]:
    vocab = config.get_text_config().vocab_size
    return {"input_ids": torch.randint(3, min(vocab, 90), (2, 7), generator=generator)}


def _pixels(size: int, channels: int = 3) -> Inputs:
    return lambda config, g: {"pixel_values": torch.randn(2, channels, size, size, generator=g)}


def _audio(length: int, channels: int = 1) -> Inputs:
    return lambda config, g: {"input_values": torch.randn(2, channels, length, generator=g)}


def _series(config: Any, generator: torch.Generator) -> dict[str, Any]:
    return {
        "past_values": torch.randn(2, config.context_length, config.num_input_channels, generator=generator)
    }


def _bark_fine(config: Any, generator: torch.Generator) -> dict[str, Any]:
    codes = torch.randint(0, config.input_vocab_size, (2, 7, config.n_codes_total), generator=generator)
    return {"codebook_idx": config.n_codes_given, "input_ids": codes}


_BERTISH = {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 37, "max_position_embeddings": 64}  # fmt: skip
_BARK = {"vocab_size": 99, "input_vocab_size": 99, "output_vocab_size": 99, "block_size": 64,
         "num_layers": 2, "num_heads": 2, "hidden_size": 16}  # fmt: skip

REACH: tuple[Reach, ...] = (
    # per-stage numbers in the config
    Reach("cvt", "CvtConfig", "CvtForImageClassification", "per-stage config", _pixels(64),
          {"embed_dim": [16, 32, 48], "num_heads": [1, 2, 3], "depth": [1, 2, 10], "patch_sizes": [7, 3, 3],
           "patch_stride": [4, 2, 2], "patch_padding": [2, 1, 1], "stride_kv": [2, 2, 2],
           "cls_token": [False, False, True], "attention_drop_rate": [0.0, 0.0, 0.0], "num_labels": 3}),
    Reach("focalnet", "FocalNetConfig", "FocalNetModel", "per-stage config", _pixels(32),
          {"image_size": 32, "patch_size": 2, "embed_dim": 16, "depths": [1, 2, 1], "hidden_sizes": [16, 32, 64]}),
    Reach("glpn", "GLPNConfig", "GLPNForDepthEstimation", "per-stage config", _pixels(64),
          {"num_encoder_blocks": 2, "depths": [1, 1], "sr_ratios": [2, 1], "hidden_sizes": [8, 16],
           "num_attention_heads": [1, 2], "mlp_ratios": [2, 2], "patch_sizes": [3, 3], "strides": [2, 2],
           "decoder_hidden_size": 16}),
    # layer numbers with gaps: parameter-free modules between numbered layers
    Reach("encodec", "EncodecConfig", "EncodecModel", "layer gaps", _audio(480),
          {"num_filters": 4, "upsampling_ratios": [8, 4], "hidden_size": 8, "codebook_size": 64,
           "num_lstm_layers": 1, "target_bandwidths": [1.5, 3.0], "sampling_rate": 16000}),
    # shared or otherwise counted layers
    Reach("albert", "AlbertConfig", "AlbertForMaskedLM", "shared layers, nothing to stream", _ids,
          _BERTISH | {"embedding_size": 16}),
    Reach("efficientnet", "EfficientNetConfig", "EfficientNetForImageClassification", "layer count", _pixels(32),
          {"image_size": 32, "kernel_sizes": [3, 3, 5], "in_channels": [32, 16, 24], "out_channels": [16, 24, 20],
           "strides": [1, 1, 2], "num_block_repeats": [1, 1, 2], "expand_ratios": [1, 6, 6], "num_labels": 3}),
    # configs AutoConfig cannot read
    Reach("bark_semantic", "BarkSemanticConfig", "BarkSemanticModel", "AutoConfig cannot read", _ids, _BARK),
    Reach("bark_fine", "BarkFineConfig", "BarkFineModel", "AutoConfig cannot read", _bark_fine,
          _BARK | {"n_codes_total": 4, "n_codes_given": 1}),
    # nothing repeats under a layer name
    Reach("xlm", "XLMConfig", "XLMWithLMHeadModel", "nothing to stream", _ids,
          {"vocab_size": 99, "emb_dim": 32, "n_layers": 2, "n_heads": 4, "max_position_embeddings": 64}),
    # modules the hooks do not see
    Reach("funnel", "FunnelConfig", "FunnelModel", "a layer that is a list of layers", _ids,
          {"vocab_size": 99, "block_sizes": [1, 1, 1], "num_decoder_layers": 1, "d_model": 32, "n_head": 4,
           "d_head": 8, "d_inner": 37}),
    Reach("squeezebert", "SqueezeBertConfig", "SqueezeBertModel", "layer.forward called directly", _ids,
          _BERTISH | {"intermediate_size": 64, "embedding_size": 32, "q_groups": 2, "k_groups": 2, "v_groups": 2,
                      "post_attention_groups": 2, "intermediate_groups": 4, "output_groups": 1}),
    Reach("poolformer", "PoolFormerConfig", "PoolFormerModel", "modules the hooks do not see", _pixels(64),
          {"num_encoder_blocks": 4, "depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 32, 64]}),
    # checkpoint names renamed down to the leaf
    Reach("pixio", "PixioConfig", "PixioModel", "layer names are not module paths", _pixels(32),
          {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 37}),
    # requires_grad picks matmul's kernel
    Reach("patchtst", "PatchTSTConfig", "PatchTSTModel", "kernel picked by requires_grad", _series,
          {"context_length": 32, "num_input_channels": 2, "patch_length": 4, "patch_stride": 4, "d_model": 16,
           "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 32}),
    # buffers a layer computes in __init__
    Reach("gpt_neo", "GPTNeoConfig", "GPTNeoForCausalLM", "buffers computed per layer", _ids,
          {"vocab_size": 99, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]],
           "max_position_embeddings": 256, "window_size": 8}),
    Reach("gpt_bigcode", "GPTBigCodeConfig", "GPTBigCodeForCausalLM", "buffers computed per model", _ids,
          {"vocab_size": 99, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256}),
)  # fmt: skip
