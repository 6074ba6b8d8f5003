"""bitsandbytes' weight formats made on the CPU, bit for bit as bitsandbytes makes them, faster.

bitsandbytes' CPU quantizers run whole-matrix torch expressions: every step writes an fp32 (or
int32) temporary as large as the weight, so they are bound by memory, not arithmetic. These run
the same expressions, in the same precision and order, over a block of values at a time through
small reused buffers that stay in the CPU's cache. Tests compare every output with bitsandbytes'
own, bit for bit; on a GPU memplan leaves quantization to bitsandbytes' kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memplan._bnb import import_bitsandbytes

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["int8_rowwise", "nf4_blockwise", "nf4_parameter"]

_INT8_BLOCK_VALUES = 1 << 18  # 1 MiB of fp32 a block: fits a core's L2 with its fp16 twin


def int8_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' LLM.int8 weight format (int8 rows, one fp32 absmax per row: ``SCB``), bit for
    bit as ``Int8Params`` makes it on the CPU, about 3x faster there: bnb computes in fp16, which
    CPUs emulate, where each value here goes through fp16 once and the arithmetic runs in fp32,
    the type bnb's mixed fp16 x fp32 product is promoted to anyway.

    It runs a block of rows at a time through two small reused buffers, which stay in the CPU's
    cache: whole-matrix fp32 temporaries made it memory-bound (5x slower on a 1B Llama)."""
    import torch

    rows, columns = weight.shape
    quantized = torch.empty((rows, columns), dtype=torch.int8)
    scales = torch.empty(rows, dtype=torch.float32)
    block = max(1, _INT8_BLOCK_VALUES // max(columns, 1))
    as_fp16 = torch.empty((min(block, rows), columns), dtype=torch.float16)
    values = torch.empty((min(block, rows), columns), dtype=torch.float32)
    for start in range(0, rows, block):
        end = min(start + block, rows)
        v = values[: end - start]
        v.copy_(as_fp16[: end - start].copy_(weight[start:end]))
        torch.amax(v.abs(), dim=1, out=scales[start:end])
        v.mul_((127.0 / scales[start:end]).unsqueeze(-1)).round_()
        quantized[start:end].copy_(v)
    return quantized, scales


def _nf4_code() -> torch.Tensor:
    return import_bitsandbytes().functional.get_4bit_type("nf4", device="cpu")  # type: ignore[no-any-return]


_NF4_BLOCK_VALUES = 1 << 17  # 512 KiB of fp32 and as much int32: a core's L2


def nf4_blockwise(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' NF4 format of ``weight`` without double quantization: two 4-bit codes a byte
    (``(n + 1) // 2`` bytes, shape ``(bytes, 1)``) and one fp32 absmax per ``blocksize`` values,
    as its ``quantize_4bit`` CPU kernel makes them (about 4x faster on a 1B Llama here)."""
    import torch

    code = _nf4_code()  # sorted: a value's code is its bucket
    bounds = (code[:-1] + code[1:]) / 2
    flat = weight.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(full // blocksize + (n > full), dtype=torch.float32)
    step = max(1, _NF4_BLOCK_VALUES // blocksize) * blocksize  # whole blocks: pairs never straddle
    buckets = _Buckets(bounds, min(step, full))
    for start in range(0, full, step):
        end = min(start + step, full)
        v = buckets.values[: end - start]
        scale = absmax[start // blocksize : end // blocksize]
        v.copy_(flat[start:end])
        torch.amax(v.view(-1, blocksize).abs(), dim=-1, out=scale)
        v.view(-1, blocksize).mul_(1.0 / scale.clamp(min=1e-38).view(-1, 1)).clamp_(-1, 1)
        c = buckets.of(v, exact_search=not bool(torch.isfinite(scale).all()))
        p = buckets.pairs[: (end - start) // 2]
        packed[start // 2 : end // 2].copy_(torch.add(c[1::2], c[::2], alpha=16, out=p))
    if n > full:
        _nf4_last_block(flat[full:].float(), bounds, absmax, packed[full // 2 :])
    return packed.unsqueeze(1), absmax


class _Buckets:
    """``torch.bucketize(v, bounds)`` for values in [-1, 1], about 3x faster: a binary search
    per value cost 15-25 ns here, most of an nf4 load.

    [-1, 1] is cut into ``_CELLS`` cells, far narrower than the gaps between NF4's bucket bounds
    (0.08 at least), so the values of a cell, and a cell's width to either side, cross at most one
    bound: a value's bucket is its cell's first candidate, plus one when it lies above that
    candidate's upper bound. Two table lookups and a comparison per value, same answer exactly
    (checked once for every float32 in [-1, 1]; the tests check the neighbourhoods of every
    bound and cell edge). Reused buffers of ``size`` values keep the work in cache."""

    _CELLS = 512

    def __init__(self, bounds: torch.Tensor, size: int) -> None:
        import torch

        self.bounds = bounds
        below = torch.linspace(-1, 1, self._CELLS + 1, dtype=torch.float64) - 2 / self._CELLS
        self.candidate = torch.bucketize(below.float(), bounds, out_int32=True)  # bounds under the cell
        upper = torch.cat([bounds, torch.tensor([float("inf")])])  # the last bucket has none
        self.upper = upper[self.candidate.long()]
        self.values = torch.empty(size, dtype=torch.float32)
        self.pairs = torch.empty(size // 2, dtype=torch.int32)
        self._codes = torch.empty(size, dtype=torch.int32)
        self._cells = torch.empty(size, dtype=torch.int32)
        self._limits = torch.empty(size, dtype=torch.float32)

    def of(self, v: torch.Tensor, *, exact_search: bool) -> torch.Tensor:
        """The buckets of ``v`` (a prefix of ``values``); ``exact_search`` where NaN may be among
        them (a block holding inf or NaN), which has no cell."""
        import torch

        codes = self._codes[: v.numel()]
        if exact_search:
            return torch.bucketize(v, self.bounds, out_int32=True, out=codes)
        cells, limits = self._cells[: v.numel()], self._limits[: v.numel()]
        half = self._CELLS / 2
        cells.copy_(torch.mul(v, half, out=limits).add_(half))  # truncation is floor here: v >= -1
        torch.index_select(self.upper, 0, cells, out=limits)
        torch.index_select(self.candidate, 0, cells, out=codes)
        return codes.add_(limits < v)


def _nf4_last_block(
    tail: torch.Tensor, bounds: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor
) -> None:
    """The short last block, with bitsandbytes' own expression for it (a division, not a
    product with the reciprocal) and its zero pad to a whole byte."""
    import torch

    absmax[-1] = tail.abs().max().clamp(min=1e-38)
    scaled = torch.clamp(tail / absmax[-1], -1, 1)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    codes = torch.bucketize(scaled, bounds, out_int32=True)
    out.copy_(codes[1::2] + codes[::2] * 16)


def nf4_parameter(weight: torch.Tensor, placeholder: Any) -> nn.Parameter:
    """The quantized ``Params4bit`` that ``placeholder`` (the layer's meta parameter, which holds
    the layer's options) becomes for ``weight`` on the CPU, with the ``QuantState``
    ``bitsandbytes.functional.quantize_4bit`` builds around its kernel's output."""
    bnb = import_bitsandbytes()
    packed, absmax = nf4_blockwise(weight, placeholder.blocksize)
    if placeholder.quant_storage != packed.dtype:
        packed = packed.squeeze().view(placeholder.quant_storage).unsqueeze(1)
    options = dict(
        shape=weight.shape, dtype=weight.dtype, blocksize=placeholder.blocksize,
        code=_nf4_code(), quant_type="nf4",
    )  # fmt: skip
    if placeholder.compress_statistics:
        offset = absmax.mean()
        nested, state2 = bnb.functional.quantize_blockwise(absmax - offset, blocksize=256)
        state = bnb.functional.QuantState(absmax=nested, offset=offset, state2=state2, **options)
    else:
        state = bnb.functional.QuantState(absmax=absmax, **options)
    return bnb.nn.Params4bit(  # type: ignore[no-any-return]
        packed, requires_grad=False, quant_state=state, blocksize=placeholder.blocksize,
        compress_statistics=placeholder.compress_statistics, quant_type="nf4",
        quant_storage=placeholder.quant_storage, bnb_quantized=True,
    )  # fmt: skip
