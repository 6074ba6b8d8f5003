"""Llama-shaped checkpoints with real headers and hollow data, for planning what you have not downloaded.

``write_llama_checkpoint(path, LLAMA_SHAPES["70b"])`` writes config.json, the index and shards
whose headers are exactly those of the real model; the tensor data are sparse holes (the files
are extended with ``truncate``), so a 405B-shaped checkpoint takes no disk space. Planning reads
only headers, so it sees the real model. Loading one gives zeros.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memplan._dtypes import BITS, TORCH_NAMES

__all__ = [
    "LLAMA_SHAPES",
    "LlamaShape",
    "llama_tensors",
    "write_llama_checkpoint",
    "write_safetensors_header",
]


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def config(self, dtype: str = "BF16") -> dict[str, Any]:
        """A transformers ``LlamaConfig`` as config.json holds it."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "hidden_act": "silu",
            "torch_dtype": TORCH_NAMES[dtype],
        }


LLAMA_SHAPES: dict[str, LlamaShape] = {
    "tiny": LlamaShape(64, 2, 4, 2, 128, 256),
    "8b": LlamaShape(4096, 32, 32, 8, 14336, 128256),
    "70b": LlamaShape(8192, 80, 64, 8, 28672, 128256),
    "405b": LlamaShape(16384, 126, 128, 8, 53248, 128256),
}


def llama_tensors(shape: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of ``LlamaForCausalLM``, in transformers' order."""
    h, q, kv, inter = (
        shape.hidden_size,
        shape.num_heads * shape.head_dim,
        shape.num_kv_heads * shape.head_dim,
        shape.intermediate_size,
    )
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab_size, h))]
    for i in range(shape.num_layers):
        p = f"model.layers.{i}"
        tensors += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (q, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, q)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (inter, h)),
            (f"{p}.mlp.up_proj.weight", (inter, h)),
            (f"{p}.mlp.down_proj.weight", (h, inter)),
        ]
    tensors.append(("model.norm.weight", (h,)))
    if not shape.tie_word_embeddings:
        tensors.append(("lm_head.weight", (shape.vocab_size, h)))
    return tensors


def write_safetensors_header(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: str) -> int:
    """Write a safetensors file whose data are a sparse hole; returns its data bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in tensors:
        nbytes = math.prod(dims) * BITS[dtype] // 8
        header[name] = {"dtype": dtype, "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return offset


def _shards(
    tensors: list[tuple[str, tuple[int, ...]]], dtype: str, max_shard: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for tensor in tensors:
        nbytes = math.prod(tensor[1]) * BITS[dtype] // 8
        if shards[-1] and size + nbytes > max_shard:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    return shards


def write_llama_checkpoint(
    path: Path, shape: LlamaShape, *, dtype: str = "BF16", max_shard_bytes: int = 5 * 10**9
) -> Path:
    """A Hugging Face model directory of ``shape`` with hollow data; returns ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    shards = _shards(llama_tensors(shape), dtype, max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for i, tensors in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors_header(path / name, tensors, dtype)
        weight_map.update({tensor: name for tensor, _ in tensors})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))
    return path
