"""The slow tiers when things go wrong: S3 errors and retries, crashes while spilling to disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from memplan import RemoteTierError, ResidencyManager, RetentionPolicy, TierError, get_tier
from memplan.residency.tiers.disk import name_for_key
from tests.conformance.contract import random_tensor, same_bits
from tests.conftest import S3_KEY, S3_SECRET, free_port


class Flaky:
    """Wraps an fsspec filesystem: the next ``failures`` calls of the named methods raise.

    It presents itself as synchronous, so the tier calls the wrapped methods, not their async twins."""

    async_impl = False

    def __init__(self, fs: Any, failures: int, error: BaseException) -> None:
        self._fs, self.failures, self.error, self.calls = fs, failures, error, 0

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._fs, name)
        if name not in ("pipe_file", "cat_file", "rm_file"):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.failures > 0:
                self.failures -= 1
                raise self.error
            return target(*args, **kwargs)

        return call


def remote(s3: dict[str, Any], **options: Any) -> Any:
    return get_tier(
        "remote", f"s3://residency/{uuid.uuid4().hex}", storage_options=s3, backoff_s=0.01, **options
    )


def test_transient_errors_are_retried_then_succeed(s3: dict[str, Any]) -> None:
    tier = remote(s3)
    tier.fs = Flaky(tier.fs, failures=2, error=ConnectionError("connection reset by peer"))
    tier.put("k", torch.arange(10))
    assert tier.fs.calls == 3 and torch.equal(tier.get("k"), torch.arange(10))


def test_a_dead_endpoint_gives_a_remote_tier_error_without_credentials(
    s3: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    dead = dict(s3, client_kwargs={"endpoint_url": f"http://127.0.0.1:{free_port()}", "region_name": "us-east-1"},
                config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1})  # fmt: skip
    with pytest.raises(RemoteTierError) as caught:
        get_tier("remote", "s3://residency/dead", storage_options=dead, retries=2, backoff_s=0.01)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("memplan")]
    shown = str(caught.value) + "\n".join(ours)
    assert "2 tries" in str(caught.value) and len(ours) == 2  # one warning per failed try
    assert S3_SECRET not in shown and S3_KEY not in shown


def test_on_remote_failure_the_entry_stays_where_it_was(s3: dict[str, Any]) -> None:
    tier = remote(s3, retries=3)
    rm = ResidencyManager([get_tier("memory", name="host"), tier])
    weights = {"w": torch.randn(64)}
    rm.register("m", {"w": weights["w"].clone()})
    tier.fs = Flaky(tier.fs, failures=100, error=TimeoutError("read timed out"))
    with pytest.raises(RemoteTierError):
        rm.demote("m")
    assert rm.tier_of("m").name == "host" and tier.used == 0 and len(tier) == 0
    with rm.use("m") as got:
        assert torch.equal(got["w"], weights["w"])
    tier.fs.failures = 0
    rm.demote("m")
    assert rm.tier_of("m").name == "remote"
    with rm.use("m") as got:
        assert torch.equal(got["w"], weights["w"])


def test_permanent_errors_are_not_retried(s3: dict[str, Any]) -> None:
    tier = remote(s3, retries=5)
    tier.fs = Flaky(tier.fs, failures=1, error=PermissionError("access denied"))
    with pytest.raises(RemoteTierError):
        tier.put("k", torch.ones(2))
    assert tier.fs.calls == 1


def test_a_persistent_entry_survives_on_s3_for_the_next_manager(s3: dict[str, Any]) -> None:
    url = f"s3://residency/{uuid.uuid4().hex}"
    first = get_tier("remote", url, storage_options=s3)
    rm = ResidencyManager([get_tier("memory", name="host"), first])
    rm.register("keep", {"w": torch.arange(5.0)}, policy=RetentionPolicy(persistent=True), tier="remote")
    rm.register("scratch", {"w": torch.arange(7.0)}, tier="remote")
    rm.close()
    again = get_tier("remote", url, storage_options=s3)
    assert again.recovered == 1
    assert torch.equal(again.get(again.keys()[0]), torch.arange(5.0))


# -- disk ------------------------------------------------------------------------------------


def test_spill_directory_and_files_are_private(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    spill.mkdir(mode=0o755)
    tier = get_tier("disk", spill)
    tier.put("k", torch.ones(3))
    assert stat.S_IMODE(spill.stat().st_mode) == 0o700
    (file,) = spill.iterdir()
    assert stat.S_IMODE(file.stat().st_mode) == 0o600


def test_every_folder_memplan_creates_for_its_spills_is_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quantized-weights cache opens spill/quantized/<key>: spill/ and quantized/ were left
    at the default mode (755), which doctor then warned about."""
    from memplan.monitor.doctor import Environment, diagnose

    monkeypatch.setenv("MEMPLAN_SPILL_DIR", str(tmp_path / "cache" / "spill"))
    get_tier("disk", tmp_path / "cache" / "spill" / "quantized" / "abc")
    for folder in ("cache", "cache/spill", "cache/spill/quantized", "cache/spill/quantized/abc"):
        assert stat.S_IMODE((tmp_path / folder).stat().st_mode) == 0o700, folder
    (spill,) = [
        f for f in diagnose(Environment(spill_dir=tmp_path / "cache" / "spill")) if f.check == "spill dir"
    ]
    assert spill.status == "ok", spill


def test_start_up_adopts_whole_files_and_removes_partial_ones(tmp_path: Path) -> None:
    tier = get_tier("disk", tmp_path)
    tier.put("good", torch.arange(100))
    tier.put("torn", torch.arange(100))
    torn = tmp_path / (name_for_key("torn") + ".safetensors")
    torn.write_bytes(torn.read_bytes()[:-17])
    (tmp_path / ".999999999.abc.x.safetensors.tmp").write_bytes(b"half a write")
    again = get_tier("disk", tmp_path)
    assert again.keys() == ["good"] and (again.recovered, again.removed) == (1, 2)
    assert torch.equal(again.get("good"), torch.arange(100))
    assert sorted(p.name for p in tmp_path.iterdir()) == [name_for_key("good") + ".safetensors"]


def test_a_flipped_bit_is_caught_on_read(tmp_path: Path) -> None:
    tier = get_tier("disk", tmp_path)
    tier.put("k", torch.arange(1000, dtype=torch.int32))
    path = tmp_path / (name_for_key("k") + ".safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(TierError, match="checksum"):
        tier.get("k")


@pytest.mark.parametrize("flip_at", [None, 5 << 20, 37 << 20])
def test_a_tensor_read_in_several_chunks_comes_back_whole_and_checked(
    tmp_path: Path, flip_at: int | None
) -> None:
    """Above one read request (16 MiB) the tier reads chunks in parallel and hashes them as they land."""
    tier = get_tier("disk", tmp_path)
    tensor = torch.randint(0, 255, (40 << 20,), dtype=torch.uint8)
    tier.put("k", tensor)
    if flip_at is None:
        assert torch.equal(tier.get("k"), tensor)
        return
    path = tmp_path / (name_for_key("k") + ".safetensors")
    with path.open("r+b") as file:
        file.seek(-(40 << 20) + flip_at, 2)
        byte = file.read(1)[0]
        file.seek(-1, 1)
        file.write(bytes([byte ^ 0x10]))
    with pytest.raises(TierError, match="checksum"):
        tier.get("k")


def test_a_large_read_runs_on_the_process_reading_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool of four threads was made, and taken down, for every read above one request."""
    import threading

    from memplan._io import THREAD_PREFIX, executor

    made: list[str] = []
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        made.append(self.name)
        real_start(self)

    tier = get_tier("disk", tmp_path)
    tensor = torch.randint(0, 255, (40 << 20,), dtype=torch.uint8)
    tier.put("k", tensor)
    before = executor().stats().requests
    monkeypatch.setattr(threading.Thread, "start", start)
    assert torch.equal(tier.get("k"), tensor)
    assert executor().stats().requests - before >= 3  # 40 MiB in 16 MiB requests
    assert all(name.startswith(THREAD_PREFIX) for name in made), made


def _write_v1_blob(path: Path, key: str, tensor: torch.Tensor) -> None:
    """A blob as memplan before v2 wrote it: SHA-256 under the "sha256" key."""
    raw = tensor.contiguous().view(torch.uint8).reshape(-1)
    metadata = {
        "format": "memplan.tensor.v1",
        "key": key,
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": json.dumps(list(tensor.shape)),
        "nbytes": str(raw.numel()),
        "sha256": hashlib.sha256(raw.numpy().data).hexdigest(),
        "compression": "none",
    }
    header = {
        "__metadata__": metadata,
        "data": {"dtype": "U8", "shape": [raw.numel()], "data_offsets": [0, raw.numel()]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw.numpy().tobytes())


def test_blobs_written_with_sha256_are_still_read_and_checked(tmp_path: Path) -> None:
    tensor = torch.arange(1000, dtype=torch.int32)
    path = tmp_path / (name_for_key("old") + ".safetensors")
    _write_v1_blob(path, "old", tensor)
    tier = get_tier("disk", tmp_path)
    assert tier.keys() == ["old"] and torch.equal(tier.get("old"), tensor)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(TierError, match="checksum"):
        tier.get("old")


def test_a_blob_with_a_checksum_this_version_cannot_check_is_not_adopted(tmp_path: Path) -> None:
    tier = get_tier("disk", tmp_path)
    tier.put("k", torch.arange(10))
    path = tmp_path / (name_for_key("k") + ".safetensors")
    path.write_bytes(path.read_bytes().replace(b'"xxh3_128:', b'"md99_128:'))
    assert get_tier("disk", tmp_path).keys() == []


SPILLER = textwrap.dedent(
    """
    import sys, torch
    from memplan.residency import get_tier
    tier = get_tier("disk", sys.argv[1])
    i = 0
    while True:
        g = torch.Generator().manual_seed(i)
        n = int(torch.randint(1, 400_000, (1,), generator=g))
        tier.put(f"t{i}", torch.randint(-1000, 1000, (n,), dtype=torch.int32, generator=g))
        print(i, flush=True)
        i += 1
    """
)


def expected(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    n = int(torch.randint(1, 400_000, (1,), generator=g))
    return torch.randint(-1000, 1000, (n,), dtype=torch.int32, generator=g)


def test_killed_while_spilling_every_readable_entry_is_exact(tmp_path: Path) -> None:
    """SIGKILL a spilling process at random moments, 20 times; restart; read everything."""
    rnd = random.Random(7)
    spill = tmp_path / "spill"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    for _ in range(20):
        proc = subprocess.Popen([sys.executable, "-c", SPILLER, str(spill)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        proc.stdout.readline()  # started writing
        time.sleep(rnd.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        tier = get_tier("disk", spill)
        assert not any(p.name.endswith(".tmp") for p in spill.iterdir())
        for key in sorted(tier.keys()):
            assert same_bits(tier.get(key), expected(int(key[1:]))), key
        for key in sorted(tier.keys()):  # the next run writes them again
            tier.drop(key)


def test_odd_payloads_survive_a_restart(tmp_path: Path) -> None:
    tier = get_tier("disk", tmp_path, compression="zstd")
    tensors = {f"k{i}": random_tensor(torch.bfloat16, (i, 3), seed=i) for i in range(4)}
    for key, t in tensors.items():
        tier.put(key, t)
    again = get_tier("disk", tmp_path, compression="zstd")
    assert again.used == tier.used
    for key, t in tensors.items():
        assert same_bits(again.get(key), t)


def test_a_ctrl_c_while_spilling_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from memplan import _fileio

    tier = get_tier("disk", tmp_path)

    def interrupted(fd: int, data: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(_fileio.os, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tier.put("k", torch.arange(10))
    assert list(tmp_path.iterdir()) == [] and tier.keys() == []
