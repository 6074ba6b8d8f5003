"""The allocator: simulated accelerators enforce their budget with the error a real OOM maps to."""

import gc
import threading

import pytest
import torch

import memplan
from memplan import Allocator, Device, DeviceOutOfMemory, InvalidDevice, InvalidSize
from memplan.gpu import mapped_oom

MiB = 2**20
CUDA0, CUDA1, CPU = Device("cuda", 0), Device("cuda", 1), Device("cpu")


def allocator(spec: str = "cuda:0=64MiB,cuda:1=64MiB@32MiB,cpu=1GiB") -> Allocator:
    return Allocator(memplan.probe(spec))


def test_budgets_start_at_each_device_free_figure() -> None:
    alloc = allocator()
    assert alloc.available(CUDA0) == 64 * MiB and alloc.available(CUDA1) == 32 * MiB
    assert alloc.devices() == [CUDA0, CUDA1, CPU]


def test_reserve_release_and_overflow() -> None:
    alloc = allocator()
    first = alloc.reserve(CUDA0, 40 * MiB, label="layer 0")
    with pytest.raises(DeviceOutOfMemory) as info:
        alloc.reserve(CUDA0, 30 * MiB)
    assert (info.value.device, info.value.requested, info.value.available) == (
        CUDA0,
        30 * MiB,
        24 * MiB,
    )
    assert alloc.usage(CUDA0).used == 40 * MiB  # the failed request holds nothing
    first.release()
    first.release()  # idempotent
    with alloc.reserve(CUDA0, 64 * MiB):
        assert alloc.available(CUDA0) == 0
    usage = alloc.usage(CUDA0)
    assert (usage.used, usage.peak, usage.failures, usage.reservations) == (0, 64 * MiB, 1, 0)


def test_reserve_rejects_negative_and_unknown_devices() -> None:
    alloc = allocator()
    with pytest.raises(InvalidSize):
        alloc.reserve(CUDA0, -1)
    with pytest.raises(InvalidDevice, match="cuda:0, cuda:1, cpu"):
        alloc.reserve(Device("cuda", 5), 1)


def test_placed_tensor_is_charged_until_collected() -> None:
    alloc = allocator()
    weights = alloc.place(torch.ones(8 * MiB // 4), CUDA0)  # 8 MiB of float32
    assert weights.device.type == "cpu"  # simulated: the data stays in host memory
    assert alloc.device_of(weights) == CUDA0
    assert alloc.usage(CUDA0).used == 8 * MiB
    view = weights[:1024]
    assert alloc.place(view, CUDA0).data_ptr() == view.data_ptr()
    assert alloc.usage(CUDA0).used == 8 * MiB  # one storage is charged once
    del weights, view
    gc.collect()
    assert alloc.usage(CUDA0).used == 0


def test_going_over_a_simulated_gpu_raises_device_out_of_memory() -> None:
    alloc = allocator()
    keep = [
        alloc.place(torch.empty(16 * MiB, dtype=torch.uint8), CUDA1),
        alloc.place(torch.empty(16 * MiB, dtype=torch.uint8), CUDA1),
    ]
    with pytest.raises(DeviceOutOfMemory) as info:
        alloc.place(torch.empty(1, dtype=torch.uint8), CUDA1)
    assert info.value.device == CUDA1 and info.value.available == 0
    assert alloc.usage(CUDA1).used == 32 * MiB
    del keep


def test_moving_between_simulated_devices_copies_and_charges_both() -> None:
    alloc = allocator()
    on0 = alloc.place(torch.arange(MiB, dtype=torch.uint8), CUDA0)
    on1 = alloc.place(on0, CUDA1)
    assert on1.data_ptr() != on0.data_ptr() and torch.equal(on0, on1)
    assert alloc.usage(CUDA0).used == MiB and alloc.usage(CUDA1).used == MiB
    del on0
    gc.collect()
    assert alloc.usage(CUDA0).used == 0 and alloc.usage(CUDA1).used == MiB


def test_concurrent_reservations_never_oversubscribe() -> None:
    alloc = allocator()
    held: list[memplan.gpu.Reservation] = []
    failures: list[DeviceOutOfMemory] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(200):
            try:
                r = alloc.reserve(CUDA0, MiB)
            except DeviceOutOfMemory as exc:
                with lock:
                    failures.append(exc)
                continue
            with lock:
                held.append(r)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(held) == 64 and len(failures) == 800 - 64
    assert alloc.usage(CUDA0).used == 64 * MiB


def test_real_torch_oom_maps_to_device_out_of_memory() -> None:
    with pytest.raises(DeviceOutOfMemory) as info, mapped_oom(CUDA0, 123):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert (info.value.device, info.value.requested) == (CUDA0, 123)
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)


def test_mps_style_oom_and_other_errors() -> None:
    with pytest.raises(DeviceOutOfMemory), mapped_oom(Device("mps"), 1):
        raise RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)")
    with pytest.raises(ValueError), mapped_oom(CUDA0, 1):
        raise ValueError("not an OOM")


def test_real_cpu_inventory_places_on_cpu() -> None:
    alloc = Allocator(memplan.probe(probes=[memplan.gpu.get_probe("host")]))
    t = alloc.place(torch.zeros(4), CPU)
    assert alloc.usage(CPU).used == 16
    del t


def test_an_unknown_probe_name_is_a_typed_error_naming_the_known_ones() -> None:
    with pytest.raises(memplan.InvalidOption, match="nvml") as raised:
        memplan.gpu.get_probe("cuda-magic")
    assert raised.value.option == "probe" and raised.value.value == "cuda-magic"
