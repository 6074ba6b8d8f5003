"""What a caller of the residency manager may rely on (README, "Guarantees"): a tensor handed out
is never changed by anything but the caller's own writes, a leased entry never moves, a slow or
hung tier blocks nobody else, and the books follow what the tiers really hold."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from memplan import (
    AlreadyManaged,
    Device,
    InvalidEntry,
    MemplanError,
    PinViolation,
    RemoteTierError,
    ResidencyManager,
    TierError,
    TierFull,
)
from memplan.residency import EntryInUse, get_tier
from memplan.residency.tiers.memory import MemoryTier

KiB = 1 << 10
GPU = Device("cuda", 0)


def gpu_and_host(gpu: int = 64 * KiB) -> list[Any]:
    return [get_tier("memory", gpu, name="gpu", device=GPU), get_tier("host", "64MiB")]


def test_a_second_use_of_a_leased_entry_moves_nothing() -> None:
    """The first lease's tensors live on host; a second use, once the gpu has room, must not
    promote the entry (and recycle the host buffers under the first lease)."""
    rm = ResidencyManager(gpu_and_host(gpu=8 * KiB))
    rm.register("big", {"w": torch.zeros(2 * KiB)})  # fills the gpu
    rm.register("a", {"w": torch.ones(1000)}, tier="host")
    with contextlib.ExitStack() as first_lease:
        with rm.use("big"):
            first = first_lease.enter_context(rm.use("a"))  # the gpu is full of a leased entry
        assert rm.tier_of("a").name == "host"
        held = first["w"]
        rm.demote("big")  # the gpu has room now, while "a" is still leased
        with rm.use("a"):
            assert rm.tier_of("a").name == "host"
        rm.register("c", {"w": torch.full((1000,), 7.0)}, tier="host")
        assert torch.equal(held, torch.ones(1000))


def test_pinning_a_leased_entry_elsewhere_is_refused_and_its_module_keeps_working(tmp_path: Path) -> None:
    rm = ResidencyManager([get_tier("memory", name="gpu", device=GPU), get_tier("disk", tmp_path)])
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    expected = layer(x)
    rm.register("layer", layer)
    with rm.use("layer") as module:
        with pytest.raises(EntryInUse):
            rm.pin("layer", "disk")
        assert torch.equal(module(x), expected)
        assert rm.tier_of("layer").name == "gpu"


def test_writes_through_a_lease_never_reach_another_entry(tmp_path: Path) -> None:
    rm = ResidencyManager([get_tier("memory", name="gpu", device=GPU), get_tier("disk", tmp_path)])
    same = torch.arange(64, dtype=torch.float32)
    rm.register("a", {"w": same.clone()})
    rm.register("b", {"w": same.clone()})
    with rm.use("a") as a:
        a["w"].add_(1)
    with rm.use("b") as b:
        assert torch.equal(b["w"], same)
    rm.demote("a", "disk")
    rm.register("c", {"w": same.clone()}, tier="disk")  # the original content, stored by content
    with rm.use("c") as c:
        assert torch.equal(c["w"], same)
    with rm.use("a") as a:
        assert torch.equal(a["w"], same + 1)
    assert rm.verify() == []


class SlowTier(MemoryTier):
    """A tier whose writes wait for ``go``: a slow disk or a remote that does not answer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.go = threading.Event()
        self.writing = threading.Event()

    def _store(self, key: str, tensor: torch.Tensor, room: int) -> tuple[Any, int]:
        self.writing.set()
        assert self.go.wait(30)
        return super()._store(key, tensor, room)


def test_a_lease_of_a_resident_entry_never_waits_behind_another_entrys_io() -> None:
    slow = SlowTier(name="remote", device=Device("remote"))
    rm = ResidencyManager([get_tier("memory", name="gpu", device=GPU), slow])
    rm.register("resident", {"w": torch.ones(8)})
    rm.register("leaving", {"w": torch.zeros(8)})
    mover = threading.Thread(target=rm.demote, args=("leaving",))
    mover.start()
    try:
        assert slow.writing.wait(10)
        started = time.monotonic()
        with rm.use("resident") as m:
            assert torch.equal(m["w"], torch.ones(8))
        assert rm.info("resident").tier == "gpu" and rm.stats().leased == 0
        assert time.monotonic() - started < 1.0
        assert rm.info("leaving").tier == "gpu"  # still moving: nothing published yet
    finally:
        slow.go.set()
        mover.join(10)
    assert rm.info("leaving").tier == "remote"


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A loopback server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def test_a_hung_s3_endpoint_fails_in_seconds_with_a_typed_error(silent_server: str) -> None:
    options = {"key": "AKIAHUNG", "secret": "hung-secret", "client_kwargs": {"endpoint_url": silent_server}}
    started = time.monotonic()
    with pytest.raises(RemoteTierError):
        get_tier("remote", "s3://bucket/prefix", storage_options=options, timeout_s=0.5, retries=1)
    assert time.monotonic() - started < 10


class SwitchableProxy:
    """A loopback TCP proxy to ``upstream`` that, once ``hang`` is set, accepts new connections
    and never answers them (nor forwards them)."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.hang = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.stop = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.getsockname()[1]}"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn = self.server.accept()[0]
            except OSError:
                continue
            self.held.append(conn)
            if not self.hang.is_set():
                out = socket.create_connection(self.upstream)
                self.held.append(out)
                for a, b in ((conn, out), (out, conn)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)

    def close(self) -> None:
        self.stop.set()
        for conn in self.held:
            conn.close()
        self.server.close()


def test_a_put_to_an_endpoint_that_stops_answering_fails_in_seconds(
    s3: dict[str, Any], s3_endpoint: str
) -> None:
    proxy = SwitchableProxy(s3_endpoint)
    try:
        options = {**s3, "client_kwargs": {**s3["client_kwargs"], "endpoint_url": proxy.url}}
        tier = get_tier("remote", "s3://residency/hang", storage_options=options, timeout_s=0.5, retries=1)
        tier.put("before", torch.ones(4))
        proxy.hang.set()
        started = time.monotonic()
        with pytest.raises(RemoteTierError):
            tier.put("after", torch.ones(1024))
        with pytest.raises(RemoteTierError):
            tier.get("before")
        assert time.monotonic() - started < 15
        assert "after" not in tier and tier.used == tier.size_of("before")
    finally:
        proxy.close()


def test_credentials_in_an_s3_url_are_used_and_never_shown(s3: dict[str, Any]) -> None:
    key, secret = s3["key"], s3["secret"]
    options = {k: v for k, v in s3.items() if k not in ("key", "secret")}
    tier = get_tier("remote", f"s3://{key}:{secret}@residency/creds", storage_options=options)
    tier.put("k", torch.ones(3))
    assert torch.equal(tier.get("k"), torch.ones(3))
    assert secret not in repr(tier) and secret not in tier.url
    with pytest.raises(RemoteTierError) as caught:  # a bad bucket name: typed, and scrubbed
        get_tier("remote", "s3://AKIAKEY:Super/Secret+x@not a bucket/p", storage_options=options, retries=1)
    assert "Super/Secret" not in str(caught.value) and "AKIAKEY" not in str(caught.value)


def test_a_failed_delete_leaves_an_orphan_that_is_counted_and_freed_later(tmp_path: Path) -> None:
    disk = get_tier("disk", tmp_path)
    rm = ResidencyManager([get_tier("memory", name="gpu", device=GPU), disk])
    rm.register("a", {"w": torch.ones(100)})
    rm.demote("a")
    real = disk._discard

    def read_only(key: str, handle: Any) -> None:
        raise TierError(disk.name, key, "cannot delete spill file: Read-only file system")

    disk._discard = read_only  # type: ignore[method-assign]
    with rm.use("a"):
        pass
    assert rm.info("a").tier == "gpu" and len(rm.orphans("disk")) == 1
    assert disk.used == rm.held_bytes("disk") > 0
    with pytest.raises(TierError):  # the stray key cannot be freed yet, so it cannot be rewritten
        rm.demote("a")
    disk._discard = real  # type: ignore[method-assign]
    rm.demote("a")  # the orphan is freed first, then written again
    assert rm.orphans("disk") == [] and disk.used == rm.held_bytes("disk")
    with rm.use("a") as a:
        assert torch.equal(a["w"], torch.ones(100))
    rm.maintain()
    assert rm.orphans("disk") == [] and disk.used == 0


def test_promotion_from_an_unreadable_copy_names_the_real_cause(tmp_path: Path) -> None:
    rm = ResidencyManager([get_tier("memory", name="gpu", device=GPU), get_tier("disk", tmp_path)])
    rm.register("a", {"w": torch.ones(1000)})
    rm.demote("a")
    (spill,) = tmp_path.glob("*.safetensors")
    data = bytearray(spill.read_bytes())
    data[-10] ^= 0xFF
    spill.write_bytes(bytes(data))
    with pytest.raises(TierError) as caught, rm.use("a"):
        pass
    assert not isinstance(caught.value, TierFull) and "corrupt" in str(caught.value)
    assert rm.info("a").tier == "disk" and rm.info("a").leases == 0


def test_without_dedup_nothing_is_hashed(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hashing(tensor: torch.Tensor) -> str:
        raise AssertionError("hashed with dedup off")

    monkeypatch.setattr("memplan.residency._groups.digest_of", no_hashing)
    rm = ResidencyManager(gpu_and_host(), dedup=False)
    rm.register("a", torch.nn.Linear(4, 4))
    rm.demote("a")
    with rm.use("a"):
        pass
    with pytest.raises(MemplanError):
        rm.register("a", {})


def test_a_loaded_model_handed_to_a_manager_is_charged_once(tiny_llama: Path) -> None:
    import memplan
    from memplan import Allocator, Policy, Workload

    chosen = memplan.plan(
        memplan.inspect(tiny_llama), memplan.probe("cuda:0=1GiB,cpu=8GiB"), Workload(context=64),
        Policy(order=("full",)),
    )  # fmt: skip
    allocator = Allocator(chosen.inventory)
    model = memplan.load(tiny_llama, plan=chosen, allocator=allocator, progress=False)
    loaded = allocator.usage(GPU).used
    assert loaded >= memplan.inspect(tiny_llama).nbytes
    rm = ResidencyManager([get_tier("gpu", allocator=allocator), get_tier("host", "1GiB")])
    rm.register("llama", model)
    assert allocator.usage(GPU).used == rm.tiers[0].used <= loaded  # the tier's charge, not both
    rm.demote("llama")
    assert allocator.usage(GPU).used == 0


def test_a_tensor_held_from_a_lease_survives_its_entry_moving_away(tmp_path: Path) -> None:
    rm = ResidencyManager([get_tier("host", "64MiB"), get_tier("disk", tmp_path)])
    rm.register("a", {"w": torch.ones(1000)})
    with rm.use("a") as a:
        held = a["w"]
    rm.demote("a", "disk")
    rm.register("b", {"w": torch.full((1000,), 7.0)})
    assert torch.equal(held, torch.ones(1000))


def test_closing_the_manager_under_a_lease_is_refused() -> None:
    rm = ResidencyManager(gpu_and_host())
    layer = torch.nn.Linear(4, 4)
    rm.register("m", layer)
    with rm.use("m") as module:
        with pytest.raises(EntryInUse):
            rm.close()
        assert module(torch.ones(1, 4)).shape == (1, 4)
    rm.close()


def test_identical_tensors_within_one_entry_are_freed_with_it(tmp_path: Path) -> None:
    disk = get_tier("disk", tmp_path)
    rm = ResidencyManager([get_tier("memory", name="gpu", device=GPU), disk])
    rm.register("x", {"a": torch.zeros(100), "b": torch.zeros(100)})
    for _ in range(3):
        rm.demote("x", "disk")
        with rm.use("x"):
            pass
    rm.demote("x", "disk")
    rm.unregister("x")
    assert disk.used == 0 and len(disk) == 0


def test_using_an_entry_pinned_where_it_cannot_run_is_an_error(tmp_path: Path) -> None:
    rm = ResidencyManager([get_tier("memory", name="gpu", device=GPU), get_tier("disk", tmp_path)])
    rm.register("d", {"w": torch.ones(4)})
    rm.pin("d", "disk")
    with pytest.raises(PinViolation, match="disk"), rm.use("d"):
        pass
    assert rm.info("d").leases == 0


# --- one tensor, one entry (trust issue 20.7) ----------------------------------------------------


def _two_layers() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))


@pytest.mark.parametrize(
    "second",
    [
        lambda model: model,  # the same module again
        lambda model: model[1],  # one of its submodules
        lambda model: torch.nn.Sequential(model),  # a module holding it
        lambda model: {"w": model[0].weight},  # one of its tensors, in a mapping
    ],
    ids=["same", "submodule", "parent", "tensor"],
)
def test_what_an_entry_manages_cannot_be_registered_again(second: Any) -> None:
    rm = ResidencyManager(gpu_and_host())
    model = _two_layers()
    x = torch.randn(2, 8)
    expected = model(x)
    rm.register("a", model)
    with pytest.raises(AlreadyManaged) as refused:
        rm.register("b", second(model))
    assert (refused.value.entry, refused.value.owner) == ("b", "a")
    assert rm.names() == ["a"]
    with rm.use("a") as used:  # "a" is untouched and still works
        assert torch.equal(used(x), expected)


def test_demoting_an_entry_never_empties_a_module_leased_under_another_name() -> None:
    """The fault the refusal prevents: "b" leased, "a" (the same module) demoted to meta."""
    rm = ResidencyManager(gpu_and_host())
    model = _two_layers()
    rm.register("a", model)
    with pytest.raises(AlreadyManaged):
        rm.register("b", model)
    rm.demote("a", "host")
    with rm.use("a") as used:
        assert not any(p.is_meta for p in used.parameters())


def test_a_weight_tied_across_two_registered_modules_is_refused() -> None:
    """The first entry's slots hold its tier's copy once registered; the tie is found by what it
    was registered with."""
    rm = ResidencyManager(gpu_and_host())
    embed, head = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16, bias=False)
    head.weight = embed.weight
    rm.register("embed", embed)
    with pytest.raises(AlreadyManaged) as refused:
        rm.register("head", head)
    assert (refused.value.owner, refused.value.tensor) == ("embed", "weight")


def test_a_module_unregistered_is_refused_with_a_typed_error_if_registered_again() -> None:
    rm = ResidencyManager(gpu_and_host())
    model = _two_layers()
    rm.register("a", model)
    rm.unregister("a")  # leaves the module on meta, by design
    with pytest.raises(InvalidEntry, match="meta tensor"):
        rm.register("a", model)
    assert rm.names() == []


def test_a_failure_the_manager_logs_pins_no_accelerator_memory(caplog: pytest.LogCaptureFixture) -> None:
    """A failure the manager logs and goes on from (a demotion under pressure whose read of the
    accelerator copy fails) is logged as text: a handler that keeps its records (pytest's, a
    MemoryHandler, an error reporter) must not keep the failed call's frames alive, and with
    them the accelerator tensors they held, after their entry is gone."""
    import gc

    from memplan import Allocator, probe
    from memplan.residency.tiers.gpu import GpuTier

    allocator = Allocator(probe("cuda:0=1GiB,cpu=8GiB"))

    class FailingGpu(GpuTier):
        failing = False

        def _fetch(self, key: str, handle: Any) -> torch.Tensor:
            if self.failing:
                raise TierError(self.name, key, "injected get failure")
            return super()._fetch(key, handle)

    gpu = FailingGpu(allocator=allocator)
    rm = ResidencyManager([gpu, get_tier("host", "64MiB")])
    rm.register("a", {"w": torch.ones(1000)})
    gpu.failing = True
    with caplog.at_level("WARNING"):
        rm.apply_pressure(0.85)  # medium: demote idle entries; reading the gpu copy fails, logged
    assert "injected get failure" in caplog.text and rm.tier_of("a").name == "gpu"
    rm.close()
    gc.collect()
    assert allocator.usage(GPU).used == 0


def test_a_buffer_reused_while_a_dropped_handle_is_still_alive_never_changes_a_holders_tensor() -> None:
    """Host tier, concurrent moves: a put can take a pooled buffer while the drop that gave it
    back still holds its old view (its frame has not returned). The buffer's use count then
    included that stale view, so a later holder's tensor was not seen, its buffer went back to
    the pool under it, and the next put wrote into the holder's tensor."""
    host = get_tier("host", "1MiB")
    host.put("a", torch.zeros(256))
    stale = host._held["a"].handle  # what a drop still under way holds
    host.drop("a")
    host.put("b", torch.ones(256))  # takes the same pooled buffer
    del stale  # that drop returns
    held = host.get("b")  # a lease's tensor: its holder's
    host.drop("b")
    host.put("c", torch.full((256,), 7.0))
    assert torch.equal(held, torch.ones(256))
