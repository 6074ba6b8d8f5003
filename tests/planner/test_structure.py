"""A strategy or a candidate is added in one place: each strategy class answers for itself, its
layout is registered by type, each candidate's builder by name; no isinstance ladder over them."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest

import memplan
from memplan import Device, Full, InvalidOption, PlanFormatError, Quantized, Sharded, Streamed
from memplan.planner import CANDIDATES, Strategy, describe, strategy_key
from memplan.planner.candidates import BUILDERS
from memplan.planner.layouts import _LAYOUTS

CPU, CUDA0, CUDA1 = Device("cpu"), Device("cuda", 0), Device("cuda", 1)
PLANNER = Path(memplan.__file__).parent / "planner"
STRATEGY_NAMES = {cls.__name__ for cls in typing.get_args(Strategy)}

EXAMPLES: list[Strategy] = [
    Full(CUDA0, "BF16"),
    Quantized("nf4", CUDA0, "BF16", prequantized=True),
    Sharded((("model.embed", CUDA0), ("model.layers.0", CUDA1), ("lm_head", CPU)), "BF16", CUDA0),
    Streamed(CUDA0, "disk", 1, 2, "BF16"),
]


def test_every_candidate_has_a_builder_and_every_strategy_a_layout() -> None:
    assert set(BUILDERS) == set(CANDIDATES)
    assert set(_LAYOUTS) == set(typing.get_args(Strategy))


@pytest.mark.parametrize(
    ("strategy", "line", "key", "lm_head_on"),
    [
        (EXAMPLES[0], "full on cuda:0 (BF16)", "full", CUDA0),
        (EXAMPLES[1], "pre-quantized nf4 on cuda:0 (compute BF16, double quant)", "nf4", CUDA0),
        (
            EXAMPLES[2],
            "offloaded over cuda:0 (1 modules), cuda:1 (1 modules), cpu (1 modules)",
            "sharded",
            CUDA0,
        ),
        (
            EXAMPLES[3],
            "streamed from disk through cuda:0: 1 layers resident, prefetch depth 2",
            "streamed",
            CUDA0,
        ),
    ],
)
def test_a_strategy_describes_itself_keys_its_corrections_and_places_modules(
    strategy: Strategy, line: str, key: str, lm_head_on: Device
) -> None:
    assert describe(strategy) == strategy.describe() == line
    assert strategy_key(strategy) == strategy.correction_key == key
    assert strategy.runs_on("lm_head") == lm_head_on  # offloaded: runs on the execution device


def test_a_sharded_module_runs_where_the_map_puts_it() -> None:
    sharded = EXAMPLES[2]
    assert isinstance(sharded, Sharded)
    assert sharded.runs_on("model.layers.0.mlp") == CUDA1 and sharded.runs_on("model.norm") == CUDA0


def _strategy_classes(node: ast.Call) -> set[str]:
    """The strategy classes an ``isinstance(x, ...)`` call tests against."""
    if not (isinstance(node.func, ast.Name) and node.func.id == "isinstance" and len(node.args) == 2):
        return set()
    kinds = node.args[1]
    names = kinds.elts if isinstance(kinds, ast.Tuple) else [kinds]
    return {n.id for n in names if isinstance(n, ast.Name)} & STRATEGY_NAMES


def test_no_function_of_the_planner_dispatches_over_strategy_types() -> None:
    """An isinstance check for one type's own field is fine; two types tested in one function is a ladder."""
    ladders = []
    for path in sorted(PLANNER.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            tested = set().union(
                *(_strategy_classes(n) for n in ast.walk(function) if isinstance(n, ast.Call))
            )
            if len(tested) > 1:
                ladders.append(f"{path.name}:{function.name} tests {sorted(tested)}")
    assert not ladders


def test_the_int8_threshold_has_one_home() -> None:
    from memplan.loaders import _quantize
    from memplan.planner.quantization import PreQuantized

    assert _quantize.INT8_THRESHOLD is memplan.planner.INT8_THRESHOLD == PreQuantized("int8").threshold


@pytest.mark.parametrize(
    ("build", "option"),
    [
        (lambda: memplan.Policy(order=("full", "bogus")), "policy order"),
        (lambda: memplan.Policy(headroom=1.0), "headroom"),
        (lambda: memplan.Policy(prefetch_depth=0), "prefetch_depth"),
        (lambda: memplan.Policy(dtype="fp8"), "compute dtype"),
        (lambda: memplan.Workload(batch=0), "workload batch"),
        (lambda: memplan.Workload(prefill_chunk=0), "prefill_chunk"),
        (lambda: memplan.Workload(kv_dtype="int3"), "dtype"),
    ],
)
def test_a_setting_out_of_range_is_an_invalid_option_naming_it(
    build: typing.Callable[[], object], option: str
) -> None:
    with pytest.raises(InvalidOption) as info:
        build()
    assert info.value.option == option


def test_a_plan_always_has_its_choice(tmp_path: Path) -> None:
    from memplan.testing import LLAMA_SHAPES, write_llama_checkpoint

    checkpoint = memplan.inspect(write_llama_checkpoint(tmp_path / "m", LLAMA_SHAPES["tiny"]))
    chosen = memplan.plan(checkpoint, memplan.probe("cpu=8GiB"), memplan.Workload(context=16))
    assert chosen.strategy == chosen.chosen.strategy and chosen.estimate == chosen.chosen.estimate
    applies_not = next(i for i, d in enumerate(chosen.decisions) if d.strategy is None)
    with pytest.raises(PlanFormatError, match="no strategy"):
        dataclasses.replace(chosen, chosen_index=applies_not)
    with pytest.raises(PlanFormatError, match="not one of its"):
        dataclasses.replace(chosen, chosen_index=len(chosen.decisions))
