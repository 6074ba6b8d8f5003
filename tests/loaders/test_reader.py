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
from memplan._io import WindowStats, executor
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
        assert reader.window.stats().held <= largest  # the window holds at most one largest tensor here
        for name in names:
            assert reader.window.stats().held <= largest
            assert torch.equal(reader.read(name), want[name])
        assert reader.window.stats().in_flight == 0 and reader.bytes_read == checkpoint.nbytes


def test_a_tensor_nobody_asked_to_read_ahead_is_read_directly(tiny_llama: Path) -> None:
    checkpoint = memplan.inspect(tiny_llama)
    first, second = list(checkpoint.tensors)[:2]
    with TensorReader(checkpoint) as reader:
        reader.read_ahead([first])
        assert reader.read(second).shape == checkpoint.tensors[second].shape
        assert reader.read(first).shape == checkpoint.tensors[first].shape


def test_closing_with_reads_still_queued_returns(tiny_llama: Path) -> None:
    """More reads ahead than reading threads: close() cancels the queued ones and waits for
    nothing (a cancelled future never wakes a waiter: waiting on it hung); the reads running
    leave the window as they land."""
    checkpoint = memplan.inspect(tiny_llama)
    reader = TensorReader(checkpoint)
    reader.read_ahead(list(checkpoint.tensors))
    assert reader.window.stats().in_flight > executor().read_threads  # some are queued behind them
    closer = threading.Thread(target=reader.close, daemon=True)
    closer.start()
    closer.join(timeout=30)
    assert not closer.is_alive(), "close() hung on reads it had cancelled"
    deadline = time.monotonic() + 10
    while reader.window.stats().held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reader.window.stats() == WindowStats(reader.window.size, 0, 0, 0)


def test_a_failed_chunk_leaves_no_read_writing_into_the_callers_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One chunk fails while the others are still reading: read_into raises only once they have
    stopped, so nothing writes into ``out`` (or uses a descriptor close() gives back) after."""
    from safetensors.torch import save_file

    import memplan._io._executor as reader_module

    save_file({"w": torch.zeros(6 << 20)}, str(tmp_path / "model.safetensors"))  # 24 MiB: 2 requests
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
    from memplan.loaders import _build

    reading = threading.Event()
    real_read, real_bindings = TensorReader._start, _build.bindings
    seen = []

    def start(self: TensorReader, name: str) -> object:
        reading.set()
        return real_read(self, name)

    def bindings(*args: object, **kwargs: object) -> object:
        seen.append(reading.wait(10))
        return real_bindings(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(TensorReader, "_start", start)
    monkeypatch.setattr(_build, "bindings", bindings)
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
    assert model.memplan.report.unused_tensors == ("a_head_nobody_loads.weight",)
    assert model.memplan.report.bytes_read == checkpoint.nbytes - unused


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
        assert before + len(shards) < held() <= before + len(shards) + executor().read_threads
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


# --- one executor, no lock across I/O (the structure issue's concurrency section) --------------


def _two_files(tmp_path: Path) -> memplan.Checkpoint:
    from safetensors.torch import save_file

    save_file({"a": torch.arange(4.0)}, str(tmp_path / "one.safetensors"))
    save_file({"b": torch.arange(8.0)}, str(tmp_path / "two.safetensors"))
    return memplan.inspect(tmp_path)


def test_a_slow_open_of_one_file_does_not_hold_up_reads_of_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The descriptor table opened files under its lock: a shard on a slow mount (or a cold
    network filesystem) held every read of every other shard until it opened."""
    checkpoint = _two_files(tmp_path)
    slow, opening, real_open = tmp_path / "one.safetensors", threading.Event(), os.open
    release = threading.Event()

    def open_slowly(path: object, *args: object, **kwargs: object) -> int:
        if str(path) == str(slow):
            opening.set()
            release.wait(10)
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    with TensorReader(checkpoint) as reader:
        assert torch.equal(reader.read("b"), torch.arange(8.0))  # two.safetensors is open
        monkeypatch.setattr(os, "open", open_slowly)
        slow_reader = threading.Thread(target=reader.read, args=("a",), daemon=True)
        slow_reader.start()
        assert opening.wait(10)
        quick: list[torch.Tensor] = []
        other = threading.Thread(target=lambda: quick.append(reader.read("b")), daemon=True)
        other.start()
        other.join(5)
        blocked = other.is_alive()
        release.set()
        slow_reader.join(10)
        other.join(10)
    assert not blocked, "a read of an open file waited for another file's open"
    assert torch.equal(quick[0], torch.arange(8.0))


def test_a_slow_open_raced_by_another_keeps_one_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads opening one file at once: the first published is kept, the other closed."""
    checkpoint = _two_files(tmp_path)
    both, real_open, opened = threading.Barrier(2, timeout=10), os.open, []

    def open_together(path: object, *args: object, **kwargs: object) -> int:
        fd = real_open(path, *args, **kwargs)  # type: ignore[arg-type]
        if str(path).endswith("one.safetensors"):
            opened.append(fd)
            both.wait()
        return fd

    monkeypatch.setattr(os, "open", open_together)
    reader = TensorReader(checkpoint)
    got: list[torch.Tensor] = []
    threads = [threading.Thread(target=lambda: got.append(reader.read("a"))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(got) == 2 and all(torch.equal(t, torch.arange(4.0)) for t in got)
    assert len(opened) == 2 and sum(_is_open(fd) for fd in opened) == 1
    reader.close()
    assert not any(_is_open(fd) for fd in opened)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_a_bin_shard_loading_does_not_hold_up_another_and_loads_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.load of a .bin ran under the lock every read of every other shard takes."""
    torch.save({"a": torch.arange(4.0)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.arange(8.0)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {
        "metadata": {},
        "weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"},
    }
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    checkpoint = memplan.inspect(tmp_path)
    real_load, loading, release, loads = _reader.load_bin, threading.Event(), threading.Event(), []

    def load_slowly(path: Path) -> dict[str, torch.Tensor]:
        loads.append(path.name)
        if path.name.startswith("pytorch_model-00001"):
            loading.set()
            release.wait(10)
        return real_load(path)

    monkeypatch.setattr(_reader, "load_bin", load_slowly)
    with TensorReader(checkpoint) as reader:
        got: list[torch.Tensor] = []
        slow = [threading.Thread(target=lambda: got.append(reader.read("a")), daemon=True) for _ in range(3)]
        for thread in slow:
            thread.start()
        assert loading.wait(10)
        other: list[torch.Tensor] = []
        quick = threading.Thread(target=lambda: other.append(reader.read("b")), daemon=True)
        quick.start()
        quick.join(5)
        blocked = quick.is_alive()
        release.set()
        for thread in [*slow, quick]:
            thread.join(10)
    assert not blocked, "a read of one .bin waited for another's torch.load"
    assert torch.equal(other[0], torch.arange(8.0)) and len(got) == 3
    assert all(torch.equal(t, torch.arange(4.0)) for t in got)
    assert sorted(loads) == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]


def test_reading_started_early_goes_on_when_the_load_asks_for_the_same_reads(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start_reading, then read_ahead of the same names (a full load's two calls): one plan, no
    read started twice nor let go."""
    checkpoint = memplan.inspect(tiny_llama)
    names = list(checkpoint.tensors)
    started: list[str] = []
    real_start = TensorReader._start

    def start(self: TensorReader, name: str) -> object:
        started.append(name)
        return real_start(self, name)

    monkeypatch.setattr(TensorReader, "_start", start)
    largest = max(t.nbytes for t in checkpoint.tensors.values())
    with TensorReader(checkpoint, window=4 * largest) as reader:
        reader.start_reading(["not.in.the.checkpoint", *names])
        early = list(started)
        reader.read_ahead(names)
        assert started == early  # nothing let go, nothing started again
        for name in names:
            reader.read(name)
        assert sorted(started) == sorted(names) and reader.bytes_read == checkpoint.nbytes


def test_closing_waits_for_no_read_and_the_last_read_gives_the_descriptors_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A garbage collection may close a streamed model's reader on any thread: close() waits
    for nothing; a read still under way keeps its descriptor until it lands."""
    import memplan._io._executor as executor_module

    checkpoint = _two_files(tmp_path)
    reading, release, real = threading.Event(), threading.Event(), executor_module.read_exactly

    def read_slowly(fd: int, view: memoryview, offset: int, **names: object) -> None:
        reading.set()
        release.wait(10)
        real(fd, view, offset, **names)  # type: ignore[arg-type]

    reader = TensorReader(checkpoint)
    monkeypatch.setattr(executor_module, "read_exactly", read_slowly)
    reader.read_ahead(["a"])
    assert reading.wait(10)
    before = time.monotonic()
    reader.close()
    assert time.monotonic() - before < 1
    shard = str((tmp_path / "one.safetensors").resolve())
    assert shard in _open_files()  # still being read through
    release.set()
    deadline = time.monotonic() + 10
    while shard in _open_files() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert shard not in _open_files()


def test_a_load_reads_on_the_process_reading_threads_only(tiny_llama: Path) -> None:
    """One bounded pool for every reader: a load started 16 reading threads of its own, a
    quantized cache 5 more, a disk-tier read 4 more for each large read."""
    from memplan._io import THREAD_PREFIX, max_threads

    seen: list[set[str]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append({t.name for t in threading.enumerate()})
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(2):
            memplan.load(tiny_llama, progress=False)
    finally:
        stop.set()
        watcher.join()
    io_threads = max(sum(n.startswith(THREAD_PREFIX) for n in names) for names in seen)
    assert 0 < io_threads <= max_threads()
    reading = {
        n for names in seen for n in names if n.startswith("memplan-") and ("read" in n or "ahead" in n)
    }
    assert all(n.startswith(THREAD_PREFIX) for n in reading), reading  # no pool of a reader's own
