"""Persistent buffers come from the checkpoint, as from_pretrained takes them (trust issue 20.0).

Random-init models hide a load that keeps ``__init__``'s buffers: their buffers equal their init.
These models are saved with their buffers moved off it (:func:`train_buffers`), so a load that
drops the file's values gives other outputs than transformers, under every strategy."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import memplan
from memplan import Device, DoesNotFit, Policy, Streamed
from tests.compat.families import FAMILIES, Family, inputs_for, owning_memory, save_family, train_buffers
from tests.loaders.test_load import EXACT, WORKLOAD

CPU_ONLY = "cpu=8GiB"
CUDA0 = Device("cuda", 0)


def _has_persistent_buffers(family: Family) -> bool:
    import transformers

    model = getattr(transformers, family.model)(family.build_config())
    return bool(train_buffers(model))


WITH_BUFFERS = [f for f in FAMILIES if f.name in {"bart", "deepseek_v3"}]
# BatchNorm's running statistics (and the frozen BatchNorm of the DETR family) are buffers too.
RESNET = Family(
    "resnet", "ResNetConfig", "ResNetModel", "vision",
    {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"},
)  # fmt: skip


def test_the_matrix_families_with_persistent_buffers_are_the_ones_tested() -> None:
    assert [f.name for f in FAMILIES if _has_persistent_buffers(f)] == [f.name for f in WITH_BUFFERS]


def _inputs(family: Family, config: Any) -> dict[str, torch.Tensor]:
    if family is RESNET:
        return {"pixel_values": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))}
    return inputs_for(family, config)


def _output(model: torch.nn.Module, family: Family) -> torch.Tensor:
    with torch.no_grad():
        result = model(**_inputs(family, model.config))
    for field in ("logits", "last_hidden_state"):
        if getattr(result, field, None) is not None:
            return getattr(result, field)  # type: ignore[no-any-return]
    raise AssertionError(type(result).__name__)


def _plan(path: Path, candidate: str) -> memplan.Plan:
    checkpoint = memplan.inspect(path)
    policy = Policy(order=(candidate,), overheads=EXACT, prefetch_depth=1, allow_quantization=True)
    spec = CPU_ONLY
    if candidate == "offloaded":  # an accelerator smaller than the model: the host holds the rest
        gpu = checkpoint.nbytes // 2
        for _ in range(4):
            try:
                return memplan.plan(checkpoint, memplan.probe(f"cuda:0={gpu},{CPU_ONLY}"), WORKLOAD, policy)
            except DoesNotFit as short:
                gpu = int(short.needed / 0.9) + 1024
    elif candidate.startswith("streamed"):
        one = Streamed(CUDA0, "disk", resident_layers=1, prefetch_depth=1, dtype="F32")
        peak = memplan.estimate(checkpoint, WORKLOAD, one, overheads=EXACT).on(CUDA0).peak
        spec = f"cuda:0={int(peak / 0.9) + 1024},{CPU_ONLY}"
    return memplan.plan(checkpoint, memplan.probe(spec), WORKLOAD, policy)


def _load(path: Path, candidate: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return memplan.load(path, plan=_plan(path, candidate), progress=False, quant_cache=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("buffers")
    return {f.name: save_family(f, root / f.name) for f in [*WITH_BUFFERS, RESNET]}


CASES = [(f, c) for f in WITH_BUFFERS for c in ("full", "streamed-disk", "streamed-host", "offloaded")] + [
    (RESNET, "full")
]


@pytest.mark.parametrize(("family", "candidate"), CASES, ids=lambda v: getattr(v, "name", v))
def test_trained_buffers_give_transformers_outputs(
    folders: dict[str, Path], family: Family, candidate: str
) -> None:
    import transformers

    path = folders[family.name]
    want = owning_memory(getattr(transformers, family.model).from_pretrained(path).eval())
    model = _load(path, candidate)
    assert torch.equal(_output(model, family), _output(want, family))
    if candidate != "full":  # some layers really came from elsewhere
        assert {"cpu", "disk"} & set(model.hf_device_map.values())


@pytest.mark.parametrize("family", [*WITH_BUFFERS, RESNET], ids=lambda f: f.name)
def test_each_persistent_buffer_holds_the_files_value(folders: dict[str, Path], family: Family) -> None:
    path = folders[family.name]
    stored = load_file(path / "model.safetensors")
    model = _load(path, "full")
    buffers = dict(model.named_buffers())
    checked = [name for name in stored if name in buffers]
    assert checked  # the family really has buffers in its file
    for name in checked:
        assert torch.equal(buffers[name], stored[name].to(buffers[name].dtype)), name


def test_int8_load_takes_the_buffers_too(folders: dict[str, Path]) -> None:
    path = folders["bart"]
    model = _load(path, "int8")
    stored = load_file(path / "model.safetensors")["final_logits_bias"]
    assert torch.equal(model.final_logits_bias, stored.to(model.final_logits_bias.dtype))
