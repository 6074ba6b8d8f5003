"""The compatibility matrix: every family loads as transformers loads it, full, streamed from
disk, and quantized to int8.

Each family is a tiny random-init model saved with save_pretrained; memplan's output must equal
transformers' ``from_pretrained`` of the same folder bit for bit (int8: with the same
BitsAndBytesConfig, the same layers converted), and generative models must generate the same tokens.
The README's supported-models table is rendered from this matrix (tests/compat/table.py).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import memplan
from memplan import Device, Policy, Streamed, Workload
from memplan.planner import Overheads
from tests.compat.families import (
    FAMILIES,
    UNSUPPORTED,
    Family,
    covers,
    inputs_for,
    owning_memory,
    save_family,
)

CPU_ONLY = "cpu=8GiB"
EXACT = Overheads(cuda_context=0, allocator_slack=0.0)
WORKLOAD = Workload(context=32)


def _params(column: str) -> list[Any]:
    """Every family the column covers; one that cannot pass (``UNSUPPORTED``) is an
    ``xfail(strict=True)`` that must fail with the error users get, never dropped."""
    return [pytest.param(f, id=f.name, marks=_unsupported(f, column)) for f in FAMILIES if covers(f, column)]


def _unsupported(family: Family, column: str) -> list[pytest.MarkDecorator]:
    if (family.name, column) not in UNSUPPORTED:
        return []
    error, message = UNSUPPORTED[family.name, column]
    return [pytest.mark.xfail(strict=True, raises=error, reason=message)]


class Saved:
    """The folders and transformers' results, made once per session and per family."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._paths: dict[str, Path] = {}
        self._references: dict[tuple[str, str], Any] = {}

    def path(self, family: Family) -> Path:
        if family.name not in self._paths:
            self._paths[family.name] = save_family(family, self.root / family.name)
        return self._paths[family.name]

    def reference(self, family: Family, quantized: str = "") -> torch.nn.Module:
        """transformers' model; ``quantized="int8"``: with bitsandbytes, on the CPU."""
        if (family.name, quantized) not in self._references:
            import transformers

            kwargs: dict[str, Any] = {}
            if quantized:
                kwargs = {"quantization_config": transformers.BitsAndBytesConfig(load_in_8bit=True)}
                kwargs["device_map"] = "cpu"
            model = getattr(transformers, family.model).from_pretrained(self.path(family), **kwargs).eval()
            self._references[family.name, quantized] = owning_memory(model)
        return self._references[family.name, quantized]  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return Saved(tmp_path_factory.mktemp("families"))


def streaming_spec(path: Path, model_cls: Any = None) -> str:
    """A simulated accelerator with room for one resident layer and one in flight, so the plan
    streams every other layer from disk (a tiny model would otherwise fit whole). The buffers the
    model computes are counted, as a load counts them."""
    one = Streamed(Device("cuda", 0), "disk", resident_layers=1, prefetch_depth=1, dtype="F32")
    checkpoint = memplan.with_computed_buffers(memplan.inspect(path), model_cls)
    peak = memplan.estimate(checkpoint, WORKLOAD, one, overheads=EXACT).on(Device("cuda", 0)).peak
    return f"cuda:0={math.ceil(peak / 0.9) + 1024},{CPU_ONLY}"


def load(path: Path, candidate: str, spec: str | None = None, model_cls: Any = None) -> torch.nn.Module:
    spec = spec or (streaming_spec(path, model_cls) if candidate == "streamed-disk" else CPU_ONLY)
    plan = memplan.plan(
        memplan.with_computed_buffers(memplan.inspect(path), model_cls), memplan.probe(spec), WORKLOAD,
        Policy(order=(candidate,), overheads=EXACT, prefetch_depth=1, allow_quantization=True),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied heads saved once: warned about, not what is tested here
        return memplan.load(path, plan=plan, progress=False, model_cls=model_cls)


def output(model: torch.nn.Module, family: Family) -> torch.Tensor:
    """The tensor a user reads: logits for heads, the last hidden state for bare encoders."""
    with torch.no_grad():
        result = model(**inputs_for(family, model.config))
    for field in ("logits_per_image", "logits", "last_hidden_state"):
        if getattr(result, field, None) is not None:
            return getattr(result, field)  # type: ignore[no-any-return]
    raise AssertionError(f"{family.name}: no output to compare in {type(result).__name__}")


def generated(model: torch.nn.Module, family: Family) -> torch.Tensor:
    inputs = inputs_for(family, model.config)
    inputs.pop("decoder_input_ids", None)
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, do_sample=False)  # type: ignore[no-any-return]


@pytest.mark.parametrize("family", _params("full"))
def test_full_outputs_equal_transformers(saved: Saved, family: Family) -> None:
    model = load(saved.path(family), "full")
    assert torch.equal(output(model, family), output(saved.reference(family), family))


@pytest.mark.parametrize("family", _params("streamed-disk"))
def test_streamed_disk_outputs_equal_transformers(saved: Saved, family: Family) -> None:
    model = load(saved.path(family), "streamed-disk")
    assert torch.equal(output(model, family), output(saved.reference(family), family))
    # the layers the planner named were found and really streamed
    assert model.memplan.streamer.stats.fetches > 0
    assert "disk" in model.hf_device_map.values()


def _int8_layers(model: torch.nn.Module) -> list[str]:
    import bitsandbytes as bnb

    return [name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]


@pytest.mark.parametrize("family", _params("int8"))
def test_int8_outputs_equal_transformers_bitsandbytes(saved: Saved, family: Family) -> None:
    model = load(saved.path(family), "int8")
    theirs = saved.reference(family, "int8")
    converted = _int8_layers(model)
    assert converted == _int8_layers(theirs)
    assert model.memplan.report.notes[-1].startswith(f"int8: {len(converted)} of ")
    assert torch.equal(output(model, family), output(theirs, family))


@pytest.mark.parametrize("family", _params("generate"))
def test_generate_gives_transformers_tokens(saved: Saved, family: Family) -> None:
    model = load(saved.path(family), "full")
    assert torch.equal(generated(model, family), generated(saved.reference(family), family))


def test_an_offloaded_vlm_streams_its_towers_parts_once(saved: Saved) -> None:
    """The plan's map names a module and its children (``vision_tower.embeddings`` and its
    ``patch_embedding``): the outer one streams, bringing its children with it."""
    family = next(f for f in FAMILIES if f.name == "llava")
    path = saved.path(family)
    model = load(path, "offloaded", f"cuda:0={memplan.inspect(path).nbytes // 2},{CPU_ONLY}")
    assert torch.equal(output(model, family), output(saved.reference(family), family))
    assert model.hf_device_map["model.vision_tower.embeddings"] == "cpu"


def fitting_spec(path: Path, candidate: str, devices: int, wanted: Callable[[Any], bool]) -> str:
    """The first simulated inventory (``devices`` accelerators, each a fraction of the model) on
    which ``candidate`` plans the way the test needs."""
    nbytes = memplan.inspect(path).nbytes
    for tenths in range(2, 40):
        each = nbytes * tenths // 10
        spec = ",".join([f"cuda:{i}={each}" for i in range(devices)] + [CPU_ONLY])
        policy = Policy(order=(candidate,), overheads=EXACT, prefetch_depth=1)
        try:
            chosen = memplan.plan(memplan.inspect(path), memplan.probe(spec), WORKLOAD, policy)
        except memplan.DoesNotFit:
            continue
        if wanted(chosen.strategy):
            return spec
    raise AssertionError(f"no inventory plans {candidate} for {path.name}")


@pytest.mark.parametrize("name", ["bart", "gemma2"])
def test_an_offloaded_model_with_tied_weights_runs_like_transformers(saved: Saved, name: str) -> None:
    """A weight shared by several modules (BART's ``shared`` embeddings, Gemma's tied head) stays
    with the model on the execution device: only its first owner would bring it in."""
    family = next(f for f in FAMILIES if f.name == name)
    path = saved.path(family)
    spec = fitting_spec(path, "offloaded", 1, lambda s: s.offloaded)
    model = load(path, "offloaded", spec)
    assert torch.equal(output(model, family), output(saved.reference(family), family))


def test_a_sharded_encoder_decoder_generates_like_transformers(saved: Saved) -> None:
    """The encoder's output (a ModelOutput) crosses devices between the stacks and keeps its type."""
    family = next(f for f in FAMILIES if f.name == "bart")
    path = saved.path(family)
    spec = fitting_spec(path, "sharded", 2, lambda s: len({d for _, d in s.device_map}) == 2)
    model = load(path, "sharded", spec)
    assert torch.equal(generated(model, family), generated(saved.reference(family), family))
