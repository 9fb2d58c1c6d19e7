"""How many CPUs this process may use: what ``--workers auto`` (the default) sizes the proxy by.

``os.cpu_count()`` counts the machine's CPUs, not the agent's: a DaemonSet pod is confined by its
CPU affinity (cpuset) and throttled by its cgroup's CPU quota (``resources.limits.cpu`` becomes
``cpu.max`` under cgroup v2, ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` under v1). More event
loops than the quota allows only add processes that take turns on the same CPU time, so the
quota, rounded up, bounds the count as much as the affinity.

Which quota: a cgroup's processes are throttled by its own quota and by every ancestor's, so
the tightest of them counts. The process's cgroup comes from ``/proc/self/cgroup``; the
directories from there up to the hierarchy's mount are read where they exist (in a container
with its own cgroup namespace the path is ``/`` and the mount is the container's cgroup; without
one the container's mount is still its own cgroup, and the host path below it does not exist).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def usable_cpus(affinity: int, *cpu_max: str | None) -> int:
    """``affinity`` CPUs, bounded by each cgroup quota given as a cgroup v2 ``cpu.max`` line
    (``"max 100000"`` or ``"<quota> <period>"``, microseconds) rounded up; never less than 1.
    A line that cannot be read as either form (or None: no file) bounds nothing."""
    count = max(1, affinity)
    for line in cpu_max:
        bound = _quota_cpus(line)
        if bound is not None:
            count = min(count, bound)
    return count


def _quota_cpus(cpu_max: str | None) -> int | None:
    fields = (cpu_max or "").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def cgroup_quotas(proc_cgroup: str, root: Path = CGROUP_ROOT) -> list[str]:
    """The CPU quotas, as ``cpu.max`` lines, of the cgroups named by ``proc_cgroup`` (the text
    of ``/proc/self/cgroup``) and of their ancestors, read under ``root``: the v2 hierarchy's
    (``0::<path>``) and the v1 ``cpu`` controller's (``<n>:cpu,cpuacct:<path>``, whose quota
    -1 means none). Directories or files that do not exist are skipped."""
    out: list[str] = []
    for entry in proc_cgroup.splitlines():
        hierarchy, _, rest = entry.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            for d in _up(root, path):
                line = _read(d / "cpu.max")
                if line is not None:
                    out.append(line)
        elif "cpu" in controllers.split(","):
            for d in _up(root / controllers, path):
                quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
                if quota is not None and period is not None:
                    out.append(f"{quota.strip()} {period.strip()}")
    return out


def _up(mount: Path, path: str) -> Iterator[Path]:
    """``mount``/``path`` and each of its parents up to ``mount`` itself."""
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    for depth in range(len(parts), -1, -1):
        yield mount.joinpath(*parts[:depth])


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def usable_cpus_here() -> int:
    """This process's affinity bounded by its cgroups' quotas (none readable: the affinity)."""
    proc_cgroup = _read(PROC_CGROUP) or ""
    return usable_cpus(len(os.sched_getaffinity(0)), *cgroup_quotas(proc_cgroup))
