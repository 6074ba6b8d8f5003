"""A Ctrl-C (or any interrupt) in the middle of a move, a free or a registration, and close()
racing the others: the manager's books stay whole, and no later move reuses a stale copy.
Found by a hostile review of the concurrent manager; each failed on the code before its fix."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import memplan
from memplan import Allocator, ResidencyManager, get_tier
from memplan.gpu import parse_simulation


def _tiers(tmp_path: Path) -> list[Any]:
    allocator = Allocator(parse_simulation("cuda:0=64MiB,cpu=4GiB"))
    return [get_tier("gpu", allocator=allocator), get_tier("host", "64MiB"), get_tier("disk", tmp_path / "d")]


def _interrupt_once(tier: Any, method: str, *, after: bool = False) -> None:
    """The tier's next ``method`` call raises KeyboardInterrupt, before or after doing its work."""
    real: Callable[..., Any] = getattr(tier, method)
    fired = []

    def once(*args: Any, **kwargs: Any) -> Any:
        if fired:
            return real(*args, **kwargs)
        fired.append(True)
        if after:
            real(*args, **kwargs)
        raise KeyboardInterrupt

    setattr(tier, method, once)


def _books_balance(rm: ResidencyManager) -> None:
    for tier in rm.tiers:
        assert tier.used == rm.held_bytes(tier.name), tier.name


def test_an_interrupted_free_after_a_move_leaves_orphans_never_a_stale_copy(tmp_path: Path) -> None:
    rm = ResidencyManager(_tiers(tmp_path))
    rm.register("e", {"a": torch.zeros(256), "b": torch.zeros(256)}, tier="host")
    _interrupt_once(rm.tiers[1], "drop")  # while the host copy is freed after the promotion
    with pytest.raises(KeyboardInterrupt), rm.use("e"):
        pass
    _books_balance(rm)
    rm.maintain()
    assert rm.orphans("host") == [] and rm.tiers[1].used == 0
    with rm.use("e") as held:
        held["a"].fill_(7)
        held["b"].fill_(7)
    rm.demote("e", "host")
    rm.pin("e", "host")
    with rm.use("e") as back:  # it was 'a' 7, 'b' 0: b's stale host copy was shared
        assert torch.equal(back["a"], torch.full((256,), 7.0))
        assert torch.equal(back["b"], torch.full((256,), 7.0))
    rm.unpin("e")
    rm.close()
    assert all(t.used == 0 for t in rm.tiers)


def test_an_interrupt_just_after_a_put_leaves_no_reference_nobody_holds(tmp_path: Path) -> None:
    rm = ResidencyManager(_tiers(tmp_path))
    rm.register("e", {"a": torch.zeros(256)}, tier="disk")
    _interrupt_once(rm.tiers[0], "put", after=True)  # the gpu copy stored, then Ctrl-C
    with pytest.raises(KeyboardInterrupt), rm.use("e"):
        pass
    _books_balance(rm)
    assert rm.tiers[0].used == 0
    rm.demote("e", "host")
    rm.pin("e", "host")
    with rm.use("e") as held:
        held["a"].fill_(5)
    rm.unpin("e")
    with rm.use("e") as up:  # promoted: it read 0, a leaked gpu copy shared
        assert rm.tier_of("e").name == "gpu" and torch.equal(up["a"], torch.full((256,), 5.0))
    rm.close()
    assert all(t.used == 0 for t in rm.tiers)


def test_an_interrupted_unregister_forgets_the_entry_and_frees_the_rest_later(tmp_path: Path) -> None:
    rm = ResidencyManager(_tiers(tmp_path))
    rm.register("e", {"a": torch.zeros(256), "b": torch.ones(256)}, tier="disk")
    _interrupt_once(rm.tiers[2], "drop")
    with pytest.raises(KeyboardInterrupt):
        rm.unregister("e")
    assert "e" not in rm  # it stayed listed, pointing at keys queued for freeing
    _books_balance(rm)
    rm.maintain()
    assert rm.tiers[2].used == 0 and rm.orphans("disk") == []


def test_close_waits_for_a_registration_under_way_and_refuses_later_ones(tmp_path: Path) -> None:
    rm = ResidencyManager(_tiers(tmp_path))
    gpu = rm.tiers[0]
    real, entered, gate = gpu.put, threading.Event(), threading.Event()

    def slow_put(key: str, tensor: torch.Tensor) -> int:
        entered.set()
        gate.wait(30)
        return real(key, tensor)

    gpu.put = slow_put  # type: ignore[method-assign]
    outcome: list[BaseException | None] = []

    def register() -> None:
        try:
            rm.register("x", {"w": torch.ones(1024)})
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    registering = threading.Thread(target=register)
    registering.start()
    assert entered.wait(30)
    closing = threading.Thread(target=rm.close)
    closing.start()
    closing.join(0.3)
    assert closing.is_alive()  # it waits for the registration: it returned, and 'x' landed after
    gate.set()
    closing.join(30)
    registering.join(30)
    assert not closing.is_alive() and isinstance(outcome[0], memplan.ManagerClosed)
    assert rm.names() == [] and gpu.used == 0
    with pytest.raises(memplan.ManagerClosed):
        rm.register("y", {"w": torch.ones(4)})


def test_no_lease_outlives_close(tmp_path: Path) -> None:
    """close() checks the leases and shuts the door in one step: a use either comes first (and
    close is refused) or after (and is refused)."""
    rm = ResidencyManager(_tiers(tmp_path)).start()
    rm.register("e", torch.nn.Linear(8, 8))
    with rm.use("e"), pytest.raises(memplan.EntryInUse):
        rm.close()
    real_stop, stopping, leased = rm._worker.stop, threading.Event(), []

    def slow_stop() -> None:  # a worker in the middle of a pass: close waits for it
        stopping.set()
        real_stop()

    rm._worker.stop = slow_stop  # type: ignore[method-assign]
    closing = threading.Thread(target=rm.close)
    closing.start()
    assert stopping.wait(30)
    with pytest.raises(memplan.ManagerClosed), rm.use("e"):
        leased.append(True)
    closing.join(30)
    assert leased == [] and all(t.used == 0 for t in rm.tiers)
