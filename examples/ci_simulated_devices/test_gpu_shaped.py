"""How a user's own test suite runs GPU-shaped tests on CPU CI with memplan's pytest plugin."""

from __future__ import annotations

import pytest
import torch

import memplan
from memplan.testing import LLAMA_SHAPES, write_llama_checkpoint


@pytest.fixture(scope="module")
def llama_8b(tmp_path_factory: pytest.TempPathFactory) -> object:
    # Real headers, no real data: an 8B checkpoint's shape for the cost of its headers.
    return write_llama_checkpoint(tmp_path_factory.mktemp("models") / "llama-8b", LLAMA_SHAPES["8b"])


@pytest.mark.memplan_devices("cuda:0=80GiB,cpu=256GiB")
def test_an_80gb_card_loads_8b_in_full(llama_8b: object) -> None:
    chosen = memplan.plan(memplan.inspect(llama_8b), memplan.probe())
    assert chosen.strategy.kind == "full"


@pytest.mark.memplan_devices("cuda:0=12GiB,cpu=64GiB,disk=1TiB")
def test_a_12gb_card_needs_quantization_for_8b(llama_8b: object) -> None:
    chosen = memplan.plan(
        memplan.inspect(llama_8b), memplan.probe(), policy=memplan.Policy(allow_quantization=True)
    )
    assert chosen.strategy.kind == "quantized"


@pytest.mark.memplan_devices("cuda:0=1MiB,cpu=1GiB")
def test_the_simulated_budget_is_enforced(simulated_allocator: memplan.Allocator) -> None:
    gpu = memplan.Device("cuda", 0)
    kept = simulated_allocator.place(torch.zeros(128 * 1024, dtype=torch.uint8), gpu)
    with pytest.raises(memplan.DeviceOutOfMemory) as caught:
        simulated_allocator.place(torch.zeros(1024 * 1024, dtype=torch.uint8), gpu)
    assert caught.value.device == gpu and kept.numel() == 128 * 1024


def test_the_default_machine(simulated_devices: memplan.Inventory) -> None:
    assert simulated_devices.simulated and memplan.Device("cuda", 0) in simulated_devices
