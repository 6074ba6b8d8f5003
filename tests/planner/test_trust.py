"""Issue 12, planner side: inputs that looked valid and crashed, hung or planned nonsense."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memplan
from memplan import CheckpointError, Corrections, Device, Plan, PlanFormatError, Policy, Workload
from memplan.testing import LlamaShape
from memplan.testing.checkpoints import write_safetensors_header

CPU = Device("cpu")
TWO_GPUS = "cuda:0=1GiB,cuda:1=1GiB,cpu=4GiB"


def small_config(layers: int) -> dict[str, Any]:
    return LlamaShape(8, layers, 2, 1, 16, 32).config()


def write_checkpoint(path: Path, layers: Iterable[int], config: dict[str, Any] | None) -> Path:
    """One shard with embeddings, one tensor per decoder layer numbered ``layers``, and a head."""
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (32, 8))]
    tensors += [(f"model.layers.{i}.mlp.weight", (8, 8)) for i in layers]
    tensors += [("model.norm.weight", (8,)), ("lm_head.weight", (32, 8))]
    path.mkdir()
    write_safetensors_header(path / "model.safetensors", tensors, "BF16")
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def small(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "small", range(2), small_config(2))


def plan_on(path: Path, spec: str = TWO_GPUS, **kwargs: Any) -> Plan:
    return memplan.plan(memplan.inspect(path), memplan.probe(spec), Workload(context=16), **kwargs)


# --- 1. planning is linear in the layer count ----------------------------------------------


def test_planning_100k_layers_takes_under_a_second(tmp_path: Path) -> None:
    """Linear, checked as a ratio (robust to a loaded machine): ten times the layers may cost at
    most about ten times the planning, where each quadratic pass cost a hundred times (> 5 min at
    100k). In isolation 100k layers plan in about 0.6 s; the absolute bound here is loose."""
    seconds = {}
    for layers in (10_000, 100_000):
        path = write_checkpoint(tmp_path / f"deep{layers}", range(layers), small_config(layers))
        start = time.process_time()
        checkpoint = memplan.inspect(path)
        if layers == 100_000:
            assert time.process_time() - start < 10.0  # about 2.5 s: 100k header entries validated
        # CPU time, best of three on fresh copies (replace() drops the memo), the collector off:
        # only the planner's own work counts, not what the rest of the test session left behind.
        seconds[layers] = min(_plan_seconds(dataclasses.replace(checkpoint), layers) for _ in range(3))
    assert seconds[100_000] < 2.0
    assert seconds[100_000] / seconds[10_000] < 25


def _plan_seconds(checkpoint: memplan.Checkpoint, layers: int) -> float:
    inventory, policy = memplan.probe(TWO_GPUS), Policy(allow_quantization=True)
    gc.collect()
    gc.disable()
    try:
        start = time.process_time()
        result = memplan.plan(checkpoint, inventory, Workload(context=16), policy)
        seconds = time.process_time() - start
    finally:
        gc.enable()
    assert result.num_layers == layers and len(result.decisions) == len(memplan.planner.CANDIDATES)
    return seconds


# --- 2. a gap in the layer numbers ---------------------------------------------------------


def test_layers_numbered_with_a_gap_keep_their_numbers(tmp_path: Path) -> None:
    """Whether a gap is a hole is the model's to say (a parameter-free module may sit there): the
    load refuses a model whose parameters the checkpoint lacks (tests/loaders/test_trust.py)."""
    path = write_checkpoint(tmp_path / "gap", [0, 2], small_config(3))
    checkpoint = memplan.inspect(path)
    assert [(layer.index, layer.prefix) for layer in checkpoint.layers] == [
        (0, "model.layers.0"),
        (2, "model.layers.2"),
    ]
    assert checkpoint.tensors["model.layers.2.mlp.weight"].layer == 1
    plan_on(path)


# --- 3. config.json numbers are validated like header numbers ------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_attention_heads", -4),
        ("num_key_value_heads", -4),
        ("hidden_size", 0),
        ("num_hidden_layers", -1),
        ("head_dim", 0),
        ("intermediate_size", 10**12),
        ("vocab_size", 32.5),
        ("num_attention_heads", "4"),
        ("hidden_size", True),
        ("num_local_experts", -2),
        ("num_attention_heads", [2, -4]),  # given per stage, each stage is checked
        ("num_hidden_layers", {"vision": 1, "text": "2"}),
    ],
)
def test_config_numbers_out_of_range_are_a_checkpoint_error_naming_the_field(
    tmp_path: Path, field: str, value: object
) -> None:
    path = write_checkpoint(tmp_path / "bad-config", range(2), {**small_config(2), field: value})
    with pytest.raises(CheckpointError, match=field) as info:
        plan_on(path)
    assert Path(info.value.file).name == "config.json"


@pytest.mark.parametrize(
    ("field", "value", "read"),
    [
        ("num_attention_heads", [1, 2, 4], ("num_heads", 4)),  # CvT, FocalNet: the widest stage
        ("intermediate_size", [16, 64, 32], ("intermediate_size", 64)),
        ("num_hidden_layers", [1, 1, 2], ("num_layers", 4)),  # stages' layers add up
        ("num_hidden_layers", {"vision": 1, "cross_encoder": 2, "language": 1}, ("num_layers", 4)),  # Lxmert
    ],
)
def test_config_numbers_given_per_stage_are_read_as_one(
    tmp_path: Path, field: str, value: object, read: tuple[str, int]
) -> None:
    path = write_checkpoint(tmp_path / "stages", range(2), {**small_config(2), field: value})
    assert getattr(memplan.inspect(path).architecture, read[0]) == read[1]


def test_config_nulls_mean_not_given(tmp_path: Path) -> None:
    config = {**small_config(2), "head_dim": None, "num_key_value_heads": None}
    arch = memplan.inspect(write_checkpoint(tmp_path / "nulls", range(2), config)).architecture
    assert (arch.head_dim, arch.num_kv_heads) == (4, 2)  # derived from hidden size and heads


def test_architectures_that_are_not_a_list_of_names_are_a_checkpoint_error(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "arch", range(2), {**small_config(2), "architectures": 5})
    with pytest.raises(CheckpointError, match="architectures"):
        memplan.inspect(path)


# --- 4. a corrupt corrections file ---------------------------------------------------------

CORRECTIONS_LOG = "memplan.planner.corrections"
BAD_ENTRIES: list[object] = [
    {"ratio": math.nan, "samples": 1},
    {"ratio": math.inf, "samples": 1},
    {"ratio": -5, "samples": 1},
    {"ratio": 100.0, "samples": 1},
    {"ratio": "2", "samples": 1},
    {"ratio": True, "samples": 1},
    {"ratio": 1.5},
    {"ratio": 1.5, "samples": 0},
    {"ratio": 1.5, "samples": 2.5},
    [1.5, 1],
    None,
]


@pytest.mark.parametrize("bad", BAD_ENTRIES)
def test_a_corrupt_correction_is_ignored_with_one_warning(
    small: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: object
) -> None:
    checkpoint = memplan.inspect(small)
    bad_key = Corrections.key(checkpoint.fingerprint, "full", "cpu")
    good_key = Corrections.key(checkpoint.fingerprint, "streamed", "cpu")
    file = tmp_path / "corrections.json"
    entries = {bad_key: bad, good_key: {"ratio": 1.25, "samples": 2}}
    file.write_text(json.dumps({"version": 1, "corrections": entries}))
    with caplog.at_level(logging.WARNING, logger=CORRECTIONS_LOG):
        loaded = Corrections.load(file)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert bad_key in caplog.records[0].getMessage()
    assert (loaded.factor(checkpoint.fingerprint, "full", "cpu"), len(loaded.entries)) == (1.0, 1)
    policy = Policy(order=("full",))
    corrected = memplan.plan(
        checkpoint, memplan.probe("cpu=4GiB"), Workload(context=16), policy, corrections=loaded
    )
    plain = memplan.plan(checkpoint, memplan.probe("cpu=4GiB"), Workload(context=16), policy)
    assert corrected.estimate.on(CPU).peak == plain.estimate.on(CPU).peak > 0


@pytest.mark.parametrize("text", ["{", "", "[]", '{"corrections": 5}', '{"version": 1}', "\xff"])
def test_a_corrections_file_that_is_not_corrections_is_ignored_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str
) -> None:
    file = tmp_path / "corrections.json"
    file.write_text(text, encoding="latin-1")
    with caplog.at_level(logging.WARNING, logger=CORRECTIONS_LOG):
        assert Corrections.load(file).entries == {}
    assert len(caplog.records) == 1 and str(file) in caplog.records[0].getMessage()


# --- 5. saving corrections is best effort and atomic ----------------------------------------


def test_saving_corrections_where_the_cache_cannot_be_written_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    corrections = Corrections()
    corrections.record("abc", "full", "cpu", 100, 120)
    with caplog.at_level(logging.WARNING, logger=CORRECTIONS_LOG):
        corrections.save(blocker / "memplan" / "corrections.json")
        corrections.save(blocker / "memplan" / "corrections.json")
    assert len(caplog.records) == 1 and "cannot save" in caplog.records[0].getMessage()


def test_concurrent_saves_leave_one_whole_file(tmp_path: Path) -> None:
    from tests.conftest import run_threads

    file = tmp_path / "corrections.json"

    def save_many(index: int) -> None:
        corrections = Corrections()
        corrections.record(f"model{index}", "full", "cpu", 100, 110 + index)
        for _ in range(20):
            corrections.save(file)

    assert run_threads(save_many, 6, timeout_s=60) == []
    assert len(Corrections.from_json(file.read_text()).entries) == 1
    assert list(tmp_path.iterdir()) == [file]  # no temporary files left behind


# --- 7. Plan.from_json takes only plans it wrote --------------------------------------------


@pytest.mark.parametrize(
    "text", ["not json", "[]", "null", '{"version": 1}', "[" * 100_000, '{"version": 1, "model": 5}']
)
def test_malformed_plan_json_is_a_plan_format_error(text: str) -> None:
    with pytest.raises(PlanFormatError):
        Plan.from_json(text)


@pytest.mark.parametrize("version", [99, 0, None, "1", 1.5])
def test_plan_json_of_an_unknown_version_is_a_plan_format_error(small: Path, version: object) -> None:
    data = json.loads(plan_on(small).to_json())
    data["version"] = version
    with pytest.raises(PlanFormatError, match="version"):
        Plan.from_json(json.dumps(data))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON document a value could be replaced."""
    children: Iterable[tuple[Any, Any]] = ()
    if isinstance(value, dict):
        children = value.items()
    elif isinstance(value, list):
        children = enumerate(value)
    return [prefix] + [p for key, child in children for p in _paths(child, (*prefix, key))]


def _replaced(document: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = json.loads(json.dumps(document))
    parent = copy
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = new
    return copy


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_plan_json_is_a_plan_or_a_plan_format_error(small: Path, data: st.DataObject) -> None:
    document = json.loads(plan_on(small).to_json())
    path = data.draw(st.sampled_from(_paths(document)))
    mutated = _replaced(document, path, data.draw(JSON_VALUES))
    try:
        result = Plan.from_json(json.dumps(mutated))
    except PlanFormatError:
        return
    result.explain()  # what it returns is a plan a user can read
    assert Plan.from_json(result.to_json()) == result


# --- 8. torch dtypes where dtype names go ---------------------------------------------------


def test_policy_and_workload_take_a_torch_dtype(small: Path) -> None:
    torch = pytest.importorskip("torch")
    policy, workload = Policy(dtype=torch.float16), Workload(kv_dtype=torch.bfloat16)
    assert (policy.dtype, workload.kv_dtype) == ("F16", "BF16")
    result = memplan.plan(memplan.inspect(small), memplan.probe(TWO_GPUS), workload, policy)
    assert result.dtype == "F16" and "KV cache in BF16" in result.explain()
    assert Plan.from_json(result.to_json()) == result


@pytest.mark.parametrize("dtype", ["fp8", "int4", 16])
def test_a_policy_computes_only_in_a_float_dtype_torch_runs(dtype: object) -> None:
    with pytest.raises(memplan.MemplanError, match="dtype"):
        Policy(dtype=dtype)  # type: ignore[arg-type]


# --- weights files that are no regular files (trust issue 20.6) ------------------------------


def _inspect_within(path: Path, seconds: float) -> BaseException | None:
    """What inspect(path) raised, run on a thread; a writer opened on every FIFO left in ``path``
    frees a thread stuck opening one, so a hang fails the test instead of the suite."""
    import os
    import stat
    import threading

    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            memplan.inspect(path)
            raised.append(None)
        except BaseException as exc:  # handed to the test
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in (p for p in path.iterdir() if stat.S_ISFIFO(p.lstat().st_mode)):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"inspect({path}) hung on a FIFO")
    return raised[0]


@pytest.mark.parametrize(
    "name", ["model.safetensors", "model-00001-of-00001.safetensors", "pytorch_model.bin"]
)
def test_a_fifo_in_a_weights_files_place_is_refused_not_waited_on(tmp_path: Path, name: str) -> None:
    import os

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(small_config(1)))
    os.mkfifo(folder / name)
    raised = _inspect_within(folder, 10)
    assert isinstance(raised, CheckpointError), raised
    assert raised.file == str(folder / name) and "not a regular file" in str(raised)


def test_a_fifo_named_by_the_index_is_refused_not_waited_on(tmp_path: Path) -> None:
    import os

    folder = write_checkpoint(tmp_path / "model", [0], small_config(1))
    os.rename(folder / "model.safetensors", folder / "a.safetensors")
    os.mkfifo(folder / "b.safetensors")
    weight_map = {"model.embed_tokens.weight": "a.safetensors", "lm_head.weight": "b.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    raised = _inspect_within(folder, 10)
    assert isinstance(raised, CheckpointError), raised
    assert raised.file == str(folder / "b.safetensors") and "not a regular file" in str(raised)


def test_a_fifo_config_is_refused_not_taken_for_no_config(tmp_path: Path) -> None:
    import os

    folder = write_checkpoint(tmp_path / "model", [0], None)
    os.mkfifo(folder / "config.json")
    raised = _inspect_within(folder, 10)
    assert isinstance(raised, CheckpointError), raised
    assert raised.file == str(folder / "config.json") and "not a regular file" in str(raised)


def test_a_weights_file_that_is_a_symlink_loop_says_so(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "model", [0], small_config(1))
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to("model.safetensors")
    with pytest.raises(CheckpointError, match="symlink loop"):
        memplan.inspect(folder)


# --- a model with no stack of layers ---------------------------------------------------------


@pytest.mark.parametrize("source", ["streamed-disk", "streamed-host"])
def test_a_model_with_no_layers_to_stream_is_planned_whole_and_says_so(tmp_path: Path, source: str) -> None:
    """ALBERT (one shared layer), XLM (parallel lists), Perceiver: nothing repeats to stream. The
    streamed plan keeps the whole model on the compute device, never a 0-byte shortfall."""
    path = write_checkpoint(tmp_path / "flat", [], small_config(0) | {"num_hidden_layers": None})
    chosen = plan_on(path, policy=Policy(order=(source,)))
    assert chosen.strategy.kind == "streamed"
    assert chosen.strategy.compute_device == Device("cuda", 0)
    assert "no repeated layers to stream" in chosen.decisions[0].reason
    tight = f"cuda:0={memplan.inspect(path).nbytes // 2},cpu=8GiB"
    with pytest.raises(memplan.DoesNotFit, match=f"needs .* MiB, .*closest is {source}") as info:
        plan_on(path, tight, policy=Policy(order=(source,)))
    assert "needs 0 B" not in str(info.value)
