"""What a model will run (:class:`Workload`) and what a loaded model costs beyond its tensors
(:class:`Overheads`): the two settings an estimate takes besides the checkpoint and strategy."""

from __future__ import annotations

from dataclasses import dataclass, replace

from memplan._dtypes import dtype_name
from memplan.errors import ContextTooLong, InvalidOption
from memplan.gpu.device import Device
from memplan.planner.model import Checkpoint

__all__ = ["DEFAULT_CONTEXT", "MiB", "Overheads", "Workload"]

MiB = 2**20
DEFAULT_CONTEXT = 4096  # tokens per sequence, where the model takes that many


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
                raise InvalidOption(f"workload {label}", value, "be a positive integer")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise InvalidOption("prefill_chunk", self.prefill_chunk, "be positive")
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
