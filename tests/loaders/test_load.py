"""memplan.load against transformers' own loading of the same checkpoint, on simulated devices."""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import pytest
import torch

import memplan
from memplan import Allocator, Device, Policy, Sharded, Streamed, Workload
from memplan.cli import main
from memplan.planner import Corrections, Overheads
from tests.conftest import rewrite_in_place_keeping_mtime

CUDA0, CUDA1, CPU = Device("cuda", 0), Device("cuda", 1), Device("cpu")
IDS = torch.tensor([[1, 17, 33, 4, 250, 9, 77]])
WORKLOAD = Workload(context=64)
# Tiny models next to a 600 MiB CUDA context would plan nothing interesting; budgets here are exact.
EXACT = Overheads(cuda_context=0, allocator_slack=0.0)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits  # type: ignore[no-any-return]


def transformers_logits(path: Path, **kwargs: object) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(path, **kwargs).eval())


def plan_only(path: Path, candidate: str, spec: str, **policy: object) -> memplan.Plan:
    order = (candidate,)
    return memplan.plan(
        memplan.inspect(path), memplan.probe(spec), WORKLOAD, Policy(order=order, overheads=EXACT, **policy)
    )


def tight_spec(path: Path, strategy: memplan.Strategy) -> str:
    """Accelerators with just the memory ``strategy`` needs (after the default 10% headroom)."""
    est = memplan.estimate(memplan.inspect(path), WORKLOAD, strategy, overheads=EXACT)
    gpus = [f"{d.device}={math.ceil(d.peak / 0.9) + 1024}" for d in est.devices if d.device.is_accelerator]
    return ",".join([*gpus, "cpu=8GiB"])


def test_full_load_gives_transformers_logits_bit_for_bit(tiny_llama: Path, want: torch.Tensor) -> None:
    model = memplan.load(
        tiny_llama, plan=plan_only(tiny_llama, "full", "cuda:0=1GiB,cpu=8GiB"), progress=False
    )
    report = model.memplan.report
    assert torch.equal(logits(model), want)
    assert report.strategy == memplan.Full(CUDA0, "BF16")
    assert report.bytes_read == memplan.inspect(tiny_llama).nbytes
    assert report.peak(CUDA0) >= memplan.inspect(tiny_llama).nbytes
    assert not report.fallbacks


def test_tied_embeddings_are_loaded_once_and_shared(tiny_llama_single: Path) -> None:
    model = memplan.load(tiny_llama_single, plan=plan_only(tiny_llama_single, "full", "cuda:0=1GiB"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(logits(model), transformers_logits(tiny_llama_single))


def test_default_load_on_this_machine_plans_and_records_the_measured_peak(tiny_llama: Path) -> None:
    corrections = Corrections()
    model = memplan.load(tiny_llama, progress=False, corrections=corrections)
    report = model.memplan.report
    assert not report.simulated
    assert report.peak(CPU) > 0  # sampled RSS
    fingerprint = memplan.inspect(tiny_llama).fingerprint
    assert any(key.startswith(fingerprint) for key in corrections.entries)


@pytest.fixture(scope="module")
def blockwise_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bitsandbytes' CPU nf4 kernel wants every width a multiple of its 64-wide blocks."""
    from tests.conftest import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-q", intermediate=192)


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_quantized_load_matches_transformers_bitsandbytes(
    blockwise_llama: Path, method: str, bnb_cpu_path: str
) -> None:
    tiny_llama = blockwise_llama
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    config = (
        BitsAndBytesConfig(load_in_8bit=True)
        if method == "int8"
        else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    )  # fmt: skip
    theirs = transformers_logits(tiny_llama, quantization_config=config, device_map="cpu")
    chosen = plan_only(tiny_llama, method, "cpu=8GiB", allow_quantization=True)
    model = memplan.load(tiny_llama, plan=chosen, progress=False)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt if method == "int8" else bnb.nn.Linear4bit)
    assert type(model.lm_head) is torch.nn.Linear  # kept in high precision, as the plan counted it
    assert torch.equal(logits(model), theirs)


def test_gpt2_conv1d_layers_are_quantized_as_transformers_bitsandbytes_does(
    tiny_family: Callable[[str], Path],
) -> None:
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path, ids = tiny_family("gpt2"), torch.tensor([[1, 17, 33, 4, 100, 9, 77]])
    theirs = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    ).eval()
    model = memplan.load(
        path, plan=plan_only(path, "int8", "cpu=8GiB", allow_quantization=True), progress=False
    )
    swapped = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert swapped == [n for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(swapped) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in each of 2 blocks
    with torch.no_grad():
        assert torch.equal(model(ids).logits, theirs(ids).logits)


def test_skip_modules_are_honoured_as_transformers_llm_int8_skip_modules(blockwise_llama: Path) -> None:
    """``Policy(skip_modules=...)`` is BitsAndBytesConfig's ``llm_int8_skip_modules``: the same layers
    stay in high precision (a user's list replaces transformers' default skips, so lm_head is
    converted too), and the plan counts the skipped ones at their full size."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path, skip = blockwise_llama, ("down_proj",)
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip))
    theirs = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu").eval()
    chosen = plan_only(path, "int8", "cpu=8GiB", allow_quantization=True, skip_modules=skip)
    model = memplan.load(path, plan=chosen, progress=False)

    def converted(m: torch.nn.Module) -> list[str]:
        return [n for n, layer in m.named_modules() if isinstance(layer, bnb.nn.Linear8bitLt)]

    assert converted(model) == converted(theirs)
    assert "lm_head" in converted(model) and not any(n.endswith("down_proj") for n in converted(model))
    assert model.memplan.report.notes[-1].startswith("int8: 25 of 29 Linear layers (kept in high precision: ")
    assert torch.equal(logits(model), logits(theirs))
    default = plan_only(path, "int8", "cpu=8GiB", allow_quantization=True)
    down = [t for t in memplan.inspect(path).tensors.values() if t.name.endswith("down_proj.weight")]
    # each down_proj stays bf16 (2 bytes a weight) rather than int8 with an fp32 scale per row
    kept_bytes = sum(t.numel * 2 - (t.numel + t.shape[0] * 4) for t in down)
    assert chosen.estimate.on(CPU).weights - default.estimate.on(CPU).weights == kept_bytes
    # the plan says what its figure assumes: 7 Linears in each of 4 blocks, less the 4 down_proj
    assert "int8 bytes assume the 24 Linear weights of the repeated blocks" in chosen.estimate.notes[-1]


def test_sharded_load_splits_layers_over_two_budgeted_devices(tiny_llama: Path, want: torch.Tensor) -> None:
    ckpt = memplan.inspect(tiny_llama)
    each = ckpt.nbytes  # less headroom, neither device can hold the model alone
    chosen = plan_only(tiny_llama, "sharded", f"cuda:0={each:.0f},cuda:1={each:.0f},cpu=8GiB")
    allocator = Allocator(chosen.inventory)
    model = memplan.load(tiny_llama, plan=chosen, allocator=allocator, progress=False)
    assert isinstance(model.memplan.report.strategy, Sharded)
    used = {d: allocator.usage(d).used for d in (CUDA0, CUDA1)}
    assert all(0 < u <= each for u in used.values())
    assert torch.equal(logits(model), want)


@pytest.mark.parametrize("source", ["disk", "host"])
def test_streamed_load_keeps_the_arena_bounded_and_logits_exact(
    tiny_llama: Path, want: torch.Tensor, source: str
) -> None:
    strategy = Streamed(CUDA0, source, resident_layers=1, prefetch_depth=1, dtype="BF16")  # type: ignore[arg-type]
    chosen = plan_only(tiny_llama, f"streamed-{source}", tight_spec(tiny_llama, strategy), prefetch_depth=1)
    assert chosen.strategy == strategy
    allocator = Allocator(chosen.inventory)
    model = memplan.load(tiny_llama, plan=chosen, allocator=allocator, progress=False)
    assert torch.equal(logits(model), want)
    assert torch.equal(logits(model), want)  # the arena's slots are reused on the second pass
    stats = model.memplan.streamer.stats
    assert stats.fetches >= 2 * 3  # three streamed layers, twice
    assert allocator.usage(CUDA0).peak <= chosen.estimate.on(CUDA0).peak
    assert 0.0 <= stats.hidden_fraction <= 1.0


@pytest.mark.parametrize("source", ["disk", "host"])
def test_streamed_weights_require_grad_as_from_pretrained_leaves_them(tiny_llama: Path, source: str) -> None:
    """A tensor's requires_grad picks matmul's kernel even under no_grad (a 3-D input that is not
    contiguous is folded or not by it): a frozen streamed weight computed PatchTST's attention
    in another summation order than transformers' model."""
    strategy = Streamed(CUDA0, source, resident_layers=1, prefetch_depth=1, dtype="BF16")  # type: ignore[arg-type]
    model = memplan.load(
        tiny_llama,
        plan=plan_only(tiny_llama, f"streamed-{source}", tight_spec(tiny_llama, strategy)),
        progress=False,
    )
    seen: list[bool] = []
    layer = model.model.layers[2].mlp.down_proj
    layer.register_forward_pre_hook(lambda module, args: seen.append(module.weight.requires_grad))
    logits(model)
    assert seen == [True]
    frozen = memplan.load(
        tiny_llama, plan=plan_only(tiny_llama, f"streamed-{source}", tight_spec(tiny_llama, strategy)),
        progress=False, trainable=False,
    )  # fmt: skip
    frozen.model.layers[2].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: seen.append(m.weight.requires_grad)
    )
    logits(frozen)
    assert seen == [True, False]


@pytest.mark.parametrize("source", ["disk", "host"])
def test_a_backward_through_a_reused_streamed_slot_raises_instead_of_using_other_weights(
    tiny_llama: Path, source: str
) -> None:
    """The graph of a forward outside no_grad keeps the slot's views; once a slot holds the next
    layer, a backward through the first would compute with the wrong weights."""
    strategy = Streamed(CUDA0, source, resident_layers=1, prefetch_depth=1, dtype="BF16")  # type: ignore[arg-type]
    model = memplan.load(
        tiny_llama,
        plan=plan_only(tiny_llama, f"streamed-{source}", tight_spec(tiny_llama, strategy)),
        progress=False,
    )
    loss = model(IDS).logits.float().sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def _grad_at_layer(model: torch.nn.Module, layer: int) -> torch.Tensor:
    """The gradient of the logits' square sum at ``layer``'s input: a backward of part of the graph."""
    box: dict[str, torch.Tensor] = {}

    def grab(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        box["h"] = args[0] if args else kwargs["hidden_states"]

    handle = model.model.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    loss = model(IDS).logits.float().pow(2).sum()
    handle.remove()
    return torch.autograd.grad(loss, box["h"])[0]


def test_a_partial_backward_never_reads_a_slot_being_refilled(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a forward that autograd records, nothing is fetched ahead for the next forward, so a
    backward of the last layers (whose slots were not reused) reads their own weights, however
    slow the disk; the prefetch of the next forward's layers used to overwrite them."""
    from transformers import AutoModelForCausalLM

    from memplan.loaders import _reader

    want = _grad_at_layer(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16), 2)
    strategy = Streamed(CUDA0, "disk", resident_layers=0, prefetch_depth=1, dtype="BF16")  # type: ignore[arg-type]
    model = memplan.load(
        tiny_llama,
        plan=plan_only(tiny_llama, "streamed-disk", tight_spec(tiny_llama, strategy), prefetch_depth=1),
        progress=False,
    )
    assert model.memplan.report.strategy == strategy
    read = _reader.TensorReader.read_all_into

    def slow(self: Any, pairs: Any) -> None:
        read(self, pairs)
        time.sleep(0.3)  # a slow disk: the fill is still under way when the backward runs

    monkeypatch.setattr(_reader.TensorReader, "read_all_into", slow)
    assert torch.equal(_grad_at_layer(model, 2), want)


def test_forwards_on_two_threads_take_turns(tiny_llama: Path, want: torch.Tensor) -> None:
    """Two threads bound their modules to one slot and freed it under each other (wrong logits,
    no error); a streamed model runs one forward at a time."""
    model = _streamed_disk(tiny_llama)
    results: list[bool] = []

    def work() -> None:
        for _ in range(10):
            results.append(torch.equal(logits(model), want))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 20


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_streamed_model_gives_its_shards_descriptors_back_when_it_goes(tiny_llama: Path) -> None:
    """Streamed layers read the checkpoint at every forward, long after the load: a model
    server that loads and drops such models must not run out of descriptors."""
    shards = {str(t.file.resolve()) for t in memplan.inspect(tiny_llama).tensors.values()}

    def held() -> int:
        gc.collect()
        return sum(1 for fd in os.listdir("/proc/self/fd") if _target(fd) in shards)

    before = held()
    strategy = Streamed(CUDA0, "disk", resident_layers=1, prefetch_depth=1, dtype="BF16")  # type: ignore[arg-type]
    chosen = plan_only(tiny_llama, "streamed-disk", tight_spec(tiny_llama, strategy), prefetch_depth=1)
    model = memplan.load(tiny_llama, plan=chosen, progress=False)
    logits(model)
    assert held() > before  # its streamed layers read through them
    del model
    deadline = time.monotonic() + 10
    while held() > before and time.monotonic() < deadline:
        time.sleep(0.01)  # closed once the prefetch the last forward started has landed
    assert held() == before


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("kind", ["offloaded", "streamed-host"])
def test_a_model_whose_layers_wait_in_host_memory_holds_no_shard_open(tiny_llama: Path, kind: str) -> None:
    """Offloaded and host-streamed layers are copied from host memory at each forward: the files
    are not read again, so the load gives their descriptors back (a server keeps many models)."""
    shards = {str(t.file.resolve()) for t in memplan.inspect(tiny_llama).tensors.values()}
    held = lambda: sum(1 for fd in os.listdir("/proc/self/fd") if _target(fd) in shards)  # noqa: E731
    before = held()
    ckpt = memplan.inspect(tiny_llama)
    if kind == "offloaded":
        chosen = plan_only(tiny_llama, "offloaded", f"cuda:0={ckpt.nbytes * 0.6:.0f},cpu=8GiB")
    else:
        strategy = Streamed(CUDA0, "host", resident_layers=1, prefetch_depth=1, dtype="BF16")
        chosen = plan_only(tiny_llama, "streamed-host", tight_spec(tiny_llama, strategy), prefetch_depth=1)
    model = memplan.load(tiny_llama, plan=chosen, progress=False)
    assert model.memplan.streamer is not None
    assert held() == before
    logits(model)
    assert held() == before


def _replace_shards_with_other_weights(folder: Path) -> None:
    """Every shard swapped for one with the same layout and other values, as a new download
    into the same folder would do (a new file renamed over the old)."""
    from safetensors.torch import load_file, save_file

    for shard in folder.glob("*.safetensors"):
        other = {name: t + 1 for name, t in load_file(shard).items()}
        save_file(other, shard.with_suffix(".new"), metadata={"format": "pt"})
        os.replace(shard.with_suffix(".new"), shard)


def _streamed_disk(path: Path) -> torch.nn.Module:
    strategy = Streamed(CUDA0, "disk", resident_layers=1, prefetch_depth=1, dtype="BF16")  # type: ignore[arg-type]
    chosen = plan_only(path, "streamed-disk", tight_spec(path, strategy), prefetch_depth=1)
    return memplan.load(path, plan=chosen, progress=False)


def test_a_streamed_model_whose_shards_are_replaced_keeps_its_weights_or_says_so(
    tiny_llama: Path, want: torch.Tensor, tmp_path: Path
) -> None:
    """Streamed layers are read at every forward: files swapped under a model must not mix other
    weights into it silently. The model's streamer owns the load's reader, so it goes on reading
    the files it opened; a file it had not opened yet must still be the one ``inspect`` read."""
    first, second = shutil.copytree(tiny_llama, tmp_path / "a"), shutil.copytree(tiny_llama, tmp_path / "b")
    running = _streamed_disk(first)
    assert torch.equal(logits(running), want)
    _replace_shards_with_other_weights(first)
    assert torch.equal(logits(running), want)
    not_yet_run = _streamed_disk(second)
    _replace_shards_with_other_weights(second)
    with pytest.raises(memplan.CheckpointError, match="changed"):
        logits(not_yet_run)


def test_a_shard_only_streamed_layers_live_in_is_the_one_inspect_read(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """The load reads nothing of a file that holds only streamed layers; the first forward does.
    Replaced between the two, it held other weights, read without an error."""
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_llama, tmp_path / "m")
    model = _streamed_disk(folder)  # layer 0 resident, the rest streamed
    tensors = memplan.inspect(folder).tensors.values()
    resident = {t.file.name for t in tensors if t.layer is None or t.layer < 1}
    streamed_only = [s for s in sorted(folder.glob("*.safetensors")) if s.name not in resident]
    assert streamed_only, "the tiny Llama has a shard of streamed layers only"
    for shard in streamed_only:
        other = {k: v + 1 for k, v in load_file(shard).items()}
        save_file(other, shard.with_suffix(".new"), metadata={"format": "pt"})
        os.replace(shard.with_suffix(".new"), shard)
    with pytest.raises(memplan.CheckpointError, match="changed") as raised:
        logits(model)
    assert raised.value.file in {str(s) for s in streamed_only}


def test_a_streamed_model_unloaded_on_its_own_prefetch_thread_does_not_hang(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The garbage collector unloads a dropped model on whichever thread it interrupts, the
    prefetch thread too (seen: a thread starting for a fill's reads): waiting there for the
    fills waited for itself."""
    from memplan.loaders._streaming import ModuleStreamer

    model = _streamed_disk(tiny_llama)
    streamer = model.memplan.streamer
    real_fill = ModuleStreamer._fill

    def fill(self: ModuleStreamer, index: int, slot: int) -> float:
        if self is streamer:
            self.close()  # as a collection on this thread would
        return real_fill(self, index, slot)

    monkeypatch.setattr(ModuleStreamer, "_fill", fill)
    with streamer._lock:
        streamer._schedule(1)  # a prefetch, as a forward's pre-hook starts one
        _, prefetch = streamer._inflight[1]
    wait([prefetch], timeout=30)
    assert prefetch.done(), "unloading on the prefetch thread waited for itself"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_fill_that_outlives_its_models_unloading_leaves_no_descriptor_open(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward interrupted (Ctrl-C) while its fill was still reading, then the model dropped:
    the descriptors are closed once that fill lands, not under it, and not never."""
    from memplan.loaders._streaming import ModuleStreamer

    shards = {str(t.file.resolve()) for t in memplan.inspect(tiny_llama).tensors.values()}

    def held() -> int:
        return sum(1 for fd in os.listdir("/proc/self/fd") if _target(fd) in shards)

    gc.collect()
    before = held()
    model = _streamed_disk(tiny_llama)
    streamer = model.memplan.streamer
    release, real_fill = threading.Event(), ModuleStreamer._fill

    def slow_fill(self: ModuleStreamer, index: int, slot: int) -> float:
        release.wait(30)
        return real_fill(self, index, slot)

    monkeypatch.setattr(ModuleStreamer, "_fill", slow_fill)
    with streamer._lock:
        streamer._schedule(1)
        _, fill = streamer._inflight.pop(1)  # taken by a forward that Ctrl-C then interrupted
    del model, streamer
    gc.collect()  # unloads it: returns at once, the fill still under way
    release.set()
    wait([fill], timeout=30)
    deadline = time.monotonic() + 5
    while held() > before and time.monotonic() < deadline:
        time.sleep(0.01)  # the close runs on the fill's thread just after it lands
    assert held() == before


def test_a_streamed_model_whose_shards_are_rewritten_in_place_says_so(
    tiny_llama: Path, want: torch.Tensor, tmp_path: Path
) -> None:
    """Written over in place (``cp`` onto it, ``rsync --inplace``): the same open file now holds
    other bytes, so the files it holds open do not protect it; each read checks the file."""
    folder = shutil.copytree(tiny_llama, tmp_path / "a")
    running = _streamed_disk(folder)
    assert torch.equal(logits(running), want)
    other = shutil.copytree(tiny_llama, tmp_path / "other")
    _replace_shards_with_other_weights(other)
    for shard in folder.glob("*.safetensors"):
        shutil.copyfile(other / shard.name, shard)  # same inode, new bytes
    with pytest.raises(memplan.CheckpointError, match="changed"):
        logits(running)


@pytest.mark.parametrize("then", ["nothing", "hard link", "chmod"])
def test_a_shard_rewritten_in_place_with_its_mtime_put_back_says_so(
    tiny_llama: Path, want: torch.Tensor, tmp_path: Path, then: str
) -> None:
    """Same inode, same size, mtime put back (``os.utime``; a filesystem whose mtime ticks every
    second or two hides it alike): the ctime, which every write moves, tells. A link count or mode
    that moves the ctime too hides nothing: only a file whose last name is gone (renamed over)
    keeps reading as it was. A chmod of an untouched shard is taken for a change too: a typed
    error, never other bytes."""
    folder = shutil.copytree(tiny_llama, tmp_path / "a")
    running = _streamed_disk(folder)
    assert torch.equal(logits(running), want)
    other = shutil.copytree(tiny_llama, tmp_path / "other")
    _replace_shards_with_other_weights(other)
    rewrite_in_place_keeping_mtime(folder, other)
    for shard in folder.glob("*.safetensors"):
        if then == "hard link":
            os.link(shard, shard.with_suffix(".backup"))
        elif then == "chmod":
            shard.chmod(0o600)
    with pytest.raises(memplan.CheckpointError, match="changed"):
        logits(running)


def test_a_streamed_bin_checkpoint_replaced_before_its_first_forward_keeps_its_weights(
    tiny_llama: Path, want: torch.Tensor, tmp_path: Path
) -> None:
    """The streamer reads through the load's reader: the file the load opened, not its new bytes."""
    from tests.loaders.test_sources import save_bin

    folder = tmp_path / "bin"
    save_bin(tiny_llama, folder, 1)
    model = _streamed_disk(folder)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({k: v + 1 for k, v in state.items()}, folder / "new.bin")
    os.replace(folder / "new.bin", folder / "pytorch_model.bin")
    assert torch.equal(logits(model), want)


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""  # closed meanwhile, or the listing's own descriptor


def test_offloaded_layers_visit_the_execution_device(tiny_llama: Path, want: torch.Tensor) -> None:
    ckpt = memplan.inspect(tiny_llama)
    chosen = plan_only(tiny_llama, "offloaded", f"cuda:0={ckpt.nbytes * 0.6:.0f},cpu=8GiB")
    strategy = chosen.strategy
    assert isinstance(strategy, Sharded) and strategy.offloaded
    model = memplan.load(tiny_llama, plan=chosen, progress=False)
    assert torch.equal(logits(model), want)


def test_out_of_memory_during_load_falls_back_and_frees_what_it_placed(
    tiny_llama: Path, want: torch.Tensor
) -> None:
    """The probe saw 1 GiB; by load time another process left less than the weights need."""
    ckpt = memplan.inspect(tiny_llama)
    chosen = plan_only(tiny_llama, "full", "cuda:0=1GiB,cpu=8GiB")
    chosen = memplan.plan(ckpt, chosen.inventory, WORKLOAD, Policy(overheads=EXACT))
    allocator = Allocator(chosen.inventory, capacities={CUDA0: ckpt.nbytes // 2})
    model = memplan.load(tiny_llama, plan=chosen, allocator=allocator, progress=False)
    report = model.memplan.report
    assert [f.strategy.kind for f in report.fallbacks] == ["full"]
    assert "cuda:0 is out of memory" in report.fallbacks[0].reason
    assert report.strategy.kind in ("sharded", "streamed")
    assert allocator.usage(CUDA0).used <= ckpt.nbytes // 2
    assert torch.equal(logits(model), want)
    assert "fell back from full" in report.explain()


def test_a_dropped_model_gives_its_budget_back(tiny_llama: Path) -> None:
    chosen = plan_only(tiny_llama, "full", "cuda:0=1GiB,cpu=8GiB")
    allocator = Allocator(chosen.inventory)
    model = memplan.load(tiny_llama, plan=chosen, allocator=allocator, progress=False)
    assert allocator.usage(CUDA0).used > 0
    del model
    gc.collect()
    assert allocator.usage(CUDA0).used == 0


def test_cli_load_runs_a_forward_and_prints_the_report(
    tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["load", str(tiny_llama), "--simulate", "cpu=8GiB", "--json", "--tokens", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["report"]["strategy"]["kind"] == "full"
    assert out["forward"]["shape"] == [1, 5, 512]
    assert main(["load", str(tiny_llama), "--simulate", "cpu=8GiB"]) == 0
    assert "full on cpu" in capsys.readouterr().out


def test_an_offloaded_base_model_skips_the_head_its_checkpoint_has(tiny_llama: Path, tmp_path: Path) -> None:
    """config.json names no architecture: memplan builds the base model, which has no lm_head;
    the plan's device map names it (the checkpoint has it). Was an AttributeError."""
    from transformers import AutoModel

    folder = shutil.copytree(tiny_llama, tmp_path / "base")
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    chosen = plan_only(folder, "offloaded", f"cuda:0={memplan.inspect(folder).nbytes // 2},cpu=8GiB")
    assert any(module == "lm_head" for module, _ in chosen.strategy.device_map)
    with pytest.warns(UserWarning, match="lm_head"):
        model = memplan.load(folder, plan=chosen, progress=False)
    with torch.no_grad():
        ours = model(IDS).last_hidden_state
        theirs = AutoModel.from_pretrained(folder).eval()(IDS).last_hidden_state
    assert torch.equal(ours, theirs)


def test_a_load_reads_ahead_within_the_window_its_plan_chose(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from memplan.loaders import _reader

    chosen = plan_only(tiny_llama, "int8", "cpu=8GiB", allow_quantization=True)
    small = dataclasses.replace(chosen.strategy, read_ahead=32 << 20)
    decisions = tuple(dataclasses.replace(d, strategy=small) if d.fits else d for d in chosen.decisions)
    chosen = dataclasses.replace(chosen, decisions=decisions)
    windows: list[int] = []
    real = _reader.Window.__init__

    def recorded(self: _reader.Window, size: int) -> None:
        windows.append(size)
        real(self, size)

    monkeypatch.setattr(_reader.Window, "__init__", recorded)
    memplan.load(tiny_llama, plan=chosen, progress=False, quant_cache=False)
    assert windows == [32 << 20]
