"""``inspect(path) -> Checkpoint``: a model's shape from its headers, index and config.json.

Only the 8-byte length and JSON header of each shard are read, never tensor data, never torch.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from memplan._dtypes import FLOATING
from memplan._safetensors import ShardHeader, TensorEntry, read_header
from memplan._torchbin import read_bin_header
from memplan.errors import CheckpointError
from memplan.planner.quantization import PreQuantized, read_quantization
from memplan.planner.sources import resolve

__all__ = [
    "Architecture",
    "Checkpoint",
    "LayerInfo",
    "Stack",
    "TensorInfo",
    "in_module",
    "inspect",
    "load_json",
]

T = TypeVar("T")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_SINGLE_NAME = "pytorch_model.bin"
BIN_NOTE = "weights are a PyTorch .bin: their shapes were read with torch.load(weights_only=True)"
# A block is the first (outermost) numbered child of a stack container in a name: T5's
# ``decoder.block.3.layer.1.`` is block 3 of ``decoder.block``, not sub-layer 1 of block 3.
_BLOCK = re.compile(r"^((?:.*?\.)?(?:layers|h|blocks|block|layer))\.(\d+)\.")

Role = Literal["decoder", "encoder", "vision", "audio"]
# Towers and encoders say what they are in their module paths (``vision_tower``, ``model.encoder``);
# a stack that says nothing (``model.layers``, ``transformer.h``) is a decoder.
_ROLE_WORDS: tuple[tuple[tuple[str, ...], Role], ...] = (
    (("vision", "visual"), "vision"),
    (("audio",), "audio"),
    (("encoder",), "encoder"),
)
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

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "config.json") -> Architecture:
        """The facts of ``config``; a number out of range is a :class:`CheckpointError` on ``source``."""
        # Multimodal configs keep the language model's facts under text_config.
        text = config.get("text_config")
        cfg: Mapping[str, Any] = (
            text if isinstance(text, dict) and "num_hidden_layers" not in config else config
        )
        read = _ConfigReader(cfg, source)
        # GPT-2 and T5/BART spell the same facts their own way (n_embd, d_model, d_kv, d_ff).
        heads = read.count("num_attention_heads", "n_head", "num_heads")
        hidden = read.count("hidden_size", "n_embd", "d_model")
        head_dim = read.count("head_dim", "d_kv") or (hidden // heads if hidden and heads else None)
        if head_dim == 0:
            raise CheckpointError(source, f"num_attention_heads {heads} is more than hidden_size {hidden}")
        return cls(
            model_type=_str(cfg, "model_type") or _str(config, "model_type"),
            architectures=_names(config, source),
            num_layers=read.count("num_hidden_layers", "n_layer"),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=read.count("num_key_value_heads") or heads,
            head_dim=head_dim,
            vocab_size=read.count("vocab_size"),
            intermediate_size=read.count("intermediate_size", "n_inner", "d_ff", "ffn_dim"),
            tie_word_embeddings=bool(
                config.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
            ),
            # Dense models may say 0 experts; the estimate treats 0 as "no experts".
            num_experts=read.count("num_local_experts", "num_experts", "n_routed_experts", minimum=0),
            experts_per_token=read.count("num_experts_per_tok", "moe_topk", minimum=0),
            moe_intermediate_size=read.count("moe_intermediate_size", minimum=0),
            torch_dtype=_str(cfg, "torch_dtype", "dtype") or _str(config, "torch_dtype", "dtype"),
            quantization=read_quantization(config, source),
            max_positions=read.count("max_position_embeddings", "n_positions"),
        )


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


# No real model has a dimension or count beyond int32; a larger one is a corrupt or hostile config
# (10**12 layers made a load build its skeleton forever).
MAX_CONFIG_INT = 2**31 - 1


# Config fields a model may give per stage (a list, or a dict by part): the layers of all stages
# add up; for a width or a head count the widest stage is what the estimate must hold.
_SUMMED = frozenset({"num_hidden_layers", "n_layer"})


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


def in_module(name: str, module: str) -> bool:
    """Whether the tensor or module ``name`` is ``module`` or lies inside it."""
    return name == module or name.startswith(f"{module}.")


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


@dataclass(frozen=True)
class Checkpoint:
    """What a model is made of, read from its headers. Build it with :func:`inspect`."""

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


def load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(str(path), f"cannot read {what}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(str(path), f"{what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(str(path), f"{what} is not a JSON object")
    return data


def _index_shards(directory: Path, index_path: Path) -> dict[str, Path]:
    """tensor name -> shard path, from the index; every shard must be a file of ``directory``."""
    weight_map = load_json(index_path, "the index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(str(index_path), "index has no weight_map of tensor names to files")
    checked: dict[str, Path] = {}  # a shard holds hundreds of tensors: check each file once
    shards: dict[str, Path] = {}
    for tensor, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise CheckpointError(str(index_path), "weight_map must name a file", tensor=tensor)
        if file not in checked:
            checked[file] = _checked_shard(directory, index_path, file, tensor)
        shards[tensor] = checked[file]
    return shards


def _checked_shard(directory: Path, index_path: Path, file: str, tensor: str) -> Path:
    """``directory / file``, where ``file`` must be a plain name. The file itself may be a link
    whose target lies elsewhere: the Hugging Face cache links snapshot files into ``blobs/``."""
    if file in (".", "..") or "/" in file or "\\" in file or Path(file).is_absolute():
        raise CheckpointError(
            str(index_path), f"shard {file!r} is outside the model directory", tensor=tensor
        )
    return _regular(directory / file, "shard named by the index ", tensor)


def _missing(path: Path) -> str:
    if not path.is_symlink():
        return "does not exist"
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python 3.10-3.12 raise this for a loop (3.13: OSError ELOOP)
        return "is a symlink loop"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop"
    return f"links to {os.readlink(path)}, which is missing"


def _regular(file: Path, what: str = "", tensor: str | None = None) -> Path:
    """``file``, which must be a regular file (or a link to one): reading a FIFO's header, or a
    device's, would wait forever or read what is no checkpoint."""
    if not file.is_file():
        why = "not a regular file" if file.exists() else _missing(file)
        raise CheckpointError(str(file), what + why, tensor=tensor)
    return file


# Weight formats in the order transformers prefers them: (index, single file, other files).
_FORMATS = (
    (INDEX_NAME, SINGLE_NAME, "*.safetensors"),
    (BIN_INDEX_NAME, BIN_SINGLE_NAME, "*pytorch_model*.bin"),  # diffusers: diffusion_pytorch_model
)


def _discover(path: Path) -> tuple[Path, list[Path], dict[str, Path] | None]:
    """(model directory, weight files, tensor->file map from an index or None)."""
    if not path.exists():
        raise CheckpointError(str(path), _missing(path))
    if not path.is_dir():
        return path.parent, [_regular(path)], None
    for index_name, single_name, pattern in _FORMATS:
        if (path / index_name).exists():
            weight_map = _index_shards(path, _regular(path / index_name))
            return path, sorted(set(weight_map.values())), weight_map
        found = [path / single_name] if (path / single_name).exists() else sorted(path.glob(pattern))
        if found:
            return path, [_regular(f) for f in found], None
    raise CheckpointError(
        str(path),
        f"no {INDEX_NAME}, {SINGLE_NAME}, *.safetensors, {BIN_INDEX_NAME} or {BIN_SINGLE_NAME} file here",
    )


def _header(file: Path) -> ShardHeader:
    return read_bin_header(file) if file.suffix == ".bin" else read_header(file)


def _collect(
    headers: list[ShardHeader], weight_map: dict[str, Path] | None
) -> dict[str, tuple[TensorEntry, Path]]:
    """tensor name -> (its header entry, its shard); a tensor stored twice is an error."""
    entries: dict[str, tuple[TensorEntry, Path]] = {}
    for header in headers:
        for entry in header.tensors:
            if weight_map is not None and weight_map.get(entry.name) != header.path:
                continue  # the index is authoritative; a stray copy elsewhere is not loaded
            if entry.name in entries:
                other = entries[entry.name][1].name
                raise CheckpointError(str(header.path), f"also stored in {other}", tensor=entry.name)
            entries[entry.name] = (entry, header.path)
    for tensor, shard in (weight_map or {}).items():
        if tensor not in entries:
            raise CheckpointError(str(shard), "tensor named by the index is not in this shard", tensor=tensor)
    return entries


def _blocks(names: Iterable[str]) -> dict[str, dict[int, list[str]]]:
    """stack prefix -> block number -> the names of its tensors, for every tensor inside a block."""
    found: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name in names:
        match = _BLOCK.match(name)
        if match:
            found[match.group(1)][int(match.group(2))].append(name)
    return found


def _role(prefix: str) -> Role:
    """What a stack is, from its module path: towers and encoders say so in their names."""
    parts = prefix.lower().split(".")
    for words, role in _ROLE_WORDS:
        if any(word in part for part in parts for word in words):
            return role
    return "decoder"


def _side(config: Mapping[str, Any], side: Role) -> dict[str, Any]:
    """``config`` as one side of an encoder-decoder reads: its own names for the facts it lacks."""
    view = dict(config)
    for key, names in _SIDE_KEYS.get(side, ()):
        found = next((config[n] for n in names if config.get(n) is not None), None)
        if key not in config and found is not None:
            view[key] = found
    return view


def _section(config: Mapping[str, Any], role: Role) -> Mapping[str, Any]:
    """The part of config.json that describes a stack: ``vision_config``, an encoder-decoder's
    ``encoder``/``decoder``, one side of a BART/T5/Whisper config, or the whole config."""
    for key in (f"{role}_config", role):
        sub = config.get(key)
        if isinstance(sub, dict):
            return sub
    if role in ("encoder", "decoder") and config.get("is_encoder_decoder"):
        return _side(config, role)
    return config


def _fixed_tokens(section: Mapping[str, Any], source: str) -> int | None:
    """The sequence length a tower's config fixes, whatever the prompt: audio encoders pad to
    ``max_source_positions`` frames; images are resized to ``image_size`` and cut into patches
    (plus a class token). Sizes given per axis (lists) leave it to the workload's context."""
    if section.get("num_mel_bins") is not None:
        return _ConfigReader(section, source).count("max_source_positions")
    image, patch = section.get("image_size"), section.get("patch_size")
    if type(image) is int and type(patch) is int and 0 < patch <= image:
        return (image // patch) ** 2 + 1
    return None


def _stack_layers(
    prefix: str, blocks: dict[int, list[str]], entries: dict[str, tuple[TensorEntry, Path]]
) -> list[LayerInfo]:
    """A stack's blocks in order of their numbers. Numbers may skip: a stack can hold modules
    without parameters between its layers (Musicgen's), and whether a gap is a hole is the
    model's to say when it is built (a parameter the checkpoint lacks is an error there)."""
    layers = []
    for index in sorted(blocks):
        names = blocks[index]
        nbytes = sum(entries[name][0].nbytes for name in names)
        layers.append(LayerInfo(index, f"{prefix}.{index}", tuple(names), nbytes))
    return layers


def _image_model(prefix: str, config: Mapping[str, Any], source: str) -> bool:
    """Whether config.json describes an image model alone: image and patch sizes, and no text
    vocabulary anywhere (Fuyu keeps its vocabulary in ``text_config`` and its decoder under
    ``language_model``)."""
    if "language_model" in prefix or "vocab_size" in config or isinstance(config.get("text_config"), dict):
        return False
    return _fixed_tokens(config, source) is not None


def _stack(prefix: str, start: int, count: int, config: Mapping[str, Any], source: str) -> Stack:
    role = _role(prefix)
    if role == "decoder" and _image_model(prefix, config, source):
        role = "vision"  # a path that says nothing, in an image model (ViT's ``layers``): no tokens to decode
    section = _section(config, role)
    return Stack(
        prefix, role, start, count, Architecture.from_config(section, source),
        tokens=None if role == "decoder" else _fixed_tokens(section, source),
        cross_attention=role == "decoder" and bool(config.get("is_encoder_decoder")),
    )  # fmt: skip


def _stacks(
    entries: dict[str, tuple[TensorEntry, Path]], config: Mapping[str, Any], source: str
) -> tuple[tuple[Stack, ...], tuple[LayerInfo, ...]]:
    """Every stack of repeated blocks, and all their layers, stack after stack."""
    blocks = _blocks(entries)
    # Encoders and towers run before the decoder that reads them: streaming fetches in this order.
    prefixes = sorted(blocks, key=lambda prefix: (_role(prefix) == "decoder", prefix))
    stacks: list[Stack] = []
    layers: list[LayerInfo] = []
    for prefix in prefixes:
        members = _stack_layers(prefix, blocks[prefix], entries)
        stacks.append(_stack(prefix, len(layers), len(members), config, source))
        layers.extend(members)
    return tuple(stacks), tuple(layers)


def _fingerprint(entries: dict[str, tuple[TensorEntry, Path]]) -> str:
    digest = hashlib.sha256()
    for name in sorted(entries):
        e = entries[name][0]
        digest.update(f"{name}:{e.dtype}:{','.join(map(str, e.shape))};".encode())
    return digest.hexdigest()[:16]


def _config(directory: Path) -> tuple[dict[str, Any], str]:
    """config.json and its path; an empty config where there is none."""
    config_path = directory / "config.json"
    if not config_path.exists() and not config_path.is_symlink():
        return {}, str(config_path)
    return load_json(_regular(config_path), "config.json"), str(config_path)


def _architecture(config: Mapping[str, Any], source: str) -> Architecture:
    """The model's facts; an encoder-decoder's are its decoder's, the side that generates."""
    return Architecture.from_config(
        _side(config, "decoder") if config.get("is_encoder_decoder") else config, source
    )


def inspect(path: str | os.PathLike[str], *, revision: str | None = None) -> Checkpoint:
    """Read a checkpoint's shape: a model directory (safetensors or ``.bin``, sharded or not),
    one weights file with its configs beside it, a diffusers pipeline folder (its components
    as one checkpoint), or a Hugging Face repo id (``org/name``, from the local cache first;
    see :func:`~memplan.planner.sources.resolve`).

    Raises :class:`~memplan.CheckpointError` naming the file (and tensor) at fault.
    """
    path = resolve(path, revision=revision)
    if (path / "model_index.json").is_file():
        from memplan.planner.pipeline import inspect_pipeline

        return inspect_pipeline(path)
    directory, files, weight_map = _discover(path)
    entries = _collect([_header(f) for f in files], weight_map)
    config, source = _config(directory)
    architecture = _architecture(config, source)
    stacks, layers = _stacks(entries, config, source)
    position = {name: i for i, layer in enumerate(layers) for name in layer.tensors}
    infos = {
        name: TensorInfo(name, e.dtype, e.shape, shard, e.offset, e.nbytes, position.get(name))
        for name, (e, shard) in entries.items()
    }
    if architecture.num_layers is None and layers:
        architecture = replace(architecture, num_layers=len(layers))
    notes: tuple[str, ...] = (BIN_NOTE,) if any(f.suffix == ".bin" for f in files) else ()
    if architecture.quantization is not None:
        notes += (architecture.quantization.note(),)
    return Checkpoint(
        path, tuple(files), infos, architecture, layers, _fingerprint(entries), notes, stacks=stacks
    )
