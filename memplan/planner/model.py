"""What a checkpoint is made of: its tensors, its layers and stacks of them, and the facts of its
config the estimate needs. Plain data; :func:`~memplan.planner.inspect` builds it."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from memplan._dtypes import FLOATING
from memplan._fileio import FileIdentity
from memplan.planner.quantization import PreQuantized

__all__ = [
    "Architecture",
    "Checkpoint",
    "LayerInfo",
    "Role",
    "Stack",
    "TensorInfo",
    "in_module",
]

T = TypeVar("T")

Role = Literal["decoder", "encoder", "vision", "audio"]


def in_module(name: str, module: str) -> bool:
    """Whether the tensor or module ``name`` is ``module`` or lies inside it."""
    return name == module or name.startswith(f"{module}.")


@dataclass(frozen=True, slots=True)  # one per tensor or layer: 100k+ objects, no dict each
class TensorInfo:
    """A tensor's header facts, where it lives, and which layer it belongs to (its position in
    :attr:`Checkpoint.layers`)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int
    layer: int | None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0] if "." in self.name else ""


@dataclass(frozen=True, slots=True)  # one per tensor or layer: 100k+ objects, no dict each
class LayerInfo:
    """One block of a stack: its number in the stack, module prefix (``model.encoder.layers.3``),
    tensors and bytes."""

    index: int
    prefix: str
    tensors: tuple[str, ...]
    nbytes: int


@dataclass(frozen=True)
class Architecture:
    """The facts of config.json the estimate needs; None where the config does not say."""

    model_type: str | None = None
    architectures: tuple[str, ...] = ()
    num_layers: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    intermediate_size: int | None = None
    tie_word_embeddings: bool = False
    quantization: PreQuantized | None = None  # the checkpoint was saved already quantized
    num_experts: int | None = None
    experts_per_token: int | None = None
    moe_intermediate_size: int | None = None
    torch_dtype: str | None = None
    max_positions: int | None = None  # the longest sequence its position embeddings cover


@dataclass(frozen=True)
class Stack:
    """One stack of repeated blocks (a decoder, a text or audio encoder, a vision tower): the
    layers ``Checkpoint.layers[start : start + count]``, all under ``prefix``, with the facts of
    their own part of config.json. ``tokens`` is a sequence length the config fixes (image
    patches, audio frames); None means the workload's context."""

    prefix: str
    role: Role
    start: int
    count: int
    architecture: Architecture
    tokens: int | None = None
    cross_attention: bool = False  # an encoder-decoder's decoder also caches the encoder's K/V

    @property
    def has_kv_cache(self) -> bool:
        """Only decoders generate token by token; encoders and towers run once per input."""
        return self.role == "decoder"


@dataclass(frozen=True)
class Checkpoint:
    """What a model is made of, read from its headers. Build it with :func:`~memplan.planner.inspect`."""

    path: Path
    files: tuple[Path, ...]
    tensors: Mapping[str, TensorInfo] = field(compare=False)
    architecture: Architecture
    layers: tuple[LayerInfo, ...]
    fingerprint: str
    notes: tuple[str, ...] = ()  # what a plan should say about how this was read
    components: tuple[tuple[str, Checkpoint], ...] = ()  # a diffusers pipeline's models, by name
    stacks: tuple[Stack, ...] = ()  # ``layers`` is their blocks, stack after stack
    # Buffers the model computes in its __init__ rather than stores (GPT-Neo's causal masks), by
    # module name, in bytes. Only a built model knows them: memplan.loaders.with_computed_buffers
    # fills them in (load does); empty means not known, and the estimate counts none.
    computed_buffers: tuple[tuple[str, int], ...] = field(default=(), compare=False)
    # Each weight file as inspect found it: a reader opening one later must find the same file
    # (its headers said where every tensor is), or refuse it.
    identities: Mapping[Path, FileIdentity] = field(default_factory=dict, compare=False, repr=False)
    _memo: dict[Hashable, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def memo(self, key: Hashable, compute: Callable[[], T]) -> T:
        """``compute()`` once per key: figures derived from this (immutable) checkpoint's shape."""
        if key not in self._memo:
            self._memo[key] = compute()
        result: T = self._memo[key]
        return result

    def module_of(self, tensor: TensorInfo) -> str:
        """The module a device map places ``tensor`` with: its layer, else its own module."""
        return self.layers[tensor.layer].prefix if tensor.layer is not None else tensor.module

    @property
    def max_positions(self) -> int | None:
        """The longest context the model takes: the least limit of the stacks that read the prompt
        (a tower whose input the config fixes has no say), None where the config sets none."""
        limits = [s.architecture.max_positions for s in self.stacks if s.tokens is None]
        known = [n for n in (*limits, self.architecture.max_positions) if n is not None]
        return min(known, default=None)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def bytes_by_dtype(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for t in self.tensors.values():
            totals[t.dtype] += t.nbytes
        return dict(totals)

    @property
    def dtype(self) -> str:
        """The floating dtype most bytes are stored in (the model's working dtype)."""
        floats = {d: n for d, n in self.bytes_by_dtype().items() if d in FLOATING}
        return max(floats, key=lambda d: floats[d]) if floats else "F32"

    def non_layer_tensors(self) -> list[TensorInfo]:
        return [t for t in self.tensors.values() if t.layer is None]

    @property
    def name(self) -> str:
        return self.path.name
