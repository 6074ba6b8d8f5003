"""Quiet output (issue 21.3): bitsandbytes' import-time note about the ``kernels`` package and its
per-layer int8 cast message stay out of memplan's own commands; ``--json`` prints only JSON; the
filter is on those two messages of bitsandbytes' own loggers only, for memplan's call alone."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import memplan
from memplan import Device, Full, Quantized, Workload

CUDA0 = Device("cuda", 0)
NOISE = ("kernels-community", "MatMul8bitLt", "will be cast")


def int8_spec(path: Path) -> str:
    """A simulated GPU on which full does not fit and int8 does: the CLI's plan quantizes."""
    checkpoint, workload = memplan.inspect(path), Workload(context=64)
    full = memplan.estimate(checkpoint, workload, Full(CUDA0, "BF16")).on(CUDA0).peak
    int8 = memplan.estimate(checkpoint, workload, Quantized("int8", CUDA0, "BF16")).on(CUDA0).peak
    assert int8 < full
    return f"cuda:0={int((int8 + full) / 2 / 0.9)},cpu=8GiB"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memplan", *args], capture_output=True, text=True, check=False
    )


def test_an_int8_load_and_its_forward_print_no_bitsandbytes_noise(tiny_llama: Path) -> None:
    spec = int8_spec(tiny_llama)
    out = run(
        "load", str(tiny_llama), "--simulate", spec, "--context", "64", "--allow-quantization", "--json"
    )
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)  # nothing but JSON on stdout
    assert printed["report"]["strategy"]["method"] == "int8"
    assert "seconds" in printed["forward"]  # the forward ran, through every int8 layer
    assert not [line for line in out.stderr.splitlines() if any(n in line for n in NOISE)], out.stderr


@pytest.mark.parametrize("command", [["plan", "--allow-quantization"], ["doctor"]])
def test_plan_and_doctor_print_no_bitsandbytes_noise(tiny_llama: Path, command: list[str]) -> None:
    out = run(command[0], str(tiny_llama), *command[1:], "--json")
    assert out.returncode == 0, out.stderr
    json.loads(out.stdout)
    assert not [line for line in out.stderr.splitlines() if any(n in line for n in NOISE)], out.stderr


def test_the_filter_holds_only_inside_memplans_call(caplog: pytest.LogCaptureFixture) -> None:
    from memplan._bnb import quiet_bitsandbytes

    logger = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        with quiet_bitsandbytes():
            logger.warning("MatMul8bitLt: inputs will be cast from %s to float16", "bf16")
            logger.warning("something else bitsandbytes says")
        logger.warning("MatMul8bitLt: inputs will be cast from %s to float16", "bf16")
    assert [r.getMessage() for r in caplog.records] == [
        "something else bitsandbytes says",
        "MatMul8bitLt: inputs will be cast from bf16 to float16",
    ]
    assert not logger.filters


def test_a_quantized_load_without_bitsandbytes_names_the_extra(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    chosen = memplan.plan(
        memplan.inspect(tiny_llama), memplan.probe("cpu=8GiB"), Workload(context=64),
        memplan.Policy(order=("int8",), allow_quantization=True),
    )  # fmt: skip
    with pytest.raises(memplan.MissingDependency) as caught:
        memplan.load(tiny_llama, plan=chosen, progress=False)
    assert (caught.value.package, caught.value.extra) == ("bitsandbytes", "quant")


def test_once_imported_bitsandbytes_is_handed_back_without_touching_logging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Asked for once per tensor of a load: a Ctrl-C inside logging.getLogger leaves logging's
    module lock held, and every other thread's logging (s3fs's, a server's) hangs for good."""
    import memplan._bnb
    from memplan._bnb import import_bitsandbytes

    bnb = import_bitsandbytes("quantized loading")

    def touched() -> None:
        raise AssertionError("bitsandbytes' loggers touched")

    monkeypatch.setattr(memplan._bnb, "quiet_bitsandbytes", touched)
    assert import_bitsandbytes("quantized loading") is bnb
