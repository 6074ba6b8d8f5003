"""A skeleton built on one thread leaves modules other threads build meanwhile alone."""

from __future__ import annotations

import threading

import torch
from torch import nn

from memplan.loaders._skeleton import empty_parameters


def test_a_module_built_on_another_thread_during_a_skeleton_build_gets_real_parameters() -> None:
    inside, leave = threading.Event(), threading.Event()
    built: dict[str, nn.Linear] = {}

    def skeleton() -> None:
        with empty_parameters():
            built["skeleton"] = nn.Linear(4, 4)
            inside.set()
            leave.wait(10)
            built["skeleton, later"] = nn.Linear(4, 4)

    builder = threading.Thread(target=skeleton)
    builder.start()
    try:
        assert inside.wait(10)
        elsewhere = nn.Linear(4, 4)  # a user's thread, or another library's, meanwhile
    finally:
        leave.set()
        builder.join(10)
    assert elsewhere.weight.device.type == "cpu" and elsewhere.bias.device.type == "cpu"
    assert not hasattr(elsewhere.weight, "_is_hf_initialized")
    assert all(p.is_meta for m in built.values() for p in m.parameters())
    assert nn.Linear(2, 2).weight.device.type == "cpu"  # and nothing is left patched


def test_skeletons_built_on_two_threads_at_once_both_get_meta_parameters() -> None:
    """Overlapping builds: the first to leave must not end the second's."""
    first_in, first_out = threading.Event(), threading.Event()
    built: list[nn.Module] = []

    def first() -> None:
        with empty_parameters():
            first_in.set()
            first_out.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    assert first_in.wait(10)
    with empty_parameters():
        built.append(nn.Linear(3, 3))
        first_out.set()
        thread.join(10)
        built.append(nn.Linear(3, 3))  # after the first build left
        with empty_parameters():  # nested on one thread
            built.append(nn.Linear(3, 3))
        built.append(nn.Linear(3, 3))
    assert all(p.is_meta for m in built for p in m.parameters())
    assert not nn.Linear(2, 2).weight.is_meta


def test_buffers_stay_real_and_parameters_are_marked_initialised() -> None:
    with empty_parameters():
        norm = nn.BatchNorm1d(4)
    assert norm.weight.is_meta and norm.running_mean.device.type == "cpu"
    assert norm.weight._is_hf_initialized  # type: ignore[attr-defined]
    assert torch.equal(norm.running_var, torch.ones(4))
