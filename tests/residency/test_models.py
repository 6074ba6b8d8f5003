"""Models as entries: ``add_model`` registers a source, the first ``use`` loads it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

import memplan
from memplan import Allocator, Device, ResidencyManager, get_tier
from memplan.gpu import parse_simulation
from tests.conftest import run_threads
from tests.loaders.test_load import logits, transformers_logits

GPU = Device("cuda", 0)


@pytest.fixture(scope="module")
def want(tiny_llama: Path) -> torch.Tensor:
    return transformers_logits(tiny_llama)


def _manager(tmp_path: Path, gpu: str = "64MiB") -> tuple[ResidencyManager, Allocator]:
    allocator = Allocator(parse_simulation(f"cuda:0={gpu},cpu=4GiB"))
    tiers = [
        get_tier("gpu", allocator=allocator),
        get_tier("host", "256MiB"),
        get_tier("disk", tmp_path / "d"),
    ]
    return ResidencyManager(tiers), allocator


def test_a_model_added_by_name_loads_on_its_first_use_onto_the_fastest_tier(
    tiny_llama: Path, want: torch.Tensor, tmp_path: Path
) -> None:
    rm, allocator = _manager(tmp_path)
    with rm:
        rm.add_model("llama", tiny_llama)
        assert "llama" in rm and rm.names() == [] and allocator.usage(GPU).used == 0  # nothing loaded
        with rm.use("llama") as model:
            assert torch.equal(logits(model), want)
        assert rm.tier_of("llama").name == "gpu"
        assert allocator.usage(GPU).used > 0
        with rm.use("llama") as again:  # loaded once
            assert again is model
        rm.demote("llama", "disk")
        with rm.use("llama") as back:
            assert torch.equal(logits(back), want)
    assert allocator.usage(GPU).used == 0


def test_a_model_larger_than_the_accelerator_room_loads_onto_the_host_tier(
    tiny_llama: Path, want: torch.Tensor, tmp_path: Path
) -> None:
    """Loaded where there is free room (nothing evicted for a newcomer); the lease then moves it
    to the fastest tier it fits, as for any entry."""
    rm, _ = _manager(tmp_path, gpu="400KiB")  # the 465 KiB model fits only the host
    with rm:
        rm.add_model("llama", tiny_llama)
        with rm.use("llama") as model:
            assert torch.equal(logits(model), want)
        assert rm.tier_of("llama").name == "host"


def test_a_model_no_tier_holds_is_does_not_fit_and_nothing_moves(tiny_llama: Path, tmp_path: Path) -> None:
    allocator = Allocator(parse_simulation("cuda:0=256KiB,cpu=4GiB"))
    tiers = [
        get_tier("gpu", allocator=allocator),
        get_tier("host", "256KiB"),
        get_tier("disk", tmp_path / "d"),
    ]
    with ResidencyManager(tiers) as rm:
        rm.register("small", {"w": torch.ones(1024)})
        rm.add_model("llama", tiny_llama)
        with pytest.raises(memplan.DoesNotFit) as raised, rm.use("llama"):
            pass
        assert raised.value.device == GPU and raised.value.needed > raised.value.available
        assert rm.tier_of("small").name == "gpu" and rm.names() == ["small"]
        assert "llama" in rm  # still added, for when there is room


def test_a_source_that_does_not_load_raises_its_error_and_stays_added(tmp_path: Path) -> None:
    rm, allocator = _manager(tmp_path)
    with rm:
        rm.add_model("ghost", tmp_path / "no-such-model")
        for _ in range(2):
            with pytest.raises(memplan.CheckpointError), rm.use("ghost"):
                pass
        assert "ghost" in rm and rm.names() == []
        assert allocator.usage(GPU).used == 0


def test_one_name_twice_is_entry_exists(tiny_llama: Path, tmp_path: Path) -> None:
    rm, _ = _manager(tmp_path)
    with rm:
        rm.add_model("llama", tiny_llama)
        with pytest.raises(memplan.EntryExists):
            rm.add_model("llama", tiny_llama)
        with pytest.raises(memplan.EntryExists):
            rm.register("llama", {"w": torch.ones(4)})
        rm.register("weights", {"w": torch.ones(4)})
        with pytest.raises(memplan.EntryExists):
            rm.add_model("weights", tiny_llama)
        rm.unregister("llama")  # unloaded: just forgotten
        assert "llama" not in rm


def test_threads_using_a_model_at_once_load_it_once(
    tiny_llama: Path, want: torch.Tensor, tmp_path: Path
) -> None:
    rm, _ = _manager(tmp_path)
    seen: list[int] = []
    lock = threading.Lock()

    def worker(_: int) -> None:
        with rm.use("llama") as model, torch.no_grad():
            assert torch.equal(logits(model), want)
            with lock:
                seen.append(id(model))

    with rm:
        rm.add_model("llama", tiny_llama)
        assert run_threads(worker, 4, timeout_s=120) == []
    assert len(seen) == 4 and len(set(seen)) == 1


def _slow_loader(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """The registered loader, held inside until released: a load in flight, for as long as needed."""
    from memplan.residency import models

    loading, release = threading.Event(), threading.Event()
    real = models.model_loader()

    def slow(source: models.ModelSource, room: models.Room) -> object:
        loading.set()
        release.wait(30)
        return real(source, room)

    monkeypatch.setattr(models, "_loaders", [slow])
    return loading, release


def _first_use_on_a_thread(rm: ResidencyManager, name: str) -> tuple[threading.Thread, list[BaseException]]:
    """``rm.use(name)`` started on a thread of its own; the list gets what it raises."""
    errors: list[BaseException] = []

    def first_use() -> None:
        try:
            with rm.use(name):
                pass
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=first_use)
    thread.start()
    return thread, errors


def test_a_model_forgotten_and_added_again_while_it_loads_is_not_served_under_that_name(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's race: the load of the old source finished after the name meant another."""
    other = tmp_path / "other"
    import shutil

    shutil.copytree(tiny_llama, other)
    rm, _ = _manager(tmp_path)
    loading, release = _slow_loader(monkeypatch)
    with rm:
        rm.add_model("m", tiny_llama)
        thread, errors = _first_use_on_a_thread(rm, "m")
        assert loading.wait(30)
        rm.unregister("m")
        rm.add_model("m", other)
        release.set()
        thread.join(60)
        assert [type(e) for e in errors] == [memplan.NoSuchEntry]
        assert rm.names() == []  # the void load registered nothing
        monkeypatch.undo()
        with rm.use("m") as model:
            assert model.memplan.report.model == "other"


def test_a_closed_manager_loads_nothing_and_answers_no_pressure(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rm, _ = _manager(tmp_path)
    loading, release = _slow_loader(monkeypatch)
    rm.add_model("m", tiny_llama)
    thread, errors = _first_use_on_a_thread(rm, "m")
    assert loading.wait(30)
    rm.close()
    release.set()
    thread.join(60)
    assert [type(e) for e in errors] == [memplan.ManagerClosed]
    assert all(t.used == 0 for t in rm.tiers)
    with pytest.raises(memplan.ManagerClosed), rm.use("m"):
        pass
    with pytest.raises(memplan.InvalidEntry, match="closed"):
        rm.add_model("n", tiny_llama)
    rm.signal_pressure(0.97)  # a monitor still driving it
    assert rm._worker.thread is None or not rm._worker.thread.is_alive() or rm._worker._stop.is_set()
    assert not rm.responses


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"name": 123}, "name"),
        ({"name": ""}, "name"),
        ({"source": None}, "source"),
        ({"policy": "x"}, "policy"),
        ({"workload": "x"}, "workload"),
        ({"revision": 5}, "revision"),
        ({"model_cls": "str"}, "model_cls"),
    ],
)
def test_add_model_checks_what_it_is_given_and_takes_no_name_for_it(
    tiny_llama: Path, tmp_path: Path, kwargs: dict[str, object], option: str
) -> None:
    rm, _ = _manager(tmp_path)
    given: dict[str, object] = {"name": "m", "source": tiny_llama, **kwargs}
    with rm:
        with pytest.raises(memplan.InvalidOption) as raised:
            rm.add_model(**given)  # type: ignore[arg-type]
        assert raised.value.option == option
        assert "m" not in rm


@pytest.mark.parametrize("ratio", ["high", None, float("nan"), -1.0, True])
def test_a_pressure_reading_that_is_no_ratio_is_refused_where_it_is_given(
    tmp_path: Path, ratio: object
) -> None:
    rm, _ = _manager(tmp_path)
    with rm:
        for signal in (rm.signal_pressure, rm.apply_pressure):
            with pytest.raises(memplan.InvalidOption):
                signal(ratio)  # type: ignore[arg-type]


def test_a_first_use_demotes_idle_entries_to_load_on_the_fastest_tier(
    tiny_llama: Path, want: torch.Tensor, tmp_path: Path
) -> None:
    """A server whose tiers are full of idle models still loads a new one where it will run,
    demoting as a promotion would (the 465 KiB model and a 400 KiB entry on a 700 KiB tier)."""
    rm, _ = _manager(tmp_path, gpu="700KiB")
    with rm:
        rm.register("idle", {"w": torch.ones(100 * 1024)})
        assert rm.tier_of("idle").name == "gpu"
        rm.add_model("llama", tiny_llama)
        with rm.use("llama") as model:
            assert torch.equal(logits(model), want)
        assert rm.tier_of("llama").name == "gpu" and rm.tier_of("idle").name == "host"
        assert [m.reason for m in rm.moves if m.entry == "idle"] == ["room for llama"]


def _drop_manager(
    tmp_path: Path, host_bandwidth: float, host: str = "256MiB"
) -> tuple[ResidencyManager, Allocator]:
    allocator = Allocator(parse_simulation("cuda:0=64MiB,cpu=4GiB"))
    tiers = [get_tier("gpu", allocator=allocator), get_tier("host", host, bandwidth=host_bandwidth)]
    return ResidencyManager(tiers), allocator


DROP = memplan.RetentionPolicy(drop=True)


def test_a_droppable_model_cheaper_to_load_again_is_dropped_and_its_next_use_loads_it(
    tiny_llama: Path, want: torch.Tensor, tmp_path: Path
) -> None:
    """Writing 465 KiB to a 1 KB/s tier and reading it back takes far longer than the load
    measured: under pressure the model is dropped, nothing of it left on any tier, and the
    next use loads it again from its checkpoint, with the same logits."""
    rm, allocator = _drop_manager(tmp_path, host_bandwidth=1e3)
    with rm:
        rm.add_model("llama", tiny_llama, policy=DROP)
        with rm.use("llama") as model:
            assert torch.equal(logits(model), want)
        rm.apply_pressure(0.85)  # medium: idle entries leave the gpu
        assert "llama" in rm and rm.unloaded() == ["llama"] and rm.names() == []
        assert rm.moves[-1].target == "dropped" and "costs less" in rm.moves[-1].reason
        assert allocator.usage(GPU).used == 0 and rm.tiers[1].used == 0
        with rm.use("llama") as again:
            assert torch.equal(logits(again), want)
        stats = rm.stats()
        assert (stats.loads, stats.drops) == (2, 1)
        assert rm.tier_of("llama").name == "gpu"


def test_a_droppable_model_cheaper_to_keep_below_is_demoted(
    tiny_llama: Path, want: torch.Tensor, tmp_path: Path
) -> None:
    rm, _ = _drop_manager(tmp_path, host_bandwidth=10e9)  # µs to write and read back; the load took ms
    with rm:
        rm.add_model("llama", tiny_llama, policy=DROP)
        with rm.use("llama"):
            pass
        rm.apply_pressure(0.85)
        assert rm.tier_of("llama").name == "host" and rm.stats().drops == 0
        with rm.use("llama") as model:
            assert torch.equal(logits(model), want)
        assert rm.stats().loads == 1


def test_a_droppable_model_with_no_room_below_is_dropped_and_one_that_is_not_stays(
    tiny_llama: Path, want: torch.Tensor, tmp_path: Path
) -> None:
    allocator = Allocator(parse_simulation("cuda:0=64MiB,cpu=4GiB"))
    rm = ResidencyManager([get_tier("gpu", allocator=allocator)])  # no tier below
    with rm:
        rm.add_model("kept", tiny_llama)
        rm.add_model("dropped", tiny_llama, policy=DROP)
        for name in ("kept", "dropped"):
            with rm.use(name):
                pass
        rm.apply_pressure(0.85)
        assert rm.tier_of("kept").name == "gpu" and rm.unloaded() == ["dropped"]
        with rm.use("dropped") as model:
            assert torch.equal(logits(model), want)


def test_an_explicit_demote_of_a_droppable_model_moves_it(tiny_llama: Path, tmp_path: Path) -> None:
    rm, _ = _drop_manager(tmp_path, host_bandwidth=1e3)
    with rm:
        rm.add_model("llama", tiny_llama, policy=DROP)
        with rm.use("llama"):
            pass
        rm.demote("llama")
        assert rm.tier_of("llama").name == "host" and rm.stats().drops == 0


def test_uses_racing_drops_always_get_the_model(tiny_llama: Path, want: torch.Tensor, tmp_path: Path) -> None:
    """Four threads use the model while a fifth keeps dropping it: every use gets a whole model
    (loaded again where it was dropped), never a dropped one's meta tensors or an error."""
    rm, allocator = _drop_manager(tmp_path, host_bandwidth=1e3)
    stop = threading.Event()

    def pressure() -> None:
        while not stop.is_set():
            rm.apply_pressure(0.85)

    with rm:
        rm.add_model("llama", tiny_llama, policy=DROP)
        dropper = threading.Thread(target=pressure, daemon=True)
        dropper.start()

        def use(_: int) -> None:
            for _ in range(5):
                with rm.use("llama") as model:
                    assert torch.equal(logits(model), want)

        try:
            assert run_threads(use, 4, 120) == []
        finally:
            stop.set()
            dropper.join(30)
        assert rm.stats().drops >= 1
    assert allocator.usage(GPU).used == 0


def test_a_first_use_while_another_entry_lands_plans_for_room_that_is_never_negative(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """While a copy lands its bytes are both used and still reserved on its tier; the room a
    load is planned for then must be 0 at worst (it was negative, and the load failed with
    InvalidInventory, in the serving benchmark)."""
    rm, _ = _manager(tmp_path, gpu="1MiB")
    with rm:
        rm.register("big", {"w": torch.ones(200 * 1024)})  # 800 KiB of 1 MiB
        mover = rm._mover
        with rm._state:
            mover.reserved[0] += 800 * 1024  # as while "big" was being copied there
        with rm._state:
            assert mover.free(0) >= 0
        rm.add_model("llama", tiny_llama)
        with rm.use("llama"):  # planned for the room there is: the host tier's
            assert rm.tier_of("llama").name == "host"
        with rm._state:
            mover.reserved[0] -= 800 * 1024


def test_a_use_waits_for_the_lease_holding_its_room(tmp_path: Path) -> None:
    rm = ResidencyManager([get_tier("memory", "600KiB", name="gpu", device=GPU), get_tier("disk", tmp_path)])
    with rm:
        rm.register("a", {"w": torch.ones(100 * 1024)})
        rm.register("b", {"w": torch.full((100 * 1024,), 2.0)})
        got: list[float] = []

        def second() -> None:
            with rm.use("b", wait_s=30) as b:
                got.append(float(b["w"][0]))

        with rm.use("a"):
            waiter = threading.Thread(target=second)
            waiter.start()
            time.sleep(0.3)
            assert waiter.is_alive() and not got  # waiting for "a"'s lease
        waiter.join(30)
        assert got == [2.0] and rm.tier_of("b").name == "gpu"


def test_a_model_larger_than_every_tier_is_refused_at_once_even_when_waiting(
    tiny_llama: Path, tmp_path: Path
) -> None:
    rm = ResidencyManager([get_tier("memory", "64KiB", name="gpu", device=GPU), get_tier("disk", tmp_path)])
    with rm:
        rm.add_model("llama", tiny_llama)
        started = time.monotonic()
        with pytest.raises(memplan.DoesNotFit), rm.use("llama", wait_s=30):
            pass
        assert time.monotonic() - started < 10 and rm.unloaded() == ["llama"]


def test_a_model_another_entry_needs_is_never_dropped(tiny_llama: Path, want: torch.Tensor) -> None:
    rm, _ = _drop_manager(Path("."), host_bandwidth=1e3)  # keeping it below costs more than a load
    with rm:
        rm.add_model("llama", tiny_llama, policy=DROP)
        with rm.use("llama"):
            pass
        rm.register("dep", {"w": torch.ones(4)}, needs=["llama"], tier="host")  # below llama
        rm.apply_pressure(0.97)  # critical: everything not pinned or leased leaves, if it can
        assert rm.unloaded() == [] and rm.stats().drops == 0  # dropped, dep's use found no llama
        with rm.use("dep"), rm.use("llama") as model:
            assert torch.equal(logits(model), want)
