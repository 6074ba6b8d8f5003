"""estimate(): each term against the figure it stands for, bnb storage against real bnb layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import memplan
from memplan import Device, Full, MemplanError, Quantized, Streamed, Workload
from memplan.planner import Corrections, Overheads, TensorInfo, quantized_bytes
from memplan.planner.runtime import kv_bytes_per_layer

GiB = 2**30
CUDA0, CPU = Device("cuda", 0), Device("cpu")
NO_OVERHEAD = Overheads(cuda_context=0, mps_runtime=0, host_runtime=0, allocator_slack=0.0)


def linear(rows: int, cols: int) -> TensorInfo:
    return TensorInfo(
        "model.layers.0.mlp.up_proj.weight", "BF16", (rows, cols), Path("x"), 0, rows * cols * 2, 0
    )


def real_int8_bytes(rows: int, cols: int) -> int:
    import bitsandbytes as bnb

    weight = torch.randn(rows, cols, dtype=torch.bfloat16)
    layer = bnb.nn.Linear8bitLt(cols, rows, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")
    return layer.weight.numel() * layer.weight.element_size() + layer.weight.SCB.nbytes


def real_nf4_bytes(rows: int, cols: int, double_quant: bool) -> int:
    import bitsandbytes as bnb

    weight = torch.randn(rows, cols, dtype=torch.bfloat16)
    param = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant, quant_type="nf4")
    param = param.to("cpu")
    qs = param.quant_state
    total = param.nbytes + qs.absmax.nbytes + qs.code.nbytes
    if qs.nested:
        total += qs.state2.absmax.nbytes + qs.state2.code.nbytes + qs.offset.nbytes
    return total


@pytest.mark.parametrize(("rows", "cols"), [(384, 256), (160, 64), (1000, 130)])
def test_int8_bytes_match_bitsandbytes(rows: int, cols: int) -> None:
    assert quantized_bytes(linear(rows, cols), "int8", "BF16", False) == real_int8_bytes(rows, cols)


@pytest.mark.parametrize(("rows", "cols"), [(384, 256), (160, 64), (4096, 512)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_match_bitsandbytes(rows: int, cols: int, double_quant: bool) -> None:
    expected = real_nf4_bytes(rows, cols, double_quant)
    assert quantized_bytes(linear(rows, cols), "nf4", "BF16", double_quant) == expected


def test_full_weights_are_the_checkpoint_bytes_in_the_compute_dtype(tiny_llama: Path) -> None:
    ckpt = memplan.inspect(tiny_llama)
    bf16 = memplan.estimate(ckpt, Workload(context=16), Full(CUDA0, "BF16"), overheads=NO_OVERHEAD)
    fp32 = memplan.estimate(ckpt, Workload(context=16), Full(CUDA0, "fp32"), overheads=NO_OVERHEAD)
    assert bf16.on(CUDA0).weights == ckpt.nbytes
    assert fp32.on(CUDA0).weights == 2 * ckpt.nbytes


def test_quantized_keeps_embeddings_norms_and_head_in_high_precision(tiny_llama: Path) -> None:
    ckpt = memplan.inspect(tiny_llama)
    est = memplan.estimate(
        ckpt, Workload(context=16), Quantized("int8", CUDA0, "BF16"), overheads=NO_OVERHEAD
    )
    kept = sum(t.nbytes for t in ckpt.tensors.values() if t.layer is None or len(t.shape) == 1)
    linears = [t for t in ckpt.tensors.values() if t.layer is not None and len(t.shape) == 2]
    assert est.on(CUDA0).weights == kept + sum(t.numel + t.shape[0] * 4 for t in linears)


def test_kv_cache_formula(hollow_70b: Path) -> None:
    ckpt = memplan.inspect(hollow_70b)
    arch = ckpt.architecture
    per_layer = kv_bytes_per_layer(arch, Workload(batch=2, context=8192), "BF16")
    assert per_layer == 2 * 8 * 128 * 8192 * 2 * 2
    est = memplan.estimate(ckpt, Workload(batch=2, context=8192), Full(CUDA0, "BF16"))
    assert est.on(CUDA0).kv_cache == 80 * per_layer == 5 * GiB
    fp8 = memplan.estimate(ckpt, Workload(batch=2, context=8192, kv_dtype="fp8"), Full(CUDA0, "BF16"))
    assert fp8.on(CUDA0).kv_cache == est.on(CUDA0).kv_cache // 2


def test_activations_are_the_logits_or_one_layer(hollow_70b: Path) -> None:
    ckpt = memplan.inspect(hollow_70b)
    est = memplan.estimate(ckpt, Workload(context=4096), Full(CUDA0, "BF16"))
    assert est.on(CUDA0).activations == 4096 * (128256 + 8192) * 2  # logits dominate at 128k vocab
    chunked = memplan.estimate(ckpt, Workload(context=4096, prefill_chunk=512), Full(CUDA0, "BF16"))
    assert chunked.on(CUDA0).activations == est.on(CUDA0).activations // 8


def test_streamed_from_host_keeps_the_other_layers_in_host_memory(hollow_70b: Path) -> None:
    ckpt = memplan.inspect(hollow_70b)
    layer = ckpt.layers[0].nbytes
    strategy = Streamed(CUDA0, "host", resident_layers=10, prefetch_depth=2, dtype="BF16")
    est = memplan.estimate(ckpt, Workload(context=16), strategy, overheads=NO_OVERHEAD)
    assert est.on(CPU).weights == 70 * layer
    assert est.on(CUDA0).buffers == 3 * layer
    others = sum(t.nbytes for t in ckpt.non_layer_tensors())
    assert est.on(CUDA0).weights == others + 10 * layer


def test_overheads_are_configurable(tiny_llama: Path) -> None:
    ckpt = memplan.inspect(tiny_llama)
    ov = Overheads(cuda_context=123, host_runtime=7, allocator_slack=0.0)
    est = memplan.estimate(ckpt, Workload(context=16), Full(CUDA0, "BF16"), overheads=ov)
    assert (est.on(CUDA0).overhead, est.on(CPU).overhead) == (123, 7)


@pytest.mark.parametrize(
    "kwargs", [{"batch": 0}, {"context": -1}, {"batch": True}, {"prefill_chunk": 0}, {"kv_dtype": "int3"}]
)
def test_workload_rejects_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(MemplanError):
        Workload(**kwargs)  # type: ignore[arg-type]


def test_learned_correction_adjusts_the_next_estimate(tiny_llama: Path, tmp_path: Path) -> None:
    ckpt = memplan.inspect(tiny_llama)
    strategy = Full(CPU, "BF16")
    before = memplan.estimate(ckpt, Workload(context=16), strategy).on(CPU).peak
    corrections = Corrections()
    corrections.record(ckpt.fingerprint, "full", "cpu", estimated=before, measured=int(before * 1.2))
    after = memplan.estimate(ckpt, Workload(context=16), strategy, corrections=corrections).on(CPU)
    assert after.peak == pytest.approx(before * 1.2, rel=1e-6)
    assert after.correction == pytest.approx(before * 0.2, rel=1e-6)
    other = memplan.estimate(
        ckpt, Workload(context=16), Quantized("int8", CPU, "BF16"), corrections=corrections
    )
    assert other.on(CPU).correction == 0  # recorded for full, not for int8

    path = tmp_path / "cache" / "corrections.json"
    corrections.save(path)
    assert Corrections.load(path).entries == corrections.entries
    assert [p.name for p in path.parent.iterdir()] == ["corrections.json"]  # no temp file left


def test_corrections_are_smoothed_and_clamped() -> None:
    c = Corrections()
    assert c.record("m", "full", "cuda", 100, 1000) == 3.0  # one wild reading is clamped
    assert c.record("m", "full", "cuda", 100, 100) == 2.0  # and smoothed towards the next
    assert c.entries[Corrections.key("m", "full", "cuda")].samples == 2


def test_damaged_corrections_file_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "corrections.json"
    path.write_text("{ not json")
    assert Corrections.load(path).entries == {}
    path.write_text(json.dumps({"corrections": {"k": {"ratio": "x"}}}))
    assert Corrections.load(path).entries == {}
    assert "ignoring unreadable corrections file" in caplog.text
    assert Corrections.load(tmp_path / "absent.json").entries == {}


@pytest.mark.parametrize(
    "patterns", [("lm_head",), ("down_proj",), ("mlp.gate",), ("model.layers.1",), ("layers.*.o_proj",)]
)
def test_skip_modules_match_as_transformers_matches_llm_int8_skip_modules(patterns: tuple[str, ...]) -> None:
    """The planner restates transformers' should_convert_module (it cannot import transformers):
    the two agree on every module name."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    from memplan.planner.quantization import is_skipped

    names = [
        "lm_head", "model.layers.1.mlp.down_proj", "model.layers.11.mlp.down_proj", "model.layers.1.mlp.gate",
        "model.layers.1.mlp.gate_proj", "model.layers.0.self_attn.o_proj", "model.embed_tokens",
    ]  # fmt: skip
    assert [is_skipped(n, patterns) for n in names] == [
        not should_convert_module(n, list(patterns)) for n in names
    ]
