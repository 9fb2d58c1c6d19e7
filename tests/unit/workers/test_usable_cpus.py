"""``--workers auto`` sizes by the CPUs the agent may use: its affinity, bounded by the cgroup v2
CPU quota (a DaemonSet's ``resources.limits.cpu``), rounded up."""

from __future__ import annotations

import pytest

from agent.base.cpus import usable_cpus, usable_cpus_here


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
