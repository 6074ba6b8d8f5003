"""The reach sample: architectures that once failed to load equal (tests/compat/reach.py), each
loaded full and streamed from disk at the smallest budget the planner accepts, every output
tensor equal to transformers' ``from_pretrained`` of the same folder, buffers moved off their
init values first."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import memplan
from tests.compat.families import owning_memory, train_buffers
from tests.compat.reach import REACH, Reach
from tests.compat.test_matrix import load


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


def outputs(model: torch.nn.Module, reach: Reach) -> list[torch.Tensor]:
    inputs = reach.inputs(model.config, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    with torch.no_grad():
        return [t.clone() for t in _tensors(model(**inputs))]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[torch.Tensor]]]:
    """Each architecture saved once, with transformers' outputs for it."""
    return {}


def _saved(
    cache: dict[str, tuple[Path, list[torch.Tensor]]], reach: Reach, root: Path
) -> tuple[Path, list[torch.Tensor]]:
    if reach.name not in cache:
        import transformers

        cls = getattr(transformers, reach.model)
        torch.manual_seed(0)
        model = cls(reach.build_config()).eval()
        train_buffers(model)
        path = root / reach.name
        model.save_pretrained(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = owning_memory(cls.from_pretrained(path).eval())
        cache[reach.name] = (path, outputs(theirs, reach))
    return cache[reach.name]


def _equal(mine: list[torch.Tensor], theirs: list[torch.Tensor]) -> bool:
    return len(mine) == len(theirs) and all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(mine, theirs, strict=True)
    )


# Left open, and failing the way users see it: Encodec's quantizer layers run through ``encode``
# and ``decode``, never ``forward``, so no hook brings them in; they stay resident, beyond the
# streamed plan's budget for them.
OPEN = {("encodec", "streamed-disk"): "layers run through methods other than forward stay resident"}


def _cases() -> list[Any]:
    return [
        pytest.param(
            reach, candidate, id=f"{reach.name}-{candidate}",
            marks=[pytest.mark.xfail(strict=True, raises=memplan.DeviceOutOfMemory, reason=OPEN[reach.name, candidate])]
            if (reach.name, candidate) in OPEN else [],
        )
        for reach in REACH
        for candidate in ("full", "streamed-disk")
    ]  # fmt: skip


@pytest.mark.parametrize(("reach", "candidate"), _cases())
def test_reach_outputs_equal_transformers(
    saved: dict[str, tuple[Path, list[torch.Tensor]]], tmp_path_factory: pytest.TempPathFactory,
    reach: Reach, candidate: str,
) -> None:  # fmt: skip
    import transformers

    path, theirs = _saved(saved, reach, tmp_path_factory.mktemp("reach"))
    model = load(path, candidate, model_cls=getattr(transformers, reach.model))
    assert _equal(outputs(model, reach), theirs), reach.cause
    if candidate == "streamed-disk" and memplan.inspect(path).layers:
        assert model.memplan.streamer.stats.fetches > 0
