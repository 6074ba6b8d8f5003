"""``estimate(checkpoint, workload, strategy) -> Estimate``: bytes per device, by what holds them.

Weights (by dtype or quantized format), KV cache, the transient peak of one layer's forward,
buffers a loaded model keeps (a streaming arena, bitsandbytes' runtime, the load's own threads
and modules), the staging a load holds only while it reads, runtime overhead, and a learned
correction from peaks measured on earlier loads. A load's staging is gone before the first
forward: a device's peak is the larger of the two, never their sum. Pure: shapes in, numbers out.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from memplan._dtypes import TORCH_FLOATING, compute_dtype, dtype_bytes, dtype_name, normalize_dtype
from memplan.errors import ContextTooLong, MemplanError
from memplan.gpu.device import Device
from memplan.planner.checkpoint import Architecture, Checkpoint, Stack, TensorInfo, in_module
from memplan.planner.corrections import Corrections
from memplan.planner.quantization import is_quant_state, is_skipped
from memplan.planner.strategies import Full, Quantized, Sharded, Strategy, Streamed

__all__ = [
    "DEFAULT_CONTEXT",
    "DeviceEstimate",
    "Estimate",
    "Overheads",
    "Workload",
    "compute_dtype",
    "dtype_bytes",
    "dtype_name",
    "estimate",
    "normalize_dtype",
    "strategy_key",
]

MiB = 2**20
DEFAULT_CONTEXT = 4096  # tokens per sequence, where the model takes that many
NF4_BLOCK = 64
DOUBLE_QUANT_BLOCK = 256
NF4_CODE_BYTES = 16 * 4  # the 16 fp32 NF4 levels each quantised weight keeps


@dataclass(frozen=True)
class Workload:
    """What the model will run: ``batch`` sequences of ``context`` tokens.

    ``context`` None means the model's own limit, up to :data:`DEFAULT_CONTEXT` (see :meth:`for_model`).
    ``prefill_chunk`` caps the tokens of one forward (chunked prefill); None means the whole
    context in one forward, the worst case. ``kv_dtype`` None means the model's compute dtype; it
    takes a name such as ``"fp8"`` or a ``torch.dtype``, and keeps its canonical name (``"F8_E4M3"``).
    """

    batch: int = 1
    context: int | None = None
    kv_dtype: str | None = None
    prefill_chunk: int | None = None

    def __post_init__(self) -> None:
        for label, value in (("batch", self.batch), ("context", self.tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MemplanError(f"workload {label} must be a positive integer, got {value!r}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise MemplanError(f"prefill_chunk must be positive, got {self.prefill_chunk}")
        if self.kv_dtype is not None:  # a name or a torch.dtype; kept as its canonical name
            object.__setattr__(self, "kv_dtype", dtype_name(self.kv_dtype))

    @property
    def tokens(self) -> int:
        """Tokens per sequence: ``context``, or :data:`DEFAULT_CONTEXT` before a model sets it."""
        return DEFAULT_CONTEXT if self.context is None else self.context

    @property
    def tokens_per_forward(self) -> int:
        return self.batch * min(self.tokens, self.prefill_chunk or self.tokens)

    def for_model(self, checkpoint: Checkpoint) -> Workload:
        """This workload with the context ``checkpoint`` takes: its own limit where none was asked
        for, and a :class:`~memplan.ContextTooLong` for more than its position embeddings cover."""
        limit = checkpoint.max_positions
        if self.context is None:
            return replace(self, context=min(DEFAULT_CONTEXT, limit or DEFAULT_CONTEXT))
        if limit is not None and self.context > limit:
            raise ContextTooLong(checkpoint.name, self.context, limit)
        return self


@dataclass(frozen=True)
class Overheads:
    """Memory a loaded model costs beyond its tensors; tune these for your machine.

    ``cuda_context``: the CUDA context, cuBLAS workspace and kernels, per device touched.
    ``host_runtime``: the resident size of Python + torch + this library before any weight.
    ``allocator_slack``: fraction the caching allocator holds beyond live tensors.
    ``bnb_runtime``: host memory bitsandbytes takes for its int8 forward, or for its GPU
    kernels (native library, workspaces); measured at 44-70 MiB for int8 on 0.1B and 1.1B
    Llamas. A 4-bit model on the CPU takes none beyond the import
    (``benchmarks/estimate_accuracy.py``).
    ``cpu_4bit_repack``: host memory a 4-bit model's first forward leaves on the CPU, where
    bitsandbytes repacks each weight for its AVX512-BF16 kernel: the repack's temporaries
    fragment the heap (44-66 MiB measured on 0.1B and 1.1B Llamas; none where the CPU lacks the
    feature, which the estimate does not know: an over-estimate there).
    ``load_runtime``: host memory a load and its first forward take beyond the model's tensors
    whatever the model's size (the model class's module imported, reader and prefetch threads,
    the kernels' first workspaces): 54-69 MiB above the imports for models of 4 to 16 MiB.
    """

    cuda_context: int = 600 * MiB
    mps_runtime: int = 256 * MiB
    host_runtime: int = 400 * MiB
    allocator_slack: float = 0.05
    bnb_runtime: int = 64 * MiB
    load_runtime: int = 64 * MiB
    cpu_4bit_repack: int = 40 * MiB

    def fixed(self, device: Device) -> int:
        return {"cuda": self.cuda_context, "mps": self.mps_runtime, "cpu": self.host_runtime}.get(
            device.kind, 0
        )


@dataclass(frozen=True)
class DeviceEstimate:
    device: Device
    weights: int = 0
    kv_cache: int = 0
    activations: int = 0
    buffers: int = 0  # held while the model lives (arena, runtimes)
    overhead: int = 0
    correction: int = 0
    staging: int = 0  # held only while the load reads: gone before the first forward

    @property
    def peak(self) -> int:
        running = max(self.kv_cache + self.activations, self.staging)
        return self.weights + self.buffers + running + self.overhead + self.correction

    @property
    def at_load(self) -> int:
        """The uncorrected part a load alone reaches: no KV cache or activations until a forward runs."""
        return self.weights + self.buffers + self.staging + self.overhead


@dataclass(frozen=True)
class Estimate:
    strategy: Strategy
    devices: tuple[DeviceEstimate, ...]
    notes: tuple[str, ...] = ()

    def on(self, device: Device) -> DeviceEstimate:
        for d in self.devices:
            if d.device == device:
                return d
        return DeviceEstimate(device)

    @property
    def total(self) -> int:
        return sum(d.peak for d in self.devices)


@dataclass
class _Ledger:
    """Per-device sums while an estimate is built."""

    parts: dict[Device, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))

    def add(self, device: Device, **amounts: int) -> None:
        for part, amount in amounts.items():
            self.parts[device][part] += amount


def strategy_key(strategy: Strategy) -> str:
    """The name corrections are recorded under: ``full``, ``int8``, ``nf4``, ``sharded``, ``streamed``."""
    return strategy.method if isinstance(strategy, Quantized) else strategy.kind


# --- weights -------------------------------------------------------------------------------


# Weights bitsandbytes leaves alone though they sit in a layer as 2-D ``.weight``s: embeddings (T5's
# relative_attention_bias) and single experts, which transformers 5 fuses into 3-D expert tensors
# (``experts.gate_up_proj``) that are no ``nn.Linear``.
_NOT_LINEAR = re.compile(r"(?:^|\.)(?:experts\.\d+|[^.]*embed[^.]*|relative_attention_bias)(?:\.|$)")


def is_quantizable(tensor: TensorInfo, skip: tuple[str, ...] | None = None) -> bool:
    """bitsandbytes replaces the layers' ``nn.Linear`` (and ``Conv1D``) modules; embeddings, norms,
    experts fused by transformers, lm_head and the ``skip`` modules (llm_int8_skip_modules) stay.

    From names alone this is the repeated blocks' Linears: transformers also converts Linears
    outside the blocks (projectors, poolers) and keeps a class's ``_keep_in_fp32_modules`` (T5's
    ``wo``), which only the model class knows; the load report says what was converted.
    """
    return (
        tensor.layer is not None
        and len(tensor.shape) == 2
        and tensor.name.endswith(".weight")
        and _NOT_LINEAR.search(tensor.module) is None
        and not is_skipped(tensor.module, skip)
    )


def tensor_bytes(tensor: TensorInfo, dtype: str) -> int:
    """Bytes of ``tensor`` once cast to ``dtype``; integer tensors and the quantization states
    stored beside pre-quantized weights keep their own type."""
    if tensor.dtype not in TORCH_FLOATING or is_quant_state(tensor.name):
        return tensor.nbytes
    return tensor.numel * dtype_bytes(dtype)


def quantized_bytes(
    tensor: TensorInfo, method: str, dtype: str, double_quant: bool, skip: tuple[str, ...] | None = None
) -> int:
    """bnb's storage for one Linear weight, or ``dtype`` bytes for a module that stays."""
    if not is_quantizable(tensor, skip):
        return tensor_bytes(tensor, dtype)
    rows, numel = tensor.shape[0], tensor.numel
    if method == "int8":
        return numel + rows * 4  # int8 weights + one fp32 scale per output row (SCB)
    blocks = math.ceil(numel / NF4_BLOCK)
    absmax = blocks * 4  # one fp32 absmax per block
    if double_quant:  # absmax as 8 bits + fp32 absmax per 256 blocks, a 256-entry code, an fp32 offset
        absmax = blocks + math.ceil(blocks / DOUBLE_QUANT_BLOCK) * 4 + 256 * 4 + 4
    return math.ceil(numel / 2) + absmax + NF4_CODE_BYTES


@dataclass(frozen=True)
class WeightFormat:
    """How weights are stored: ``dtype``, or bnb ``method`` for the Linear weights. Hashable, so
    per-checkpoint sizes are computed once per format however many candidates ask."""

    dtype: str
    method: str | None = None
    double_quant: bool = True
    skip: tuple[str, ...] | None = None  # llm_int8_skip_modules

    @classmethod
    def of(cls, strategy: Strategy) -> WeightFormat:
        if isinstance(strategy, Quantized) and not strategy.prequantized:
            return cls(strategy.dtype, strategy.method, strategy.double_quant, strategy.skip_modules)
        return cls(strategy.dtype)

    def bytes_of(self, tensor: TensorInfo) -> int:
        if self.method is None:
            return tensor_bytes(tensor, self.dtype)
        return quantized_bytes(tensor, self.method, self.dtype, self.double_quant, self.skip)


@dataclass(frozen=True)
class _TensorKinds:
    """Each tensor's module and kind (``modules[i]``, ``kinds[i]``), and one tensor of each kind.

    A tensor's size in any format depends only on its dtype, shape and whether bnb quantizes it
    (with the skipped modules ``skip``),
    and decoder layers repeat a handful of those: each format sizes one tensor per kind, not
    every tensor (100k layers plan in well under a second). Two flat lists, not pairs: fewer
    objects for the garbage collector to walk.
    """

    modules: list[str]
    kinds: list[int]
    examples: list[TensorInfo]


def _tensor_kinds(checkpoint: Checkpoint, skip: tuple[str, ...] | None = None) -> _TensorKinds:
    def compute() -> _TensorKinds:
        index: dict[tuple[str, tuple[int, ...], bool], int] = {}
        found = _TensorKinds([], [], [])
        for tensor in checkpoint.tensors.values():
            key = (tensor.dtype, tensor.shape, is_quantizable(tensor, skip))
            if key not in index:
                index[key] = len(found.examples)
                found.examples.append(tensor)
            found.modules.append(checkpoint.module_of(tensor))
            found.kinds.append(index[key])
        return found

    return checkpoint.memo(("tensor_kinds", skip), compute)


# Each tensor in a streaming slot starts on this boundary (vectorised kernels want aligned rows):
# a layer of many small tensors takes more slot than its bytes.
SLOT_ALIGN = 256


def module_weight_bytes(
    checkpoint: Checkpoint, fmt: WeightFormat, *, aligned: bool = False
) -> dict[str, int]:
    """Bytes per module the device map places: each decoder layer, and each other module;
    ``aligned``: as laid out in a streaming slot, each tensor rounded up to :data:`SLOT_ALIGN`."""

    def compute() -> dict[str, int]:
        found = _tensor_kinds(checkpoint, fmt.skip)
        kind_bytes = [fmt.bytes_of(tensor) for tensor in found.examples]
        if aligned:
            kind_bytes = [-(-size // SLOT_ALIGN) * SLOT_ALIGN for size in kind_bytes]
        sizes: dict[str, int] = defaultdict(int)
        for module, kind in zip(found.modules, found.kinds, strict=True):
            sizes[module] += kind_bytes[kind]
        return dict(sizes)

    return checkpoint.memo(("module_bytes", fmt, aligned), compute)


def largest_slot_bytes(checkpoint: Checkpoint, fmt: WeightFormat) -> int:
    """The streaming slot that holds any one layer: the largest layer, laid out aligned."""
    sizes = module_weight_bytes(checkpoint, fmt, aligned=True)
    return max((sizes[layer.prefix] for layer in checkpoint.layers), default=0)


def layer_weight_bytes(checkpoint: Checkpoint, fmt: WeightFormat) -> list[int]:
    def compute() -> list[int]:
        sizes = module_weight_bytes(checkpoint, fmt)
        return [sizes[layer.prefix] for layer in checkpoint.layers]

    return checkpoint.memo(("layer_bytes", fmt), compute)


def non_layer_weight_bytes(checkpoint: Checkpoint, fmt: WeightFormat) -> int:
    return sum(module_weight_bytes(checkpoint, fmt).values()) - sum(layer_weight_bytes(checkpoint, fmt))


# --- KV cache and activations ---------------------------------------------------------------


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


# --- per strategy ---------------------------------------------------------------------------


def window_staging(window: int, read: int, kept: int, largest: int) -> int:
    """Bytes a device holds in flight beyond its weights while a load reads ``read`` bytes
    through a read-ahead window of ``window``, ``kept`` of them staying there as read.

    The reader holds up to a window of tensors not yet placed; a tensor larger than the window is
    read alone, whole, once the window is empty, and the window fills behind it while the load
    converts it: ``in_flight`` is the window, or that tensor and a window. (The tensor the load
    converts counts in the window until it is placed: measured on 1.1B Llamas, int8 and nf4
    loads peaked 120 and 171 MiB above their final footprint through a 256 MiB window, where
    ``window (1 - q)`` gives 123 and 184.) Placing keeps ``q = kept / read`` of each byte read,
    so after ``c`` bytes the device holds ``q c + min(in_flight, read - c)``: a peak of the final
    weights plus ``in_flight (1 - q)`` (nothing above the weights where every byte stays: read
    in place)."""
    if read <= 0:
        return 0
    in_flight = min(window if largest <= window else largest + window, read)
    return int(in_flight * max(0.0, 1.0 - kept / read))


def _largest_read(checkpoint: Checkpoint) -> int:
    return max((t.nbytes for t in _tensor_kinds(checkpoint).examples), default=0)


def _one_device(
    checkpoint: Checkpoint, workload: Workload, strategy: Full | Quantized, ledger: _Ledger
) -> None:
    device = strategy.device
    weights = sum(module_weight_bytes(checkpoint, WeightFormat.of(strategy)).values())
    kv = kv_cache_bytes(checkpoint, workload, strategy.dtype)
    act = activation_bytes(checkpoint, workload, strategy.dtype)
    ledger.add(device, weights=weights, kv_cache=kv, activations=act)
    window, read, largest = strategy.read_ahead, checkpoint.nbytes, _largest_read(checkpoint)
    if device.is_accelerator:  # every byte passes through the host on its way
        ledger.add(Device("cpu"), staging=window_staging(window, read, 0, largest))
        kept = 0
    else:
        kept = weights
        ledger.add(device, staging=window_staging(window, read, weights, largest))
    if isinstance(strategy, Quantized) and not strategy.prequantized:
        ledger.add(device, staging=_quantize_transient(checkpoint, strategy))
        ledger.add(device, activations=_dequantized(checkpoint, strategy))
    elif kept and not _read_in_place(checkpoint, strategy):  # one tensor as read beside its cast
        ledger.add(device, staging=largest)


def _read_in_place(checkpoint: Checkpoint, strategy: Full | Quantized) -> bool:
    """Whether the buffers a load reads into are the weights themselves (``tensor.to`` gives the
    same tensor back): no cast, or a pre-quantized layer taken as stored."""
    if isinstance(strategy, Quantized):
        return strategy.prequantized
    return _same_dtypes(checkpoint, strategy.dtype)


def _same_dtypes(checkpoint: Checkpoint, dtype: str) -> bool:
    """Whether every floating tensor is stored in ``dtype`` (no cast as it is read)."""
    return all(t.dtype not in TORCH_FLOATING or t.dtype == dtype for t in _tensor_kinds(checkpoint).examples)


def _largest_quantized(checkpoint: Checkpoint, strategy: Quantized) -> TensorInfo | None:
    skip = strategy.skip_modules
    found = (t for t in _tensor_kinds(checkpoint, skip).examples if is_quantizable(t, skip))
    return max(found, key=lambda t: t.numel, default=None)


def _quantize_transient(checkpoint: Checkpoint, strategy: Quantized) -> int:
    """Each Linear weight lands in ``dtype`` and is quantised. On an accelerator bitsandbytes'
    nf4 also passes it through float32; memplan's CPU quantizers work through cache-sized blocks."""
    largest = _largest_quantized(checkpoint, strategy)
    if largest is None:
        return 0
    staging = tensor_bytes(largest, strategy.dtype)
    if strategy.method == "nf4" and strategy.device.is_accelerator:
        return staging + 4 * largest.numel
    return staging


def _dequantized(checkpoint: Checkpoint, strategy: Quantized) -> int:
    """bitsandbytes' nf4 forward on an accelerator dequantises one weight at a time back to
    ``dtype``, beside the forward's activations."""
    largest = _largest_quantized(checkpoint, strategy)
    if strategy.method != "nf4" or not strategy.device.is_accelerator or largest is None:
        return 0
    return tensor_bytes(largest, strategy.dtype)


def _sharded(checkpoint: Checkpoint, workload: Workload, strategy: Sharded, ledger: _Ledger) -> None:
    sizes = module_weight_bytes(checkpoint, WeightFormat.of(strategy))
    slots = module_weight_bytes(checkpoint, WeightFormat.of(strategy), aligned=True)
    kv_of = kv_bytes_by_layer(checkpoint, workload, strategy.dtype)
    act = activation_bytes(checkpoint, workload, strategy.dtype)
    offloaded = strategy.offloaded  # scans the whole map: once, not once per module
    largest_offloaded = on_host = 0
    for device, modules in strategy.runs:  # one ledger entry per run of modules, not per module
        nbytes = [sizes.get(module, 0) for module in modules]
        kv = sum(kv_of.get(module, 0) for module in modules)
        ledger.add(device, weights=sum(nbytes))
        if device.is_accelerator or not offloaded:
            ledger.add(device, kv_cache=kv)
        else:  # offloaded: weights wait in host RAM, run (and keep their KV) on the execution device
            ledger.add(strategy.execution_device, kv_cache=kv)
            largest_offloaded = max(largest_offloaded, *(slots.get(module, 0) for module in modules))
        if not device.is_accelerator:
            on_host += sum(nbytes)
    for device in strategy.devices:
        if device.is_accelerator or not offloaded:
            ledger.add(device, activations=act)
    # offloaded modules visit the execution device one at a time, with the next one prefetched
    ledger.add(strategy.execution_device, buffers=2 * largest_offloaded)
    largest = _largest_read(checkpoint)
    ledger.add(
        Device("cpu"), staging=window_staging(strategy.read_ahead, checkpoint.nbytes, on_host, largest)
    )


def _streamed(checkpoint: Checkpoint, workload: Workload, strategy: Streamed, ledger: _Ledger) -> None:
    fmt = WeightFormat.of(strategy)
    sizes = layer_weight_bytes(checkpoint, fmt)
    arena = (strategy.prefetch_depth + 1) * largest_slot_bytes(checkpoint, fmt)
    resident = sum(sizes[: strategy.resident_layers])
    others = non_layer_weight_bytes(checkpoint, fmt)
    device = strategy.compute_device
    kv = kv_cache_bytes(checkpoint, workload, strategy.dtype)
    act = activation_bytes(checkpoint, workload, strategy.dtype)
    ledger.add(device, weights=others + resident, buffers=arena, kv_cache=kv, activations=act)
    host, window, largest = Device("cpu"), strategy.read_ahead, _largest_read(checkpoint)
    if strategy.source == "host":  # streamed layers' copies are kept on the host as read
        copies = sum(sizes[strategy.resident_layers :])
        ledger.add(host, weights=copies)
        kept = copies + (others + resident if not device.is_accelerator else 0)
        ledger.add(host, staging=window_staging(window, checkpoint.nbytes, kept, largest))
    elif device.is_accelerator:  # pinned staging buffers between the files and the device
        ledger.add(host, buffers=arena, staging=window_staging(window, others + resident, 0, largest))
    elif not _same_dtypes(checkpoint, strategy.dtype):  # resident tensors cast as they are read
        ledger.add(host, staging=largest)


_LAYOUTS: dict[type, Callable[[Checkpoint, Workload, Any, _Ledger], None]] = {
    Full: _one_device,
    Quantized: _one_device,
    Sharded: _sharded,
    Streamed: _streamed,
}


def estimate(
    checkpoint: Checkpoint,
    workload: Workload,
    strategy: Strategy,
    *,
    overheads: Overheads | None = None,
    corrections: Corrections | None = None,
) -> Estimate:
    """Peak bytes per device for loading ``checkpoint`` with ``strategy`` and running ``workload``."""
    overheads = overheads or Overheads()
    workload = workload.for_model(checkpoint)
    ledger = _Ledger()
    ledger.add(Device("cpu"), buffers=overheads.load_runtime)  # the host always pays the runtimes
    _LAYOUTS[type(strategy)](checkpoint, workload, strategy, ledger)
    for module, nbytes in checkpoint.computed_buffers:  # they live where their module runs
        ledger.add(_runs_on(strategy, module), buffers=nbytes)
    if isinstance(strategy, Quantized) and (strategy.method == "int8" or strategy.device.is_accelerator):
        ledger.add(Device("cpu"), buffers=overheads.bnb_runtime)
    elif isinstance(strategy, Quantized):
        ledger.add(Device("cpu"), buffers=overheads.cpu_4bit_repack)
    devices = [_finish(device, parts, overheads) for device, parts in sorted(ledger.parts.items())]
    if corrections is not None:
        key = strategy_key(strategy)
        devices = [
            _corrected(d, corrections.factor(checkpoint.fingerprint, key, d.device.kind)) for d in devices
        ]
    notes = checkpoint.notes
    if isinstance(strategy, Quantized) and not strategy.prequantized:
        notes += (_quantized_note(checkpoint, strategy),)
    if checkpoint.components:
        notes += (
            "a diffusers pipeline: every component's weights; its denoising activations are not estimated",
        )
    elif not _has_attention_facts(checkpoint):
        notes += ("no usable config.json: KV cache and activations are not estimated",)
    return Estimate(strategy, tuple(devices), notes)


def _runs_on(strategy: Strategy, module: str) -> Device:
    """The device ``module`` runs on under ``strategy`` (offloaded modules run on the execution device)."""
    if isinstance(strategy, Streamed):
        return strategy.compute_device
    if not isinstance(strategy, Sharded):
        return strategy.device
    for placed, device in strategy.device_map:
        if in_module(module, placed):
            return device if device.is_accelerator or not strategy.offloaded else strategy.execution_device
    return strategy.execution_device


def _quantized_note(checkpoint: Checkpoint, strategy: Quantized) -> str:
    """What the quantized figure assumes, since only the model class knows transformers' choice."""

    def count() -> int:
        found = _tensor_kinds(checkpoint, strategy.skip_modules)
        converted = [is_quantizable(t, strategy.skip_modules) for t in found.examples]
        return sum(converted[kind] for kind in found.kinds)

    quantized = checkpoint.memo(("quantized_count", strategy.skip_modules), count)
    return (
        f"{strategy.method} bytes assume the {quantized} Linear weights of the repeated blocks are "
        "quantized; the load follows transformers' rule (Linears outside the blocks too, "
        "_keep_in_fp32_modules kept) and its report says how many were"
    )


def _has_attention_facts(checkpoint: Checkpoint) -> bool:
    """Whether config.json gave the model's (or any stack's) attention shape."""
    architectures = (checkpoint.architecture, *(s.architecture for s in checkpoint.stacks))
    return any(a.head_dim is not None for a in architectures)


def _finish(device: Device, parts: dict[str, int], overheads: Overheads) -> DeviceEstimate:
    weights, kv, act, buffers = parts["weights"], parts["kv_cache"], parts["activations"], parts["buffers"]
    staging = parts["staging"]
    held = weights + buffers + max(kv + act, staging)
    slack = int(overheads.allocator_slack * held) if device.is_accelerator else 0
    return DeviceEstimate(device, weights, kv, act, buffers, overheads.fixed(device) + slack, staging=staging)


def _corrected(d: DeviceEstimate, factor: float) -> DeviceEstimate:
    return replace(d, correction=round(d.peak * (factor - 1)))
