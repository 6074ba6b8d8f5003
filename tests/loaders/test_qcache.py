"""Quantized weights reused: a repeat quantized load reads the stored states, not the bf16
weights, and gives the same logits; a cache that is partial, damaged or turned off costs speed,
never correctness."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import memplan
from memplan import CheckpointError, Policy, Workload
from memplan.testing.hf_cache import cache_repo
from tests.conftest import rewrite_in_place_keeping_mtime, save_tiny_llama
from tests.loaders.test_load import logits

SPEC = "cuda:0=1GiB,cpu=8GiB"


@pytest.fixture
def spill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MEMPLAN_SPILL_DIR", str(tmp_path / "spill"))
    return tmp_path / "spill" / "quantized"


def quantized(path: Path, method: str, **load: object) -> torch.nn.Module:
    chosen = memplan.plan(
        memplan.inspect(path), memplan.probe(SPEC), Workload(context=64),
        Policy(order=(method,), allow_quantization=True),
    )  # fmt: skip
    return memplan.load(path, plan=chosen, progress=False, **load)


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_a_repeat_quantized_load_reads_the_stored_states(
    tiny_llama: Path, spill: Path, method: str, bnb_cpu_path: str
) -> None:
    first = quantized(tiny_llama, method)
    want = logits(first)
    (folder,) = spill.iterdir()
    assert (folder / "complete").is_file()
    again = quantized(tiny_llama, method)
    assert torch.equal(logits(again), want)
    # Only what is not quantized (embeddings, norms, lm_head) comes from the checkpoint now.
    block_linears = sum(
        t.nbytes
        for t in memplan.inspect(tiny_llama).tensors.values()
        if t.layer is not None and len(t.shape) == 2
    )
    assert again.memplan.report.bytes_read == first.memplan.report.bytes_read - block_linears


def test_turned_off_it_writes_nothing(tiny_llama: Path, spill: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quantized(tiny_llama, "int8", quant_cache=False)
    monkeypatch.setenv("MEMPLAN_QUANT_CACHE", "0")
    quantized(tiny_llama, "int8")
    assert not spill.exists() or not any(spill.iterdir())


def test_a_damaged_or_partial_cache_is_not_trusted(tiny_llama: Path, spill: Path) -> None:
    want = logits(quantized(tiny_llama, "int8"))
    (folder,) = spill.iterdir()
    for stored in list(folder.glob("*.safetensors"))[:3]:
        data = bytearray(stored.read_bytes())
        data[-1] ^= 0xFF
        stored.write_bytes(bytes(data))
    assert torch.equal(logits(quantized(tiny_llama, "int8")), want)
    (folder / "complete").unlink()  # as if the first load had died part way
    model = quantized(tiny_llama, "int8")
    assert torch.equal(logits(model), want)
    assert model.memplan.report.bytes_read == memplan.inspect(tiny_llama).nbytes


@pytest.mark.parametrize(("method", "state"), [("int8", "SCB"), ("nf4", "weight.absmax")])
def test_a_state_file_with_a_torn_header_costs_one_layer_quantized_again(
    tiny_llama: Path, spill: Path, method: str, state: str
) -> None:
    """A file whose header cannot be read is removed when the cache opens; its layer's other
    states remain, and building the layer from them alone failed every later load."""
    want = logits(quantized(tiny_llama, method, quant_cache=False))
    quantized(tiny_llama, method)
    (folder,) = spill.iterdir()
    torn = next(f for f in sorted(folder.glob("*.safetensors")) if _key(f).endswith(f"/{state}"))
    data = bytearray(torn.read_bytes())
    data[10] ^= 0xFF  # inside the JSON header
    torn.write_bytes(bytes(data))
    for _ in range(2):
        assert torch.equal(logits(quantized(tiny_llama, method)), want)


def _key(file: Path) -> str:
    import base64

    name = file.name.removesuffix(".safetensors")
    return base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()


def test_reads_ahead_stay_within_their_window_and_close_waits_for_them(
    tiny_llama: Path, spill: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memplan.loaders._qcache import QuantCache

    quantized(tiny_llama, "int8")
    (folder,) = spill.iterdir()
    started, finished = [], []
    real_read = QuantCache._read

    def watched(self: QuantCache, weight: str) -> dict[str, torch.Tensor] | None:
        started.append(self.window.stats().held)
        state = real_read(self, weight)
        finished.append(weight)
        return state

    monkeypatch.setattr(QuantCache, "_read", watched)
    cache = QuantCache(folder)
    weights = sorted({key.partition("/")[0] for key in cache.tier.keys()})  # noqa: SIM118
    largest = max(cache._stored_bytes(w) for w in weights)
    cache.window.size = 2 * largest
    cache.read_ahead(weights)
    states = [cache.get(w) for w in weights]
    assert all(s is not None and {"weight", "SCB"} <= set(s) for s in states)
    assert started and max(started) <= 2 * largest
    started.clear()
    cache.read_ahead(weights)
    assert cache.window.stats(cache).in_flight
    cache.close()
    assert len(finished) - len(weights) == len(started)  # every read started has finished


def test_a_repeat_load_reads_from_the_cache_only_the_layers_it_quantizes(
    tiny_llama: Path, spill: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layers a load keeps in high precision (``skip_modules``) are in the cache from an earlier
    load: reading them ahead read bytes nobody took, and held them, and their share of the
    window, until the end of the load."""
    from memplan.loaders._qcache import QuantCache

    quantized(tiny_llama, "int8")
    read, left = [], []
    real_read, real_close = QuantCache._read, QuantCache.close

    def watched_read(self: QuantCache, weight: str) -> dict[str, torch.Tensor] | None:
        read.append(weight)
        return real_read(self, weight)

    def watched_close(self: QuantCache) -> None:
        mine = self.window.stats(self)
        left.append((mine.in_flight, mine.held, mine.queued))
        real_close(self)

    monkeypatch.setattr(QuantCache, "_read", watched_read)
    monkeypatch.setattr(QuantCache, "close", watched_close)
    model = _load_skipping(tiny_llama, ("down_proj",))
    assert read and not [w for w in read if "down_proj" in w]
    assert len(read) == len(set(read)) and left == [(0, 0, 0)]
    assert model.memplan.report is not None


def _load_skipping(path: Path, skip: tuple[str, ...]) -> torch.nn.Module:
    chosen = memplan.plan(
        memplan.inspect(path), memplan.probe(SPEC), Workload(context=64),
        Policy(order=("int8",), allow_quantization=True, skip_modules=skip),
    )  # fmt: skip
    return memplan.load(path, plan=chosen, progress=False)


# --- keyed by what the weights are, not by their shape (trust issue 20.1, 20.2) -----------------


def uncached(path: Path, method: str) -> torch.Tensor:
    return logits(quantized(path, method, quant_cache=False))


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_two_models_of_one_shape_never_share_quantized_weights(
    tmp_path: Path, spill: Path, method: str
) -> None:
    """A base model and its fine-tune, two revisions, two seeds: one shape, other weights."""
    base = save_tiny_llama(tmp_path / "base", seed=0)
    tuned = save_tiny_llama(tmp_path / "tuned", seed=1)
    assert memplan.inspect(base).fingerprint == memplan.inspect(tuned).fingerprint
    quantized(base, method)
    model = quantized(tuned, method)
    assert torch.equal(logits(model), uncached(tuned, method))
    assert model.memplan.report.bytes_read == memplan.inspect(tuned).nbytes  # nothing came from base's
    assert len(list(spill.iterdir())) == 2


def test_a_checkpoint_saved_again_at_the_same_path_is_quantized_again(tmp_path: Path, spill: Path) -> None:
    path = save_tiny_llama(tmp_path / "model", seed=0)
    quantized(path, "int8")
    shutil.rmtree(path)
    save_tiny_llama(path, seed=1)
    model = quantized(path, "int8")
    assert torch.equal(logits(model), uncached(path, "int8"))
    assert model.memplan.report.bytes_read == memplan.inspect(path).nbytes


def test_a_shard_rewritten_with_its_mtime_put_back_is_quantized_again(tmp_path: Path, spill: Path) -> None:
    """Same inode, same size, mtime restored (``os.utime``, a coarse-mtime filesystem): the ctime moved."""
    path = save_tiny_llama(tmp_path / "model", seed=0)
    quantized(path, "int8")
    other = save_tiny_llama(tmp_path / "other", seed=1)
    rewrite_in_place_keeping_mtime(path, other)
    assert torch.equal(logits(quantized(path, "int8")), uncached(other, "int8"))


def test_two_revisions_sharing_blobs_share_the_quantized_weights(
    tiny_llama: Path, tmp_path: Path, spill: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new revision whose weights did not change links the same blobs: the same content."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first = quantized(cache_repo(tmp_path / "hub", "org/tiny", tiny_llama), "int8")
    again = quantized(cache_repo(tmp_path / "hub", "org/tiny", tiny_llama, revision="v2"), "int8")
    assert len(list(spill.iterdir())) == 1
    assert again.memplan.report.bytes_read < first.memplan.report.bytes_read
    assert torch.equal(logits(again), logits(first))


def test_a_blob_written_through_its_snapshot_link_is_quantized_again(
    tiny_llama: Path, tmp_path: Path, spill: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write through the snapshot's link lands in blobs/<sha256>: its name stays, its bytes do not."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = cache_repo(tmp_path / "hub", "org/tiny", tiny_llama)
    quantized(snapshot, "int8")
    other = save_tiny_llama(tmp_path / "other", seed=1)
    rewrite_in_place_keeping_mtime(snapshot, other)  # through each link, into its blob
    assert all(shard.is_symlink() for shard in snapshot.glob("*.safetensors"))
    model = quantized(snapshot, "int8")
    assert model.memplan.report.bytes_read == memplan.inspect(snapshot).nbytes
    assert torch.equal(logits(model), uncached(other, "int8"))


@pytest.mark.parametrize("cached", [False, True], ids=["writing", "reading"])
def test_a_checkpoint_changed_during_a_quantized_load_fails_it(
    tmp_path: Path, spill: Path, monkeypatch: pytest.MonkeyPatch, cached: bool
) -> None:
    from memplan.loaders import _materialize

    path = save_tiny_llama(tmp_path / "model")
    other = save_tiny_llama(tmp_path / "other", seed=1)
    if cached:
        quantized(path, "int8")
    real = _materialize.Materializer.load
    rewritten: list[bool] = []

    def rewriting(self: _materialize.Materializer, binding: object, device: object) -> None:
        if not rewritten:  # a writer, mid-load, that puts the mtime back
            rewrite_in_place_keeping_mtime(path, other)
            rewritten.append(True)
        real(self, binding, device)  # type: ignore[arg-type]

    monkeypatch.setattr(_materialize.Materializer, "load", rewriting)
    with pytest.raises(CheckpointError, match="changed") as caught:
        quantized(path, "int8")
    assert Path(caught.value.file) in set(path.glob("*.safetensors"))
    written = [f for f in spill.iterdir() if (f / "complete").is_file()] if spill.is_dir() else []
    assert len(written) == (1 if cached else 0)  # only the first load's, under the old content
