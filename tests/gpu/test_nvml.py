import pytest

from memplan import Device
from memplan.gpu._nvml import NvmlProbe, visible_nvml_indices
from tests.gpu.fakes import FakeGpu, FakeNvml, GiB

UUIDS = ["GPU-8c3f0000-aaaa", "GPU-1b2e0000-bbbb", "GPU-77770000-cccc"]


def nvml_probe(nvml: FakeNvml, visible: str | None = None) -> NvmlProbe:
    return NvmlProbe(nvml=nvml, visible_devices=visible, read_env=False, own_pid=100)


def test_no_pynvml_module_means_no_cuda_devices() -> None:
    result = NvmlProbe(load=lambda: None, read_env=False).measure()
    assert result.memories == [] and result.problems == []


@pytest.mark.parametrize("code", [9, 12])  # driver not loaded, library not found
def test_no_driver_means_no_cuda_devices_not_an_error(code: int) -> None:
    result = nvml_probe(FakeNvml([], init_error=code)).measure()
    assert result.memories == [] and result.problems == []


def test_other_init_failure_is_reported() -> None:
    result = nvml_probe(FakeNvml([], init_error=4)).measure()  # NO_PERMISSION
    assert result.memories == []
    assert "cannot initialise NVML" in str(result.problems[0])


def test_zero_devices() -> None:
    nvml = FakeNvml([])
    result = nvml_probe(nvml).measure()
    assert result.memories == [] and result.problems == []
    assert nvml.shutdowns == 1


def test_one_device_with_other_processes() -> None:
    gpu = FakeGpu(
        UUIDS[0],
        total=80 * GiB,
        free=70 * GiB,
        processes=[(100, 2 * GiB), (200, 5 * GiB), (300, None)],
    )
    (memory,) = nvml_probe(FakeNvml([gpu])).measure().memories
    assert memory.device == Device("cuda", 0)
    assert (memory.total, memory.free, memory.source) == (80 * GiB, 70 * GiB, "nvml")
    assert memory.reserved_by_others == 5 * GiB  # own pid 100 excluded, unknown usage counted 0
    assert memory.name == "NVIDIA H100 80GB HBM3"


def test_two_devices() -> None:
    gpus = [FakeGpu(UUIDS[0], free=10 * GiB), FakeGpu(UUIDS[1], free=20 * GiB)]
    memories = nvml_probe(FakeNvml(gpus)).measure().memories
    assert [(str(m.device), m.free) for m in memories] == [
        ("cuda:0", 10 * GiB),
        ("cuda:1", 20 * GiB),
    ]


def test_a_failing_device_is_reported_and_the_others_kept() -> None:
    gpus = [FakeGpu(UUIDS[0], fail_memory=True), FakeGpu(UUIDS[1])]
    result = nvml_probe(FakeNvml(gpus)).measure()
    assert [str(m.device) for m in result.memories] == ["cuda:1"]
    assert "cuda:0" in str(result.problems[0]) and "GPU is lost" in str(result.problems[0])


def test_process_listing_failure_keeps_the_device() -> None:
    result = nvml_probe(FakeNvml([FakeGpu(UUIDS[0], fail_processes=True)])).measure()
    assert len(result.memories) == 1 and result.memories[0].reserved_by_others == 0
    assert "cannot list processes" in str(result.problems[0])


def test_enumeration_failure_and_shutdown_failure_are_reported() -> None:
    nvml = FakeNvml([FakeGpu(UUIDS[0])], count_error=True, shutdown_error=True)
    result = nvml_probe(nvml).measure()
    assert result.memories == []
    assert [p.source for p in result.problems] == ["nvml", "nvml"]
    assert nvml.shutdowns == 1


def test_cuda_visible_devices_renumbers_like_cuda() -> None:
    gpus = [FakeGpu(u, free=(i + 1) * GiB) for i, u in enumerate(UUIDS)]
    memories = nvml_probe(FakeNvml(gpus), visible="2,0").measure().memories
    assert [(str(m.device), m.free) for m in memories] == [("cuda:0", 3 * GiB), ("cuda:1", 1 * GiB)]


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        (None, [0, 1, 2]),
        ("", []),
        ("-1", []),
        ("1", [1]),
        ("2, 0", [2, 0]),
        ("0,7,1", [0]),  # like CUDA, an entry that names no device ends the list
        ("GPU-1b2e", [1]),
        ("GPU-77770000-cccc,0", [2, 0]),
        ("GPU-", []),  # ambiguous prefix
        ("1,1", [1]),
    ],
)
def test_visible_indices(visible: str | None, expected: list[int]) -> None:
    assert visible_nvml_indices(3, UUIDS, visible) == expected


def test_environment_variable_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    gpus = [FakeGpu(UUIDS[0]), FakeGpu(UUIDS[1], free=5 * GiB)]
    (memory,) = NvmlProbe(nvml=FakeNvml(gpus)).measure().memories
    assert memory.free == 5 * GiB


def test_real_pynvml_probe_reports_no_problem_here() -> None:
    result = NvmlProbe().measure()
    assert result.problems == []
