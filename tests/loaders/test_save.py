"""A model memplan loaded saves what transformers would: ``save_pretrained`` on a streamed or
offloaded model reads each streamed layer from its source tier (no meta tensors), and
``from_pretrained`` of what it wrote gives the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import memplan
from memplan import Device, Sharded, Streamed
from tests.loaders.test_load import logits, plan_only, tight_spec, transformers_logits

CUDA0 = Device("cuda", 0)


def streamed_plan(path: Path, source: str) -> memplan.Plan:
    strategy = Streamed(CUDA0, source, resident_layers=1, prefetch_depth=1, dtype="BF16")  # type: ignore[arg-type]
    return plan_only(path, f"streamed-{source}", tight_spec(path, strategy), prefetch_depth=1)


def offloaded_plan(path: Path) -> memplan.Plan:
    chosen = plan_only(path, "offloaded", f"cuda:0={memplan.inspect(path).nbytes * 0.6:.0f},cpu=8GiB")
    assert isinstance(chosen.strategy, Sharded) and chosen.strategy.offloaded
    return chosen


@pytest.mark.parametrize("kind", ["streamed-disk", "streamed-host", "offloaded"])
def test_a_streamed_or_offloaded_model_saves_and_reloads_the_same(
    tiny_llama: Path, want: torch.Tensor, tmp_path: Path, kind: str
) -> None:
    chosen = (
        offloaded_plan(tiny_llama) if kind == "offloaded" else streamed_plan(tiny_llama, kind.split("-")[1])
    )
    model = memplan.load(tiny_llama, plan=chosen, progress=False)
    state = model.state_dict()
    assert not any(t.is_meta for t in state.values())
    model.save_pretrained(tmp_path / "saved")
    assert torch.equal(transformers_logits(tmp_path / "saved"), want)
    assert torch.equal(logits(model), want)  # saving left the streamed model working
    assert all(t.is_meta for n, t in model.named_parameters() if ".layers.3." in n)  # still streamed
