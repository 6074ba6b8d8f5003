"""The host probe against fake cgroup trees (v2, v1, nested, unlimited, broken) and the real one."""

from pathlib import Path
from types import SimpleNamespace

import psutil

from memplan import Device
from memplan.gpu._host import HostProbe, read_cgroup_limit

GiB = 2**30


def fake_vm(total: int = 64 * GiB, available: int = 60 * GiB) -> SimpleNamespace:
    return SimpleNamespace(total=total, available=available)


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2_tree(tmp_path: Path, leaf: str, files: dict[str, str]) -> HostProbe:
    root = tmp_path / "cgroup"
    write(root, "cgroup.controllers", "cpu memory pids\n")
    (root / leaf.strip("/")).mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        write(root, rel, text)
    write(tmp_path, "proc_cgroup", f"0::{leaf}\n")
    return HostProbe(cgroup_root=root, proc_cgroup=tmp_path / "proc_cgroup", virtual_memory=fake_vm)


def measure(probe: HostProbe) -> tuple[int, int, str, list[str]]:
    result = probe.measure()
    (memory,) = result.memories
    assert memory.device == Device("cpu")
    return memory.total, memory.free, memory.source, [str(p) for p in result.problems]


def test_v2_limit_caps_host_and_excludes_page_cache(tmp_path: Path) -> None:
    probe = v2_tree(
        tmp_path,
        "/",
        {
            "memory.max": f"{8 * GiB}\n",
            "memory.current": f"{5 * GiB}\n",
            "memory.stat": f"anon 100\ninactive_file {2 * GiB}\nactive_file 7\n",
        },
    )
    assert measure(probe) == (8 * GiB, 5 * GiB, "cgroup", [])


def test_v2_tightest_ancestor_wins(tmp_path: Path) -> None:
    probe = v2_tree(
        tmp_path,
        "/kubepods/pod1/ctr",
        {
            "kubepods/memory.max": f"{32 * GiB}\n",
            "kubepods/memory.current": f"{30 * GiB}\n",  # the node-level group is nearly full
            "kubepods/pod1/memory.max": f"{16 * GiB}\n",
            "kubepods/pod1/memory.current": f"{1 * GiB}\n",
            "kubepods/pod1/ctr/memory.max": "max\n",
            "kubepods/pod1/ctr/memory.current": f"{1 * GiB}\n",
        },
    )
    total, free, source, problems = measure(probe)
    assert (total, source, problems) == (16 * GiB, "cgroup", [])
    assert free == 2 * GiB  # the tighter headroom is the ancestor's, not the pod's


def test_v2_unlimited_reports_psutil(tmp_path: Path) -> None:
    probe = v2_tree(tmp_path, "/", {"memory.max": "max\n", "memory.current": "123\n"})
    assert measure(probe) == (64 * GiB, 60 * GiB, "psutil", [])


def test_limit_above_physical_ram_is_not_a_cap(tmp_path: Path) -> None:
    probe = v2_tree(tmp_path, "/", {"memory.max": f"{128 * GiB}\n", "memory.current": "0\n"})
    assert measure(probe) == (64 * GiB, 60 * GiB, "psutil", [])


def test_free_never_exceeds_what_the_host_has(tmp_path: Path) -> None:
    probe = v2_tree(tmp_path, "/", {"memory.max": f"{8 * GiB}\n", "memory.current": "0\n"})
    probe.virtual_memory = lambda: fake_vm(64 * GiB, 3 * GiB)
    assert measure(probe) == (8 * GiB, 3 * GiB, "cgroup", [])


def v1_tree(tmp_path: Path, limit: str, usage: int, inactive: int) -> HostProbe:
    root = tmp_path / "cgroup"
    write(root, "memory/docker/abc/memory.limit_in_bytes", limit)
    write(root, "memory/docker/abc/memory.usage_in_bytes", str(usage))
    write(root, "memory/docker/abc/memory.stat", f"cache 9\ntotal_inactive_file {inactive}\n")
    write(root, "memory/memory.limit_in_bytes", "9223372036854771712\n")
    write(tmp_path, "proc_cgroup", "12:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    return HostProbe(cgroup_root=root, proc_cgroup=tmp_path / "proc_cgroup", virtual_memory=fake_vm)


def test_v1_limit_caps_host(tmp_path: Path) -> None:
    probe = v1_tree(tmp_path, f"{4 * GiB}\n", 3 * GiB, 1 * GiB)
    assert measure(probe) == (4 * GiB, 2 * GiB, "cgroup", [])


def test_v1_unlimited_reports_psutil(tmp_path: Path) -> None:
    probe = v1_tree(tmp_path, "9223372036854771712\n", GiB, 0)
    assert measure(probe) == (64 * GiB, 60 * GiB, "psutil", [])


def test_no_cgroup_file_at_all_is_not_a_problem(tmp_path: Path) -> None:
    probe = HostProbe(cgroup_root=tmp_path, proc_cgroup=tmp_path / "absent", virtual_memory=fake_vm)
    assert measure(probe) == (64 * GiB, 60 * GiB, "psutil", [])


def test_garbage_limit_is_reported_and_psutil_used(tmp_path: Path) -> None:
    probe = v2_tree(tmp_path, "/", {"memory.max": "lots\n", "memory.current": "0\n"})
    total, free, source, problems = measure(probe)
    assert (total, free, source) == (64 * GiB, 60 * GiB, "psutil")
    assert len(problems) == 1 and problems[0].startswith("cgroup:") and "memory.max" in problems[0]


def test_unreadable_limit_is_reported_and_psutil_used(tmp_path: Path) -> None:
    probe = v2_tree(tmp_path, "/", {"memory.max": "x", "memory.current": "0\n"})
    (tmp_path / "cgroup" / "memory.max").unlink()
    (tmp_path / "cgroup" / "memory.max").mkdir()  # reading a directory fails with an OSError
    _, _, source, problems = measure(probe)
    assert source == "psutil"
    assert "cannot read" in problems[0]


def test_psutil_failure_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    def broken() -> SimpleNamespace:
        raise OSError("no /proc/meminfo")

    probe = HostProbe(cgroup_root=tmp_path, proc_cgroup=tmp_path / "absent", virtual_memory=broken)
    result = probe.measure()
    assert result.memories == []
    assert "no /proc/meminfo" in str(result.problems[0])


def test_real_machine_matches_psutil_and_cgroup() -> None:
    (memory,) = HostProbe().measure().memories
    vm = psutil.virtual_memory()
    cap = read_cgroup_limit(Path("/sys/fs/cgroup"), Path("/proc/self/cgroup"))
    expected_total = min(vm.total, cap.limit) if cap else vm.total
    assert memory.total == expected_total
    # free moves while the test runs; it is psutil's (or the cgroup's) figure within 256 MiB
    expected_free = min(vm.available, cap.headroom) if cap and cap.limit < vm.total else vm.available
    assert abs(memory.free - expected_free) < 256 * 2**20
