"""Buffers a model computes in ``__init__`` rather than stores: no header shows them, so a built
skeleton measures them and the estimate counts them where their module runs."""

from __future__ import annotations

from pathlib import Path

import pytest

import memplan
from memplan import Device, Streamed, Workload
from tests.compat.reach import REACH
from tests.loaders.test_load import EXACT


@pytest.fixture(scope="module")
def gpt_neo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import GPTNeoForCausalLM

    reach = next(r for r in REACH if r.name == "gpt_neo")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "gpt-neo"
    GPTNeoForCausalLM(reach.build_config()).save_pretrained(path)
    return path


def test_a_causal_mask_per_layer_is_measured_and_estimated(gpt_neo: Path) -> None:
    checkpoint = memplan.inspect(gpt_neo)
    assert checkpoint.computed_buffers == ()  # the headers alone cannot tell
    measured = memplan.with_computed_buffers(checkpoint)
    masks = dict(measured.computed_buffers)
    # One bool mask of max_positions x max_positions per attention layer.
    assert masks["transformer.h.0.attn.attention"] == masks["transformer.h.1.attn.attention"] == 256 * 256
    cuda = Device("cuda", 0)
    strategy = Streamed(cuda, "disk", resident_layers=1, prefetch_depth=1, dtype="F32")
    before = memplan.estimate(checkpoint, Workload(context=32), strategy, overheads=EXACT).on(cuda)
    after = memplan.estimate(measured, Workload(context=32), strategy, overheads=EXACT).on(cuda)
    assert after.buffers - before.buffers == sum(masks.values())
    assert measured.fingerprint == checkpoint.fingerprint  # plans made either way are for this checkpoint


def test_a_load_plans_with_what_it_measured(gpt_neo: Path) -> None:
    """At the smallest budget that holds the measured estimate, the load's own plan streams and
    its peak stays within that estimate."""
    cuda = Device("cuda", 0)
    measured = memplan.with_computed_buffers(memplan.inspect(gpt_neo))
    strategy = Streamed(cuda, "disk", resident_layers=1, prefetch_depth=1, dtype="F32")
    peak = memplan.estimate(measured, Workload(context=32), strategy, overheads=EXACT).on(cuda).peak
    spec = f"cuda:0={int(peak / 0.9) + 1024},cpu=8GiB"
    allocator = memplan.Allocator(memplan.probe(spec))
    policy = memplan.Policy(order=("streamed-disk",), overheads=EXACT, prefetch_depth=1)
    model = memplan.load(
        gpt_neo, workload=Workload(context=32), policy=policy, allocator=allocator, progress=False
    )
    assert model.memplan.report.strategy.kind == "streamed"
    assert allocator.usage(cuda).peak <= peak


def test_the_plan_command_counts_them_when_asked_to_build(
    gpt_neo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from memplan.cli import main

    simulate = ["--simulate", "cuda:0=1GiB,cpu=8GiB", "--json"]
    plans = []
    for extra in ([], ["--build"]):
        assert main(["plan", str(gpt_neo), *simulate, *extra]) == 0
        plans.append(memplan.Plan.from_json(capsys.readouterr().out))
    cuda = Device("cuda", 0)
    assert plans[1].estimate.on(cuda).buffers - plans[0].estimate.on(cuda).buffers == 2 * 256 * 256


def test_every_tensor_of_a_loaded_model_is_charged_once(tmp_path: Path) -> None:
    """Bark stores its causal masks (persistent buffers): placed from the checkpoint, they were
    charged a second time as computed buffers, and a streamed plan that fitted ran out of memory."""
    import torch
    from transformers import BarkSemanticModel

    reach = next(r for r in REACH if r.name == "bark_semantic")
    torch.manual_seed(0)
    BarkSemanticModel(reach.build_config()).save_pretrained(tmp_path / "bark")
    cuda = Device("cuda", 0)
    allocator = memplan.Allocator(memplan.probe("cuda:0=1GiB,cpu=8GiB"))
    policy = memplan.Policy(order=("full",), overheads=EXACT)
    model = memplan.load(
        tmp_path / "bark", policy=policy, allocator=allocator, progress=False, model_cls=BarkSemanticModel
    )
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    assert allocator.usage(cuda).used == sum(t.numel() * t.element_size() for t in tensors.values())
