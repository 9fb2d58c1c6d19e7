"""How many CPUs this process may use: what ``--workers auto`` sizes the proxy by.

``os.cpu_count()`` counts the machine's CPUs, not the agent's: a DaemonSet pod is confined by its
CPU affinity (cpuset) and throttled by its cgroup's CPU quota (``resources.limits.cpu`` becomes
``cpu.max`` under cgroup v2). More event loops than the quota allows only add processes that take
turns on the same CPU time, so the quota, rounded up, bounds the count as much as the affinity.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cpus(affinity: int, cpu_max: str | None) -> int:
    """``affinity`` CPUs, bounded by a cgroup v2 ``cpu.max`` line (``"max 100000"`` or
    ``"<quota> <period>"``, microseconds) rounded up; never less than 1. A line that cannot be
    read as either form bounds nothing."""
    count = max(1, affinity)
    if cpu_max is None:
        return count
    fields = cpu_max.split()
    if len(fields) != 2 or fields[0] == "max":
        return count
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return count
    if quota <= 0 or period <= 0:
        return count
    return max(1, min(count, math.ceil(quota / period)))


def usable_cpus_here() -> int:
    """This process's affinity and its cgroup's quota (no cgroup v2 file: the affinity alone)."""
    try:
        cpu_max: str | None = CGROUP_CPU_MAX.read_text()
    except OSError:
        cpu_max = None
    return usable_cpus(len(os.sched_getaffinity(0)), cpu_max)
