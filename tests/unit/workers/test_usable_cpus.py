"""``--workers auto`` sizes by the CPUs the agent may use: its affinity, bounded by the cgroup CPU
quotas of its cgroup and its ancestors (a DaemonSet's ``resources.limits.cpu``), rounded up."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.base.cpus import cgroup_quotas, usable_cpus, usable_cpus_here


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "expected"),
    [
        (8, None, 8),  # no cgroup v2 file
        (8, "max 100000\n", 8),  # no quota
        (8, "200000 100000\n", 2),  # limits.cpu: 2
        (8, "150000 100000\n", 2),  # 1.5 CPUs of time: two loops can use it
        (8, "50000 100000\n", 1),  # half a CPU
        (2, "800000 100000\n", 2),  # the quota allows more than the cpuset has
        (0, None, 1),
        (4, "garbage\n", 4),  # unreadable: bounds nothing
        (4, "x 100000\n", 4),
        (4, "0 100000\n", 4),
    ],
)
def test_affinity_bounded_by_the_quota(affinity: int, cpu_max: str | None, expected: int) -> None:
    assert usable_cpus(affinity, cpu_max) == expected


def test_this_process_has_at_least_one() -> None:
    assert usable_cpus_here() >= 1


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_v2_the_tightest_quota_of_the_cgroup_and_its_ancestors_counts(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "kubepods.slice/cpu.max": "max 100000\n",
            "kubepods.slice/pod1/cpu.max": "200000 100000\n",  # the pod: 2 CPUs
            "kubepods.slice/pod1/agent/cpu.max": "max 100000\n",  # the container: none
        },
    )
    quotas = cgroup_quotas("0::/kubepods.slice/pod1/agent\n", root)
    assert quotas == ["max 100000\n", "200000 100000\n", "max 100000\n"]
    assert usable_cpus(8, *quotas) == 2


def test_v1_the_cpu_controllers_cfs_quota_counts_and_minus_one_is_none(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
            "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
            "cpu,cpuacct/kubepods/pod1/cpu.cfs_quota_us": "150000\n",
            "cpu,cpuacct/kubepods/pod1/cpu.cfs_period_us": "100000\n",
        },
    )
    proc = "12:memory:/kubepods/pod1\n4:cpu,cpuacct:/kubepods/pod1\n0::/\n"
    quotas = cgroup_quotas(proc, root)
    assert quotas == ["150000 100000", "-1 100000"]  # the v2 root has no cpu.max
    assert usable_cpus(8, *quotas) == 2
    assert usable_cpus(8, *cgroup_quotas("4:cpu,cpuacct:/\n", root)) == 8  # the root: no quota


def test_a_container_mount_without_the_host_path_reads_the_mount_itself(tmp_path: Path) -> None:
    """No cgroup namespace: /proc/self/cgroup names the host's path, which does not exist under
    the container's mount of its own cgroup."""
    root = _tree(tmp_path, {"cpu.max": "100000 100000\n"})
    assert usable_cpus(8, *cgroup_quotas("0::/kubepods.slice/pod1/agent\n", root)) == 1
    assert cgroup_quotas("garbage\n", root) == []
