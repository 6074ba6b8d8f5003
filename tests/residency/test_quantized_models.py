"""Quantized models in the residency manager (issue "Serving many models", item 2): a memplan
int8 or nf4 model registered, demoted to any tier and used again computes what it computed
before it moved, to the bit. bitsandbytes keeps a quantized weight's meaning beside its data
(int8 row scales, a 4-bit weight's quantization state); the manager keeps it with the weight and
builds the bitsandbytes parameter back on the way up."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

import memplan
from memplan import Allocator, Device, InvalidEntry, ResidencyManager, get_tier
from memplan.residency.tiers.base import Tier
from tests.loaders.test_load import logits, plan_only
from tests.loaders.test_quantized_sources import bnb_config

CPU = Device("cpu")
TIERS = ["host", "host-zstd", "disk", "remote"]
# (method, bitsandbytes' CPU path): int8 has one CPU path; a 4-bit layer has two (see conftest).
CASES = [
    ("int8", "generic"),
    ("nf4", "generic"),
    ("nf4", "avx512-bf16"),
    ("nf4-dq", "generic"),
    ("nf4-dq", "avx512-bf16"),
]


def quantized_plan(path: Path, method: str) -> memplan.Plan:
    dq = {"double_quant": method == "nf4-dq"} if method != "int8" else {}
    return plan_only(path, method.removesuffix("-dq"), "cpu=8GiB", allow_quantization=True, **dq)


def below_host(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Tier:
    """The tier under the host tier that the model is demoted to."""
    if kind == "host-zstd":
        return get_tier("host", "1GiB", compression="zstd", name="host-zstd")
    if kind == "disk":
        return get_tier("disk", tmp_path / "spill")
    s3: dict[str, Any] = request.getfixturevalue("s3")  # moto's S3 on loopback
    return get_tier("remote", f"s3://residency/{uuid.uuid4().hex}", storage_options=s3, backoff_s=0.01)


def host_and(tier: str, tmp_path: Path, request: pytest.FixtureRequest) -> list[Tier]:
    """A host tier, and below it the tier ``tier`` names (none for ``"host"`` itself)."""
    return [get_tier("host", "1GiB")] + ([] if tier == "host" else [below_host(tier, tmp_path, request)])


def bnb_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt | bnb.nn.Linear4bit)}


def assert_holds_no_weight(model: torch.nn.Module) -> None:
    """A demoted model keeps nothing of its quantized weights: not the data, not the states
    bitsandbytes keeps on the layer after a forward."""
    import bitsandbytes as bnb

    for layer in bnb_layers(model).values():
        assert layer.weight.is_meta
        if isinstance(layer, bnb.nn.Linear8bitLt):
            assert layer.state.CB is None and layer.state.SCB is None
        else:
            assert layer.quant_state is None and not hasattr(layer, "_memplan_unpacked_state")


def assert_same_bnb_weights(model: torch.nn.Module, classes: dict[str, type]) -> None:
    assert {name: type(layer.weight) for name, layer in bnb_layers(model).items()} == classes


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize(("method", "bnb_cpu_path"), CASES, indirect=["bnb_cpu_path"])
def test_a_quantized_model_demoted_and_used_gives_the_logits_it_gave_before(
    tiny_llama: Path, tmp_path: Path, request: pytest.FixtureRequest, method: str, bnb_cpu_path: str,
    tier: str,
) -> None:  # fmt: skip
    chosen = quantized_plan(tiny_llama, method)
    allocator = Allocator(chosen.inventory)
    start = allocator.usage(CPU).used
    model = memplan.load(tiny_llama, plan=chosen, allocator=allocator, progress=False)
    assert allocator.usage(CPU).used > start
    want = logits(model)  # on an AVX512-BF16 CPU this first forward repacks the 4-bit weights
    classes = {name: type(layer.weight) for name, layer in bnb_layers(model).items()}
    assert len(classes) == 4 * 7  # every Linear of the 4 blocks; lm_head stays in bf16
    with ResidencyManager(host_and(tier, tmp_path, request)) as rm:
        rm.register("llama", model)
        if tier != "host":
            rm.demote("llama", tier)
            assert_holds_no_weight(model)
        with rm.use("llama") as leased:
            assert rm.tier_of("llama").name == "host"
            assert_same_bnb_weights(leased, classes)
            assert torch.equal(logits(leased), want)
        assert rm.verify() == []
    assert allocator.usage(CPU).used == start


@pytest.mark.parametrize("method", ["int8", "nf4", "nf4-dq"])
def test_a_model_moved_twice_after_forwards_on_the_host_saves_what_was_loaded(
    tiny_llama: Path, tmp_path: Path, method: str, bnb_cpu_path: str
) -> None:
    """Used from the host tier (where an AVX512-BF16 CPU repacks it again), demoted again and
    used again: same logits, and its state_dict is still what the load made, bit for bit."""
    model = memplan.load(tiny_llama, plan=quantized_plan(tiny_llama, method), progress=False)
    want = logits(model)
    saved = {name: t.clone() for name, t in model.state_dict().items()}
    with ResidencyManager([get_tier("host", "1GiB"), get_tier("disk", tmp_path / "spill")]) as rm:
        rm.register("llama", model)
        for _ in range(2):
            rm.demote("llama", "disk")
            assert_holds_no_weight(model)
            with rm.use("llama") as leased:
                assert torch.equal(logits(leased), want)
                assert torch.equal(logits(leased), want)  # after the repacking, where the CPU repacks
        with rm.use("llama") as leased:
            now = leased.state_dict()
            assert now.keys() == saved.keys()
            assert all(torch.equal(now[name], saved[name]) for name in saved)


def repack_as_a_first_forward_would(layer: torch.nn.Module) -> None:
    """What ``Linear4bit.forward`` does on an AVX512-BF16 CPU before its kernel runs, in plain
    torch (runs on any CPU): the layer's pre-hooks (memplan's keeps the state), then the repacking."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    for hook in layer._forward_pre_hooks.values():
        hook(layer, ())
    layer.weight.data, _ = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)


@pytest.mark.parametrize("method", ["nf4", "nf4-dq"])
def test_repacked_4bit_weights_come_back_as_they_were_before_the_repacking(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """On any CPU: the layers are built as on an AVX512-BF16 one and repacked by bitsandbytes'
    own (plain torch) repacking, as their first forward would; the manager keeps the state from
    before the repacking, and the layers come back unpacked, to be repacked by their next forward."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    model = memplan.load(tiny_llama, plan=quantized_plan(tiny_llama, method), progress=False)
    layers = list(bnb_layers(model).values())
    repackable = [layer for layer in layers if layer.support_avx512bf16_for_cpu]
    assert repackable
    saved = {name: t.clone() for name, t in model.state_dict().items()}
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False  # the reference runs the generic kernel
    want = logits(model)
    for layer in repackable:
        repack_as_a_first_forward_would(layer)
        assert layer.weight.quant_state.packing_format_for_cpu
    with ResidencyManager([get_tier("host", "1GiB"), get_tier("disk", tmp_path / "spill")]) as rm:
        rm.register("llama", model)
        rm.demote("llama", "disk")
        with rm.use("llama") as leased:
            assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
            now = leased.state_dict()
            assert all(torch.equal(now[name], saved[name]) for name in saved)
            assert torch.equal(logits(leased), want)


@pytest.fixture(scope="module", params=["int8", "nf4", "nf4-dq"])
def prequantized(
    request: pytest.FixtureRequest, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A checkpoint transformers+bitsandbytes quantized and saved (as in test_quantized_sources)."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("prequantized") / request.param
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama, quantization_config=bnb_config(request.param), dtype=torch.bfloat16
    )
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("tier", TIERS)
def test_a_prequantized_checkpoint_loaded_and_moved_gives_the_same_logits(
    prequantized: Path, tmp_path: Path, bnb_cpu_path: str, request: pytest.FixtureRequest, tier: str
) -> None:
    allocator = Allocator(memplan.probe("cpu=8GiB"))
    start = allocator.usage(CPU).used
    model = memplan.load(prequantized, allocator=allocator, progress=False)
    assert model.memplan.report.strategy.prequantized  # type: ignore[union-attr]
    want = logits(model)
    with ResidencyManager(host_and(tier, tmp_path, request)) as rm:
        rm.register("llama", model)
        if tier != "host":
            rm.demote("llama", tier)
            assert_holds_no_weight(model)
        with rm.use("llama") as leased:
            assert torch.equal(logits(leased), want)
        assert rm.verify() == []
    assert allocator.usage(CPU).used == start


@pytest.mark.parametrize("method", ["int8", "nf4-dq"])
def test_a_model_built_from_the_quantized_weights_cache_moves_too(
    tiny_llama: Path, tmp_path: Path, method: str
) -> None:
    chosen = quantized_plan(tiny_llama, method)
    first = memplan.load(tiny_llama, plan=chosen, progress=False)  # quantizes and fills the cache
    model = memplan.load(tiny_llama, plan=chosen, progress=False)
    assert model.memplan.report.bytes_read < first.memplan.report.bytes_read  # built from the cache
    want = logits(first)
    assert torch.equal(logits(model), want)
    with ResidencyManager([get_tier("host", "1GiB"), get_tier("disk", tmp_path / "spill")]) as rm:
        rm.register("llama", model)
        rm.demote("llama", "disk")
        with rm.use("llama") as leased:
            assert torch.equal(logits(leased), want)


def bnb_block(double_quant: bool) -> torch.nn.Sequential:
    """Real bitsandbytes layers quantized by bitsandbytes itself (``.to`` a device), not memplan."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    block = torch.nn.Sequential(
        bnb.nn.Linear8bitLt(64, 128, has_fp16_weights=False),
        bnb.nn.Linear4bit(128, 64, compute_dtype=torch.bfloat16, compress_statistics=double_quant, quant_type="nf4"),
    )  # fmt: skip
    return block.to(torch.bfloat16).to("cpu")


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_layers_not_loaded_by_memplan_move_exactly(
    tmp_path: Path, double_quant: bool, bnb_cpu_path: str
) -> None:
    """Registered before their first forward, which repacks on an AVX512-BF16 CPU: the tiers
    keep the layers as bitsandbytes made them."""
    block, x = bnb_block(double_quant), torch.randn(3, 64, dtype=torch.bfloat16)
    want_block = copy.deepcopy(block)
    with torch.no_grad():
        want = want_block(x)
    with ResidencyManager([get_tier("host", "1GiB"), get_tier("disk", tmp_path / "spill")]) as rm:
        rm.register("block", block)
        for _ in range(2):
            rm.demote("block", "disk")
            with rm.use("block") as leased, torch.no_grad():
                assert torch.equal(leased(x), want)


def test_a_4bit_layer_bitsandbytes_repacked_without_its_state_kept_is_refused_and_left_alone() -> None:
    """bitsandbytes' own unpacking of a repacked layer is lossy (its scales are bfloat16 now):
    such a layer cannot be moved exactly, and registering it says so instead of changing it."""
    block = bnb_block(double_quant=True)
    layer = block[1]
    repack_as_a_first_forward_would(layer)
    weight, data, state = layer.weight, layer.weight.data.clone(), copy.copy(layer.weight.quant_state)
    rm = ResidencyManager([get_tier("host", "1GiB")])
    with pytest.raises(InvalidEntry) as caught:
        rm.register("block", block)
    assert "'1.weight'" in str(caught.value) and "repacked" in str(caught.value)
    assert layer.weight is weight and torch.equal(weight.data, data)
    assert weight.quant_state.packing_format_for_cpu and weight.quant_state.absmax is state.absmax
    assert "block" not in rm and rm.tiers[0].used == 0


@pytest.mark.parametrize("method", ["int8", "nf4-dq"])
def test_a_quantized_model_whose_registration_fails_keeps_its_own_weights(
    tiny_llama: Path, method: str, bnb_cpu_path: str
) -> None:
    model = memplan.load(tiny_llama, plan=quantized_plan(tiny_llama, method), progress=False)
    want = logits(model)
    weights = {name: layer.weight for name, layer in bnb_layers(model).items()}
    rm = ResidencyManager([get_tier("host", 4096)])  # no room for it
    with pytest.raises(memplan.TierFull):
        rm.register("llama", model)
    assert all(layer.weight is weights[name] for name, layer in bnb_layers(model).items())
    assert torch.equal(logits(model), want)
