"""``model.memplan``: one typed handle on what a load did and holds, and the executor registry."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch

import memplan
from memplan import Allocator, Device, Streamed
from memplan.loaders import ModelHandle, handle_of, remove_hooks
from memplan.loaders.executors import executor_for
from memplan.planner import Strategy
from tests.loaders.test_load import CUDA0, logits, plan_only, tight_spec


def _streamed(path: Path) -> tuple[torch.nn.Module, Allocator]:
    strategy = Streamed(CUDA0, "disk", resident_layers=1, prefetch_depth=1, dtype="BF16")
    chosen = plan_only(path, "streamed-disk", tight_spec(path, strategy), prefetch_depth=1)
    allocator = Allocator(chosen.inventory)
    return memplan.load(path, plan=chosen, progress=False, allocator=allocator), allocator


def test_the_handle_carries_the_report_the_placement_and_the_streamer(
    tiny_llama: Path, want: torch.Tensor
) -> None:
    model, allocator = _streamed(tiny_llama)
    handle = handle_of(model)
    assert isinstance(handle, ModelHandle) and handle is model.memplan
    assert handle.report.strategy.kind == "streamed"
    assert handle.placement.held[CUDA0] == allocator.usage(CUDA0).used > 0
    assert handle.streamer is not None and handle.streamer is handle.hooks.streamer
    assert torch.equal(logits(model), want)
    assert handle.streamer.stats.fetches > 0


def test_the_old_attribute_names_are_aliases_of_the_handle_for_one_release(tiny_llama: Path) -> None:
    model = memplan.load(tiny_llama, progress=False)
    handle = model.memplan
    assert model.memplan_report is handle.report
    assert model.memplan_placement is handle.placement
    assert model.memplan_hooks is handle.hooks
    assert model.memplan_streamer is None


def test_close_gives_the_budget_back_and_takes_the_hooks_off_once(tiny_llama: Path) -> None:
    model, allocator = _streamed(tiny_llama)
    model.memplan.close()
    assert allocator.usage(CUDA0).used == 0
    assert model.memplan.placement.held == {}
    model.memplan.close()  # idempotent
    assert allocator.usage(CUDA0).used == 0
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_remove_hooks_keeps_the_budget_and_a_model_memplan_did_not_load_has_no_handle(
    tiny_llama: Path,
) -> None:
    model, allocator = _streamed(tiny_llama)
    held = allocator.usage(CUDA0).used
    remove_hooks(model)
    assert allocator.usage(CUDA0).used == held
    plain = torch.nn.Linear(2, 2)
    assert handle_of(plain) is None
    remove_hooks(plain)  # nothing to take off: no error


def test_every_strategy_has_exactly_one_executor() -> None:
    kinds = typing.get_args(Strategy)
    found = {type(executor_for(_example(kind))).__name__ for kind in kinds}
    assert len(found) == len(kinds)


def test_a_strategy_no_executor_knows_is_a_typed_error() -> None:
    class Mine:
        pass

    with pytest.raises(memplan.PlanFormatError, match="no executor carries out a Mine"):
        executor_for(Mine())  # type: ignore[arg-type]


def _example(kind: type) -> Strategy:
    cpu = Device("cpu")
    examples: dict[type, Strategy] = {
        memplan.Full: memplan.Full(cpu, "BF16"),
        memplan.Quantized: memplan.Quantized("int8", cpu, "BF16"),
        memplan.Sharded: memplan.Sharded(((".", cpu),), "BF16", cpu),
        memplan.Streamed: Streamed(cpu, "host", 0, 1, "BF16"),
    }
    return examples[kind]
