import ast
from pathlib import Path

import pytest

import memplan
from memplan import Device

ROOT = Path(memplan.__file__).parent


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


def test_every_error_in_memplan_errors_is_exported_from_memplan() -> None:
    import memplan.errors

    missing = sorted(set(memplan.errors.__all__) - set(memplan.__all__))
    assert not missing
    for name in memplan.errors.__all__:
        assert issubclass(getattr(memplan, name), memplan.MemplanError)


def test_a_bad_setting_names_the_option_the_value_and_the_rule() -> None:
    with pytest.raises(memplan.InvalidOption) as caught:
        memplan.RetentionPolicy(priority=0)
    assert (caught.value.option, caught.value.value, caught.value.requirement) == ("priority", 0, "be > 0")
    assert str(caught.value) == "priority must be > 0, not 0"


def test_impossible_memory_figures_name_the_device() -> None:
    with pytest.raises(memplan.InvalidInventory, match="exceeds total") as caught:
        memplan.DeviceMemory(Device("cuda", 1), total=2**30, free=2**31, source="nvml")
    assert caught.value.device == Device("cuda", 1)
    cpu = memplan.DeviceMemory(Device("cpu"), total=2**30, free=2**29, source="psutil")
    with pytest.raises(memplan.InvalidInventory, match="once") as twice:
        memplan.Inventory((cpu, cpu))
    assert twice.value.device == Device("cpu")


def _bare_memplan_errors(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [
        f"{path.relative_to(ROOT.parent)}:{node.lineno}"
        for node in sorted(ast.walk(tree), key=lambda n: getattr(n, "lineno", 0))
        if isinstance(node, ast.Raise)
        and isinstance(node.exc, ast.Call)
        and isinstance(node.exc.func, ast.Name)
        and node.exc.func.id == "MemplanError"
    ]


def test_no_bare_memplan_error_is_raised() -> None:
    """STYLE 16: every error memplan raises is a subclass a caller can catch and read fields of."""
    bare = [where for path in sorted(ROOT.rglob("*.py")) for where in _bare_memplan_errors(path)]
    assert not bare, (
        "raise a MemplanError subclass with fields instead of MemplanError(...) at:\n" + "\n".join(bare)
    )
