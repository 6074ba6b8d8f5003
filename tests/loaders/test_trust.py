"""What a caller may rely on after things go wrong (issue 12): a failed forward leaves the model
working, an interrupted load leaves no budget charged, and a checkpoint, config or plan that do not
belong together are refused with a typed error instead of a silently wrong model."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch

import memplan
from memplan import Allocator, CheckpointError, Device, DeviceOutOfMemory, PlanMismatch, Policy, Workload
from memplan.loaders import remove_hooks
from memplan.loaders.load import load as load_function
from tests.conftest import save_tiny_llama
from tests.loaders.test_bad_input import single_file_copy
from tests.loaders.test_load import EXACT, WORKLOAD, logits, plan_only, tight_spec

CUDA0 = Device("cuda", 0)
FULL_SPEC = "cuda:0=1GiB,cpu=8GiB"


def plan_for(path: Path, kind: str) -> memplan.Plan:
    """A plan that loads ``path`` with ``kind`` on simulated devices."""
    nbytes = memplan.inspect(path).nbytes
    if kind == "sharded":  # neither device can hold the model alone
        return plan_only(path, "sharded", f"cuda:0={nbytes},cuda:1={nbytes},cpu=8GiB")
    if kind == "offloaded":
        return plan_only(path, "offloaded", f"cuda:0={nbytes * 0.6:.0f},cpu=8GiB")
    if kind.startswith("streamed-"):
        source = kind.removeprefix("streamed-")
        strategy = memplan.Streamed(CUDA0, source, resident_layers=1, prefetch_depth=1, dtype="BF16")  # type: ignore[arg-type]
        return plan_only(path, kind, tight_spec(path, strategy), prefetch_depth=1)
    return plan_only(path, kind, FULL_SPEC, allow_quantization=True)


def charged(allocator: Allocator) -> dict[Device, int]:
    return {u.device: u.used for u in allocator.stats() if u.used}


# --- 1. a failed forward --------------------------------------------------------------------


class RaiseOnce:
    """A forward pre-hook: the module's next call raises ``error``, later calls run."""

    def __init__(self, error: BaseException) -> None:
        self.error: BaseException | None = error

    def __call__(self, module: torch.nn.Module, args: object) -> None:
        error, self.error = self.error, None
        if error is not None:
            raise error


STRATEGIES = ["streamed-host", "streamed-disk", "offloaded", "sharded"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("kind", STRATEGIES)
def test_a_forward_that_raises_once_leaves_the_model_working(
    tiny_llama: Path, want: torch.Tensor, kind: str, error: type[BaseException]
) -> None:
    model = memplan.load(tiny_llama, plan=plan_for(tiny_llama, kind), progress=False)
    assert torch.equal(logits(model), want)
    model.model.layers[2].mlp.register_forward_pre_hook(RaiseOnce(error("interrupted mid-layer")))
    with pytest.raises(error):
        logits(model)
    assert torch.equal(logits(model), want)
    assert torch.equal(logits(model), want)


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("kind", STRATEGIES)
def test_remove_hooks_takes_off_every_hook_memplan_put_on(tiny_llama: Path, kind: str) -> None:
    model = memplan.load(tiny_llama, plan=plan_for(tiny_llama, kind), progress=False)
    assert hook_count(model) > 0
    remove_hooks(model)
    assert hook_count(model) == 0
    remove_hooks(model)  # twice is harmless


# --- 2. a config and a checkpoint that do not match -------------------------------------------


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-2", layers=2)


def with_config(src: Path, dst: Path, **changes: object) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **changes}))
    return dst


class TookTooLong(Exception):
    pass


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail the block (rather than hang the suite) when it runs past ``seconds``."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise TookTooLong(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_config_with_billions_of_layers_is_refused_before_anything_is_built(
    two_layers: Path, tmp_path: Path
) -> None:
    broken = with_config(two_layers, tmp_path / "m", num_hidden_layers=2 * 10**9)
    chosen = plan_only(two_layers, "full", FULL_SPEC)  # the same tensors: the plan fits
    with deadline(5), pytest.raises(CheckpointError) as info:
        memplan.load(broken, plan=chosen, progress=False)
    assert info.value.file == str(broken / "config.json")
    assert "2000000000 layers" in info.value.reason


def test_layers_the_config_does_not_have_are_an_error_naming_a_tensor(
    tiny_llama: Path, tmp_path: Path
) -> None:
    broken = with_config(tiny_llama, tmp_path / "m", num_hidden_layers=2)
    allocator = Allocator(memplan.probe(FULL_SPEC))
    with pytest.raises(CheckpointError) as info:
        memplan.load(broken, plan=plan_only(broken, "full", FULL_SPEC), allocator=allocator, progress=False)
    assert info.value.tensor is not None and info.value.tensor.startswith("model.layers.2.")
    assert charged(allocator) == {}


def test_a_per_stage_number_the_model_refuses_is_a_checkpoint_error(two_layers: Path, tmp_path: Path) -> None:
    """memplan reads per-stage numbers; a Llama's config class refuses them (huggingface_hub's
    strict field check, not a ValueError), and that is the config's fault, named so."""
    broken = with_config(two_layers, tmp_path / "m", num_key_value_heads=[1, 2])
    with pytest.raises(CheckpointError) as info:
        memplan.load(broken, plan=plan_only(broken, "full", FULL_SPEC), progress=False)
    assert info.value.file == str(broken / "config.json")
    assert memplan.with_computed_buffers(memplan.inspect(broken)).computed_buffers == ()


def test_a_layer_missing_from_the_checkpoint_is_an_error_naming_its_tensor(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """Planning takes layer numbers with gaps (Musicgen's stacks hold parameter-free modules
    between numbered layers); where the model has parameters in the gap, the load refuses."""

    def drop(tensors: dict[str, torch.Tensor]) -> None:
        for name in [n for n in tensors if n.startswith("model.layers.1.")]:
            del tensors[name]

    broken = single_file_copy(tiny_llama, tmp_path / "m", edit=drop)
    chosen = plan_only(broken, "full", FULL_SPEC)
    assert [layer.prefix for layer in memplan.inspect(broken).layers][:2] == [
        "model.layers.0",
        "model.layers.2",
    ]
    allocator = Allocator(memplan.probe(FULL_SPEC))
    with pytest.raises(CheckpointError) as info:
        memplan.load(broken, plan=chosen, allocator=allocator, progress=False)
    assert info.value.tensor is not None and info.value.tensor.startswith("model.layers.1.")
    assert charged(allocator) == {}


def test_an_unknown_tensor_inside_a_layer_is_an_error(tiny_llama: Path, tmp_path: Path) -> None:
    def add(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.1.mlp.gate_bias"] = torch.zeros(8, dtype=torch.bfloat16)

    broken = single_file_copy(tiny_llama, tmp_path / "m", edit=add)
    with pytest.raises(CheckpointError) as info:
        memplan.load(broken, plan=plan_only(broken, "full", FULL_SPEC), progress=False)
    assert info.value.tensor == "model.layers.1.mlp.gate_bias"


def test_an_unknown_tensor_outside_the_layers_is_loaded_past_with_a_warning(
    tiny_llama: Path, tmp_path: Path, want: torch.Tensor
) -> None:
    def add(tensors: dict[str, torch.Tensor]) -> None:
        tensors["value_head.weight"] = torch.zeros(1, 64, dtype=torch.bfloat16)

    extra = single_file_copy(tiny_llama, tmp_path / "m", edit=add)
    with pytest.warns(UserWarning, match="value_head.weight"):
        model = memplan.load(extra, plan=plan_only(extra, "full", FULL_SPEC), progress=False)
    assert model.memplan.report.unused_tensors == ("value_head.weight",)
    assert "value_head.weight" in model.memplan.report.explain()
    assert torch.equal(logits(model), want)


# --- 3. a plan made for another checkpoint ----------------------------------------------------


def test_a_plan_for_another_checkpoint_is_refused_both_ways(tiny_llama: Path, two_layers: Path) -> None:
    for path, other in [(tiny_llama, two_layers), (two_layers, tiny_llama)]:
        theirs = plan_only(other, "full", FULL_SPEC)
        with pytest.raises(PlanMismatch) as info:
            memplan.load(path, plan=theirs, progress=False)
        assert info.value.path == str(path)
        assert memplan.inspect(path).fingerprint in str(info.value)


def test_a_plan_with_another_workload_or_policy_is_refused(tiny_llama: Path) -> None:
    chosen = plan_only(tiny_llama, "full", FULL_SPEC)
    with pytest.raises(PlanMismatch, match="workload"):
        memplan.load(tiny_llama, plan=chosen, workload=Workload(context=128), progress=False)
    with pytest.raises(PlanMismatch, match="policy"):
        memplan.load(tiny_llama, plan=chosen, policy=Policy(order=("sharded",)), progress=False)
    same = memplan.load(tiny_llama, plan=chosen, workload=WORKLOAD, policy=chosen.policy, progress=False)
    assert same.memplan.report.strategy == chosen.strategy


# --- 4. Ctrl-C during a load --------------------------------------------------------------------


def _interrupt_inside_load(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C, but only while memplan.load runs: the sweep interrupts the load, never the test."""
    while frame is not None:
        if frame.f_code is load_function.__code__:
            raise KeyboardInterrupt
        frame = frame.f_back


@contextmanager
def _dropped_interrupts_sent_again() -> Iterator[None]:
    """A Ctrl-C landing where Python prints and drops exceptions (a gc callback, a weakref
    callback) leaves the load running on; pytest's hook would keep its traceback, and with it the
    load's frames and model, alive to the end of the test. It is forgotten, and sent again a
    moment later, as a user presses Ctrl-C again."""
    previous = sys.unraisablehook

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            signal.setitimer(signal.ITIMER_REAL, 0.0005)
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def _interrupted(path: Path, chosen: memplan.Plan, allocator: Allocator, delay: float) -> bool:
    """Load with Ctrl-C after ``delay`` seconds; whether the load was interrupted."""
    signal.setitimer(signal.ITIMER_REAL, delay)
    try:
        model = memplan.load(path, plan=chosen, allocator=allocator, progress=False)
    except KeyboardInterrupt:
        return True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    del model
    gc.collect()
    return False


def _free_for_other_threads(lock: Any) -> bool:
    """Whether another thread can take ``lock`` (a Ctrl-C between a lock's acquire and its
    release leaves it held by this thread, which alone can still take an RLock)."""
    import threading

    took: list[bool] = []

    def take() -> None:
        got = lock.acquire(timeout=2)
        took.append(got)
        if got:
            lock.release()

    thread = threading.Thread(target=take)
    thread.start()
    thread.join()
    return took == [True]


def _timed_load(path: Path, chosen: memplan.Plan, allocator: Allocator) -> float:
    start = time.perf_counter()
    memplan.load(path, plan=chosen, allocator=allocator, progress=False)
    return time.perf_counter() - start


@pytest.mark.parametrize("kind", ["int8", "offloaded"])
def test_ctrl_c_anywhere_in_a_load_gives_the_whole_budget_back(tiny_llama: Path, kind: str) -> None:
    chosen = plan_for(tiny_llama, kind)
    allocator = Allocator(chosen.inventory)
    memplan.load(tiny_llama, plan=chosen, allocator=allocator, progress=False)  # warm: imports done
    took = min(_timed_load(tiny_llama, chosen, allocator) for _ in range(3))  # a slow spell overstates it
    gc.collect()
    previous = signal.signal(signal.SIGALRM, _interrupt_inside_load)
    try:
        interrupts = 0
        with _dropped_interrupts_sent_again():
            for step in range(1, 31):  # Ctrl-C at 30 points spread over a whole load, and past its end
                delay = took * step / 25
                interrupts += _interrupted(tiny_llama, chosen, allocator, delay)
                assert charged(allocator) == {}, f"Ctrl-C after {delay:.4f} s leaked budget"
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert interrupts >= 15
    assert _free_for_other_threads(logging._lock)  # type: ignore[attr-defined]  # else their logging hangs
    model = memplan.load(tiny_llama, plan=chosen, allocator=allocator, progress=False)
    assert charged(allocator)  # a later load works, and is charged as it should be
    del model
    gc.collect()
    assert charged(allocator) == {}


# --- 5. a real out-of-memory while quantizing ---------------------------------------------------


def test_a_torch_oom_while_quantizing_falls_back_to_the_next_strategy(
    tiny_llama: Path, want: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*args: object) -> torch.nn.Parameter:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    monkeypatch.setattr("memplan.loaders._materialize.quantize_weight", out_of_memory)
    checkpoint, inventory = memplan.inspect(tiny_llama), memplan.probe(FULL_SPEC)
    policy = Policy(order=("int8", "full"), overheads=EXACT, allow_quantization=True)
    allocator = Allocator(inventory)
    model = memplan.load(
        tiny_llama, plan=memplan.plan(checkpoint, inventory, WORKLOAD, policy), allocator=allocator,
        progress=False,
    )  # fmt: skip
    report = model.memplan.report
    assert report.strategy == memplan.Full(CUDA0, "BF16")
    assert [f.strategy for f in report.fallbacks] == [memplan.Quantized("int8", CUDA0, "BF16")]
    assert "cuda:0 is out of memory" in report.fallbacks[0].reason
    assert torch.equal(logits(model), want)
    del model
    gc.collect()
    assert charged(allocator) == {}


def test_a_torch_oom_while_quantizing_is_a_device_out_of_memory(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*args: object) -> torch.nn.Parameter:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    monkeypatch.setattr("memplan.loaders._materialize.quantize_weight", out_of_memory)
    allocator = Allocator(memplan.probe(FULL_SPEC))
    with pytest.raises(DeviceOutOfMemory) as info:
        memplan.load(tiny_llama, plan=plan_for(tiny_llama, "int8"), allocator=allocator, progress=False)
    assert info.value.device == CUDA0 and info.value.requested > 0
    assert charged(allocator) == {}


# --- 6. many threads loading at once in a fresh process ------------------------------------------

EIGHT_THREADS = """
import sys, threading
import memplan

errors = []

def load():
    try:
        memplan.load(sys.argv[1], progress=False)
    except BaseException as exc:
        errors.append(repr(exc))

threads = [threading.Thread(target=load) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("\\n".join(errors))
sys.exit(1 if errors else 0)
"""


def test_eight_threads_loading_at_once_in_a_fresh_process(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMPLAN_SIMULATE", FULL_SPEC)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(EIGHT_THREADS), str(tiny_llama)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
