"""What a running model holds beyond its weights: the KV cache a decoder keeps for its context,
and the transient peak of one layer's forward (or the logits). Pure: shapes in, bytes out."""

from __future__ import annotations

from memplan._dtypes import dtype_bytes
from memplan.planner.model import Architecture, Checkpoint, Stack
from memplan.planner.workload import Workload

__all__ = ["activation_bytes", "kv_bytes_by_layer", "kv_bytes_per_layer", "kv_cache_bytes"]


def _kv_bytes(arch: Architecture, tokens: int, workload: Workload, dtype: str) -> int:
    if arch.num_kv_heads is None or arch.head_dim is None:
        return 0
    kv_dtype = workload.kv_dtype or dtype
    return 2 * arch.num_kv_heads * arch.head_dim * tokens * workload.batch * dtype_bytes(kv_dtype)


def kv_bytes_per_layer(arch: Architecture, workload: Workload, dtype: str) -> int:
    """One decoder layer's self-attention cache: keys and values of every token of the context."""
    return _kv_bytes(arch, workload.tokens, workload, dtype)


def _stack_tokens(stack: Stack, workload: Workload) -> int:
    return stack.tokens or workload.tokens


def _stack_kv(checkpoint: Checkpoint, workload: Workload, dtype: str) -> list[int]:
    """Each stack's KV cache per layer: a decoder keeps its own tokens' keys and values, and with
    cross-attention the encoder's too; encoders and towers keep none."""
    encoded = max(
        (_stack_tokens(s, workload) for s in checkpoint.stacks if not s.has_kv_cache),
        default=workload.tokens,
    )
    return [
        _kv_bytes(s.architecture, workload.tokens + (encoded if s.cross_attention else 0), workload, dtype)
        if s.has_kv_cache
        else 0
        for s in checkpoint.stacks
    ]


def kv_bytes_by_layer(checkpoint: Checkpoint, workload: Workload, dtype: str) -> dict[str, int]:
    """KV-cache bytes of each layer that keeps one, by layer prefix."""

    def compute() -> dict[str, int]:
        by_layer: dict[str, int] = {}
        for stack, per_layer in zip(checkpoint.stacks, _stack_kv(checkpoint, workload, dtype), strict=True):
            if per_layer:
                for layer in checkpoint.layers[stack.start : stack.start + stack.count]:
                    by_layer[layer.prefix] = per_layer
        return by_layer

    return checkpoint.memo(("kv_by_layer", workload, dtype), compute)


def kv_cache_bytes(checkpoint: Checkpoint, workload: Workload, dtype: str) -> int:
    """The whole KV cache: every decoder layer's, for ``workload``."""
    per_layer = _stack_kv(checkpoint, workload, dtype)
    return sum(kv * stack.count for stack, kv in zip(checkpoint.stacks, per_layer, strict=True))


def _layer_peak(arch: Architecture, tokens: int) -> int:
    """Elements one layer holds at once over ``tokens`` tokens. Attention is taken as SDPA/flash
    (no tokens x tokens score matrix)."""
    h, heads, hd = arch.hidden_size, arch.num_heads, arch.head_dim
    if h is None or heads is None or hd is None:
        return 0
    kv = (arch.num_kv_heads or heads) * hd
    inter = arch.intermediate_size or 4 * h
    if arch.num_experts and arch.experts_per_token:
        inter = (arch.moe_intermediate_size or inter) * arch.experts_per_token
    attention = 2 * h + 2 * heads * hd + 2 * kv + h  # residual, normed, q, attn out, k, v, o_proj out
    mlp = 3 * h + 3 * inter  # residual, normed, down out; gate, up, act(gate) * up
    return tokens * max(attention, mlp)


def _forward_tokens(stack: Stack, workload: Workload) -> int:
    """Tokens one forward of ``stack`` takes: a decoder's prefill chunk; an encoder's whole input."""
    if stack.has_kv_cache:
        return workload.tokens_per_forward
    return workload.batch * _stack_tokens(stack, workload)


def activation_bytes(checkpoint: Checkpoint, workload: Workload, dtype: str) -> int:
    """The transient peak of one forward: the largest working set of one layer of any stack, or
    the logits."""
    arch, tokens = checkpoint.architecture, workload.tokens_per_forward
    layers = [_layer_peak(s.architecture, _forward_tokens(s, workload)) for s in checkpoint.stacks]
    if not layers:  # no stack found: the config's facts, as one decoder
        layers = [_layer_peak(arch, tokens)]
    logits = tokens * ((arch.vocab_size or 0) + arch.hidden_size) if arch.hidden_size else 0
    return max(*layers, logits) * dtype_bytes(dtype)
