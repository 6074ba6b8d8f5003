"""The pipelined reader: tensors come off the disk ahead of the consumer, within a window."""

from __future__ import annotations

import gc
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

import memplan
from memplan.loaders import _reader
from memplan.loaders._reader import TensorReader


def test_read_ahead_fills_a_bounded_window_and_reads_the_same_bytes(tiny_llama: Path) -> None:
    checkpoint = memplan.inspect(tiny_llama)
    names = sorted(
        checkpoint.tensors, key=lambda n: (str(checkpoint.tensors[n].file), checkpoint.tensors[n].offset)
    )
    largest = max(t.nbytes for t in checkpoint.tensors.values())
    with TensorReader(checkpoint) as direct:
        want = {n: direct.read(n) for n in names}
    with TensorReader(checkpoint, window=largest) as reader:
        reader.read_ahead(names)
        deadline = time.monotonic() + 5
        while reader.bytes_read == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reader.bytes_read > 0  # read before anyone asked
        assert reader._ahead.held <= largest  # the window holds at most one largest tensor here
        for name in names:
            assert reader._ahead.held <= largest
            assert torch.equal(reader.read(name), want[name])
        assert reader._ahead.in_flight == 0 and reader.bytes_read == checkpoint.nbytes


def test_a_tensor_nobody_asked_to_read_ahead_is_read_directly(tiny_llama: Path) -> None:
    checkpoint = memplan.inspect(tiny_llama)
    first, second = list(checkpoint.tensors)[:2]
    with TensorReader(checkpoint) as reader:
        reader.read_ahead([first])
        assert reader.read(second).shape == checkpoint.tensors[second].shape
        assert reader.read(first).shape == checkpoint.tensors[first].shape


def test_closing_with_reads_still_queued_returns(tiny_llama: Path) -> None:
    """More reads ahead than reading threads: close() cancels the queued ones and waits for the
    running ones only (a cancelled future never wakes a waiter: waiting on it hung)."""
    checkpoint = memplan.inspect(tiny_llama)
    reader = TensorReader(checkpoint)
    reader.read_ahead(list(checkpoint.tensors))
    assert reader._ahead.in_flight > 8  # the reading threads: some reads are queued behind them
    closer = threading.Thread(target=reader.close, daemon=True)
    closer.start()
    closer.join(timeout=30)
    assert not closer.is_alive(), "close() hung on reads it had cancelled"


def test_a_failed_chunk_leaves_no_read_writing_into_the_callers_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One chunk fails while the others are still reading: read_into raises only once they have
    stopped, so nothing writes into ``out`` (or uses a descriptor close() gives back) after."""
    from safetensors.torch import save_file

    import memplan.loaders._reader as reader_module

    save_file({"w": torch.zeros(6 << 20)}, str(tmp_path / "model.safetensors"))  # 24 MiB: 3 chunks
    real = reader_module.read_exactly
    started: list[int] = []
    finished: list[float] = []

    def slow_or_failing(fd: int, view: memoryview, offset: int, **names: object) -> None:
        if offset < 8 << 20:  # the first chunk fails at once, while the other two still read
            raise memplan.CheckpointError(tmp_path, "injected")
        started.append(offset)
        time.sleep(0.3)
        real(fd, view, offset, **names)  # type: ignore[arg-type]
        finished.append(time.monotonic())

    monkeypatch.setattr(reader_module, "read_exactly", slow_or_failing)
    checkpoint = memplan.inspect(tmp_path)
    with TensorReader(checkpoint) as reader, pytest.raises(memplan.CheckpointError):
        reader.read_into(checkpoint.tensors["w"], torch.empty(6 << 20))
    left = time.monotonic()
    time.sleep(0.5)
    # The other two started (and were waited for) or were cancelled before they started.
    assert len(finished) == len(started) and all(at <= left for at in finished)


def test_several_tensors_read_together_hold_what_each_read_alone_holds(tmp_path: Path) -> None:
    """A streamed module's tensors are read in one go: more chunks than readers, small tensors
    and empty ones among them, from two files."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file(
        {"a": torch.randn(3 << 20, generator=g), "b": torch.randn(7, generator=g)},
        str(tmp_path / "one.safetensors"),
    )
    save_file(
        {"c": torch.randn(9 << 20, generator=g), "d": torch.empty(0)}, str(tmp_path / "two.safetensors")
    )
    checkpoint = memplan.inspect(tmp_path)
    names = ["c", "a", "d", "b"]
    with TensorReader(checkpoint) as reader:
        want = {name: reader.read(name) for name in names}
        outs = {name: torch.full_like(want[name], float("nan")) for name in names}
        reader.read_all_into([(checkpoint.tensors[name], outs[name]) for name in names])
        assert reader.bytes_read == 2 * sum(t.nbytes for t in want.values())
    for name in names:
        assert torch.equal(outs[name], want[name])


def test_a_tensor_read_before_its_turn_is_not_read_again_for_nobody(tiny_llama: Path) -> None:
    """Queued to read ahead, then asked for out of turn: read once, and its turn later reads nothing."""
    checkpoint = memplan.inspect(tiny_llama)
    first, second, third = sorted(checkpoint.tensors.values(), key=lambda t: -t.nbytes)[:3]
    with TensorReader(checkpoint, window=first.nbytes) as reader:  # one tensor in flight at a time
        reader.read_ahead([first.name, second.name, third.name])
        reader.read(third.name)  # before its turn
        reader.read(first.name)
        reader.read(second.name)
        asked = first.nbytes + second.nbytes + third.nbytes
        deadline = time.monotonic() + 1
        while reader.bytes_read == asked and time.monotonic() < deadline:
            time.sleep(0.01)  # a read of the third for nobody would have started by now
        assert reader.bytes_read == asked


def test_a_full_load_starts_reading_before_it_maps_its_names(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mapping the checkpoint's names onto the model takes a while (0.09 s for a 1B Llama,
    transformers' conversion rules): the disk works meanwhile."""
    from memplan.loaders import _strategies

    reading = threading.Event()
    real_read, real_bindings = TensorReader._read_new, _strategies._bindings
    seen = []

    def read_new(self: TensorReader, info: object) -> torch.Tensor:
        reading.set()
        return real_read(self, info)  # type: ignore[arg-type]

    def bindings(*args: object, **kwargs: object) -> object:
        seen.append(reading.wait(10))
        return real_bindings(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(TensorReader, "_read_new", read_new)
    monkeypatch.setattr(_strategies, "_bindings", bindings)
    model = memplan.load(tiny_llama, progress=False)
    assert seen == [True]
    with TensorReader(memplan.inspect(tiny_llama)) as reader:
        assert torch.equal(model.model.norm.weight, reader.read("model.norm.weight"))


def test_reading_early_reads_nothing_the_model_does_not_take(tiny_llama: Path, tmp_path: Path) -> None:
    """A tensor the model has no place for, first in the file (safetensors sorts names), is not
    read: the early reads follow the model's names, not the file's order."""
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_llama, tmp_path / "extra")
    first = min(folder.glob("*.safetensors"))
    tensors = load_file(first)
    tensors["a_head_nobody_loads.weight"] = torch.ones(256, 1024, dtype=torch.bfloat16)
    save_file(tensors, first, metadata={"format": "pt"})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["a_head_nobody_loads.weight"] = first.name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    checkpoint = memplan.inspect(folder)
    model = memplan.load(folder, progress=False)
    unused = checkpoint.tensors["a_head_nobody_loads.weight"].nbytes
    assert model.memplan_report.unused_tensors == ("a_head_nobody_loads.weight",)
    assert model.memplan_report.bytes_read == checkpoint.nbytes - unused


def _open_files() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # closed meanwhile, or the listing's own descriptor
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_reading_threads_keep_a_few_shards_open_each_and_close_gives_all_back(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One descriptor per shard, shared by callers' threads; the reader's own threads open a
    few more each (their own kernel read-ahead), and close() gives every one back."""
    checkpoint = memplan.inspect(tiny_llama)
    shards = {str(t.file.resolve()) for t in checkpoint.tensors.values()}
    monkeypatch.setattr(_reader, "_FILES_PER_THREAD", 1)

    def held() -> int:
        return len([f for f in _open_files() if f in shards])

    gc.collect()  # a streamed model left by another test closes its reader when collected
    before = held()  # other tests' live streamed models hold some
    with TensorReader(checkpoint) as reader:
        callers = [
            threading.Thread(target=lambda: [reader.read(n) for n in checkpoint.tensors]) for _ in range(3)
        ]
        for thread in callers:
            thread.start()
        for thread in callers:
            thread.join()
        assert held() == before + len(shards)
        reader.read_ahead(checkpoint.tensors)
        for name in checkpoint.tensors:
            reader.read(name)
        assert before + len(shards) < held() <= before + len(shards) + _reader._AHEAD
        assert reader.bytes_read == 4 * checkpoint.nbytes
    assert held() == before


def test_a_reading_thread_that_cannot_open_its_own_descriptor_names_the_shard(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reopening through /proc can fail on its own (no descriptors left, permissions changed)."""
    monkeypatch.setattr(_reader, "_REOPEN", True)
    monkeypatch.setattr(_reader, "_PROC_FDS", tmp_path / "no-such-dir")
    checkpoint = memplan.inspect(tiny_llama)
    name = next(iter(checkpoint.tensors))
    with TensorReader(checkpoint) as reader:
        reader.read_ahead([name])  # read on the reader's own thread
        with pytest.raises(memplan.CheckpointError, match=checkpoint.tensors[name].file.name):
            reader.read(name)
