import pytest
from hypothesis import given
from hypothesis import strategies as st

from memplan import Device, DeviceMemory, InvalidDevice, Inventory, MemplanError
from memplan.gpu import ProbeProblem


@pytest.mark.parametrize(
    ("text", "device", "shown"),
    [
        ("cuda:0", Device("cuda", 0), "cuda:0"),
        ("cuda", Device("cuda", 0), "cuda:0"),
        ("CUDA:3", Device("cuda", 3), "cuda:3"),
        ("cpu", Device("cpu"), "cpu"),
        ("cpu:0", Device("cpu"), "cpu"),
        ("mps", Device("mps"), "mps"),
        ("disk", Device("disk"), "disk"),
        ("remote", Device("remote"), "remote"),
    ],
)
def test_device_parse_and_str(text: str, device: Device, shown: str) -> None:
    assert Device.parse(text) == device
    assert str(device) == shown
    assert Device.parse(str(device)) == device


@pytest.mark.parametrize("bad", ["", "gpu:0", "cuda:-1", "cuda:x", "cuda:", "cuda:1.5", ":0", "tpu"])
def test_device_parse_rejects(bad: str) -> None:
    with pytest.raises(InvalidDevice):
        Device.parse(bad)


def test_device_rejects_untyped_index() -> None:
    with pytest.raises(InvalidDevice):
        Device("cuda", True)
    with pytest.raises(InvalidDevice):
        Device("cuda", "0")  # type: ignore[arg-type]


def test_device_is_hashable_ordered_and_knows_torch_names() -> None:
    devices = [Device("disk"), Device("cpu"), Device("cuda", 1), Device("cuda", 0)]
    assert sorted(devices) == [Device("cuda", 0), Device("cuda", 1), Device("cpu"), Device("disk")]
    assert len({Device("cuda", 0), Device.parse("cuda:0")}) == 1
    assert Device("cuda", 1).torch_name == "cuda:1" and Device("cuda", 1).is_accelerator
    assert not Device("cpu").is_accelerator
    with pytest.raises(InvalidDevice):
        _ = Device("disk").torch_name


def test_device_memory_validates() -> None:
    with pytest.raises(MemplanError, match="exceeds total"):
        DeviceMemory(Device("cuda", 0), 10, 11, "nvml")
    with pytest.raises(MemplanError, match="negative"):
        DeviceMemory(Device("cuda", 0), -1, 0, "nvml")
    mem = DeviceMemory(Device("cuda", 0), 100, 25, "nvml")
    assert mem.used == 75 and mem.used_ratio == 0.75


def _inventory() -> Inventory:
    return Inventory(
        (
            DeviceMemory(Device("cpu"), 64 << 30, 60 << 30, "cgroup"),
            DeviceMemory(Device("cuda", 1), 24 << 30, 24 << 30, "nvml", 0, "A10"),
            DeviceMemory(Device("cuda", 0), 24 << 30, 20 << 30, "torch", 2 << 30, "A10"),
        ),
        (ProbeProblem("mps", "broken"),),
    )


def test_inventory_lookup_totals_and_order() -> None:
    inv = _inventory()
    assert [str(m.device) for m in inv] == ["cuda:0", "cuda:1", "cpu"]
    assert inv[Device("cuda", 0)].free == 20 << 30
    assert Device("cuda", 1) in inv and Device("mps") not in inv
    assert inv.get(Device("mps")) is None
    assert inv.total("cuda") == 48 << 30 and inv.free("cuda") == 44 << 30
    assert [m.device for m in inv.accelerators] == [Device("cuda", 0), Device("cuda", 1)]
    with pytest.raises(InvalidDevice, match="cuda:0, cuda:1, cpu"):
        inv[Device("cuda", 7)]


def test_inventory_rejects_a_device_twice() -> None:
    cpu = DeviceMemory(Device("cpu"), 1, 1, "psutil")
    with pytest.raises(MemplanError, match="once"):
        Inventory((cpu, cpu))


def test_inventory_json_round_trip() -> None:
    inv = _inventory()
    assert Inventory.from_json(inv.to_json()) == inv


_memories = st.builds(
    lambda kind, index, total, frac, others: DeviceMemory(
        Device(kind, index if kind == "cuda" else 0), total, int(total * frac), "simulated", others
    ),
    st.sampled_from(["cuda", "cpu", "disk", "mps", "remote"]),
    st.integers(0, 15),
    st.integers(0, 2**50),
    st.floats(0, 1),
    st.integers(0, 2**40),
)


@given(st.lists(_memories, max_size=8, unique_by=lambda m: m.device), st.booleans())
def test_inventory_json_round_trip_property(memories: list[DeviceMemory], simulated: bool) -> None:
    inv = Inventory(tuple(memories), simulated=simulated)
    assert Inventory.from_json(inv.to_json()) == inv
