"""memplan's CPU quantizers give bitsandbytes' own formats, bit for bit."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from memplan.loaders._cpu_quantizers import int8_rowwise, nf4_parameter


# (1100, 700) spans three blocks of rows, the last one short.
@pytest.mark.parametrize("shape", [(64, 64), (300, 517), (3, 7), (128, 1), (1100, 700)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])  # Conv1D weights
def test_int8_rowwise_equals_bitsandbytes(
    shape: tuple[int, int], dtype: torch.dtype, transposed: bool
) -> None:
    import bitsandbytes as bnb

    generator = torch.Generator().manual_seed(sum(shape))
    weight = (torch.randn(shape[::-1] if transposed else shape, generator=generator) * 3).to(dtype)
    weight = weight.T if transposed else weight
    weight[0] = 0  # a row of zeros: a zero scale
    if dtype is torch.float32:
        weight[-1, 0] = 1e6  # beyond fp16: bnb passes through fp16 too
    theirs = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    values, scales = int8_rowwise(weight)
    assert torch.equal(values, theirs.data)
    assert torch.equal(scales.nan_to_num(), theirs.SCB.nan_to_num()) and torch.equal(
        scales.isnan(), theirs.SCB.isnan()
    )


def _same(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    return (
        ours.dtype == theirs.dtype
        and ours.shape == theirs.shape
        and torch.equal(ours.isnan(), theirs.isnan())
        and torch.equal(ours.nan_to_num(), theirs.nan_to_num())
    )


# (700, 517): 361900 values, past one 131072-value block of work and not a whole number of
# 64-value blocks (a short last block); (3, 7): odd, so the last byte is half padding.
@pytest.mark.parametrize("shape", [(64, 64), (700, 517), (3, 7), (1, 1), (512, 2048)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
def test_nf4_equals_bitsandbytes(shape: tuple[int, int], dtype: torch.dtype, double_quant: bool) -> None:
    import bitsandbytes as bnb

    generator = torch.Generator().manual_seed(sum(shape))
    weight = (torch.randn(shape, generator=generator) * 3).to(dtype)
    weight.view(-1)[:64] = 0  # a block of zeros: bnb's 1e-38 floor for its scale
    if weight.numel() > 200:
        weight.view(-1)[130] = float("inf")
        weight.view(-1)[200] = float("nan")
    placeholder = bnb.nn.Params4bit(
        torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False, blocksize=64,
        compress_statistics=double_quant, quant_type="nf4",
    )  # fmt: skip
    theirs = bnb.nn.Params4bit(
        weight.clone(), requires_grad=False, blocksize=64, compress_statistics=double_quant, quant_type="nf4"
    ).to("cpu")
    ours = nf4_parameter(weight, placeholder)
    assert torch.equal(ours.data, theirs.data)
    a: Any = ours.quant_state
    b: Any = theirs.quant_state
    assert _same(a.absmax, b.absmax) and torch.equal(a.code, b.code)
    assert (a.shape, a.dtype, a.blocksize, a.quant_type, a.nested) == (
        b.shape,
        b.dtype,
        b.blocksize,
        b.quant_type,
        b.nested,
    )
    if double_quant:
        assert _same(a.offset, b.offset) and _same(a.state2.absmax, b.state2.absmax)
        assert torch.equal(a.state2.code, b.state2.code) and a.state2.blocksize == b.state2.blocksize
    assert ours.bnb_quantized and not ours.requires_grad


def test_an_nf4_layer_built_from_ours_computes_what_bitsandbytes_layer_computes() -> None:
    import bitsandbytes as bnb

    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 160, generator=generator, dtype=torch.bfloat16)
    layers = []
    for build in ("bnb", "ours"):
        layer = bnb.nn.Linear4bit(
            160, 96, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta"
        )
        if build == "bnb":
            layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4").to("cpu")
        else:
            layer.weight = nf4_parameter(weight, layer.weight)
        layers.append(layer)
    x = torch.randn(4, 160, generator=generator, dtype=torch.bfloat16)
    assert torch.equal(layers[0](x), layers[1](x))


def test_nf4_rounds_like_bitsandbytes_on_bucket_boundaries() -> None:
    """Values that land on a bucket boundary, where multiplying by the scale's reciprocal (bnb's
    full blocks) and dividing by the scale (its short last block) pick different codes."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import get_4bit_type

    code = get_4bit_type("nf4", device="cpu")
    bounds = (code[:-1] + code[1:]) / 2
    scales = torch.rand(200, generator=torch.Generator().manual_seed(0)) * 5 + 0.1
    blocks = torch.cat([scales[:, None], scales[:, None] * bounds[None, :]], dim=1)  # (200, 16)
    values = blocks.reshape(-1)[: 64 * 49 + 48]  # 49 whole blocks and a short one
    by_product = torch.bucketize(blocks[:, 1:] * (1.0 / blocks[:, :1]), bounds)
    by_division = torch.bucketize(blocks[:, 1:] / blocks[:, :1], bounds)
    assert (by_product != by_division).sum() > 100  # the data does hold such values
    weight = values.reshape(1, -1)
    placeholder = bnb.nn.Params4bit(
        torch.empty(weight.shape, device="meta"),
        requires_grad=False,
        compress_statistics=False,
        quant_type="nf4",
    )
    theirs = bnb.nn.Params4bit(
        weight.clone(), requires_grad=False, compress_statistics=False, quant_type="nf4"
    )
    assert torch.equal(nf4_parameter(weight, placeholder).data, theirs.to("cpu").data)


def test_nf4_buckets_agree_with_a_binary_search_around_every_bound_and_cell_edge() -> None:
    """The table lookup can only go wrong next to a bucket bound or a cell edge: every float32
    within 20000 steps of each is checked (all of [-1, 1], 2.1e9 values, matched once offline)."""
    from memplan.loaders._cpu_quantizers import _Buckets, _nf4_code

    code = _nf4_code()
    bounds = (code[:-1] + code[1:]) / 2
    edges = torch.linspace(-1, 1, _Buckets._CELLS + 1)
    centers = torch.cat([bounds, edges, torch.tensor([0.0, -0.0])]).view(torch.int32)
    steps = torch.arange(-20000, 20001, dtype=torch.int32)
    values = (centers[:, None] + steps[None, :]).reshape(-1).view(torch.float32)
    values = values[(values >= -1) & (values <= 1)]
    buckets = _Buckets(bounds, values.numel())
    v = buckets.values.copy_(values)
    assert torch.equal(buckets.of(v, exact_search=False), torch.bucketize(values, bounds, out_int32=True))
