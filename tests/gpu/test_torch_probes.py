from memplan import Device
from memplan.gpu._torch import MpsProbe, TorchCudaProbe
from tests.gpu.fakes import FakeTorchCuda, GiB, fake_torch


def test_no_torch_imported_means_no_torch_figures() -> None:
    probe = TorchCudaProbe(find_torch=lambda: None)
    assert probe.measure().memories == []


def test_cuda_not_initialised_is_left_alone() -> None:
    cuda = FakeTorchCuda([(GiB, 2 * GiB)], initialised=False)
    assert TorchCudaProbe(torch=fake_torch(cuda)).measure().memories == []


def test_cuda_initialised_reports_mem_get_info() -> None:
    cuda = FakeTorchCuda([(20 * GiB, 24 * GiB), (23 * GiB, 24 * GiB)])
    memories = TorchCudaProbe(torch=fake_torch(cuda)).measure().memories
    assert [(m.device, m.free, m.total, m.source) for m in memories] == [
        (Device("cuda", 0), 20 * GiB, 24 * GiB, "torch"),
        (Device("cuda", 1), 23 * GiB, 24 * GiB, "torch"),
    ]


def test_broken_cuda_is_reported() -> None:
    cuda = FakeTorchCuda([], broken=True)
    result = TorchCudaProbe(torch=fake_torch(cuda)).measure()
    assert result.memories == [] and "driver version" in str(result.problems[0])


def test_mps_present() -> None:
    (memory,) = MpsProbe(torch=fake_torch(mps=(36 * GiB, 6 * GiB))).measure().memories
    assert (memory.device, memory.total, memory.free) == (Device("mps"), 36 * GiB, 30 * GiB)


def test_mps_absent() -> None:
    result = MpsProbe(torch=fake_torch(mps=None)).measure()
    assert result.memories == [] and result.problems == []


def test_mps_broken_backend_is_reported() -> None:
    result = MpsProbe(torch=fake_torch(mps_error="Metal device lost")).measure()
    assert result.memories == []
    assert str(result.problems[0]) == "mps: MPS backend is broken: Metal device lost"


def test_mps_probe_does_not_import_torch_off_macos() -> None:
    import sys

    if sys.platform != "darwin":
        assert MpsProbe().torch is None
