"""memplan's CPU int8 quantizer gives bitsandbytes' own format, bit for bit."""

from __future__ import annotations

import pytest
import torch

from memplan.loaders._quantize import int8_rowwise


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
