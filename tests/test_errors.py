import pytest

import memplan
from memplan import Device


def test_every_error_is_a_memplan_error_with_fields() -> None:
    oom = memplan.DeviceOutOfMemory(Device("cuda", 1), 3 * 2**30, 2**30)
    assert (oom.device, oom.requested, oom.available) == (Device("cuda", 1), 3 * 2**30, 2**30)
    assert str(oom) == "cuda:1 is out of memory: asked for 3.0 GiB, 1.0 GiB left"

    fit = memplan.DoesNotFit(141 * 2**30, 79 * 2**30, Device("cuda", 0))
    assert str(fit) == "needs 141.0 GiB, cuda:0 has 79.0 GiB available"
    assert fit.needed == 141 * 2**30

    ckpt = memplan.CheckpointError("model-00001.safetensors", "offsets overlap", tensor="lm_head.weight")
    assert "model-00001.safetensors" in str(ckpt) and "lm_head.weight" in str(ckpt)

    remote = memplan.RemoteTierError("remote", "layer.3", "gave up after 5 tries")
    assert isinstance(remote, memplan.TierError)
    for exc in (oom, fit, ckpt, remote, memplan.PinViolation("m", "pinned to gpu")):
        assert isinstance(exc, memplan.MemplanError)


def test_errors_are_exported_in_all() -> None:
    for name in (
        "MemplanError",
        "CheckpointError",
        "SimulationSpecError",
        "DoesNotFit",
        "DeviceOutOfMemory",
        "PinViolation",
        "TierError",
        "RemoteTierError",
    ):
        assert name in memplan.__all__
        assert issubclass(getattr(memplan, name), memplan.MemplanError)


def test_invalid_device_is_typed() -> None:
    with pytest.raises(memplan.InvalidDevice):
        Device("tpu", 0)  # type: ignore[arg-type]
