"""Memory and CPU of the processes that make up a path's proxy (agents or stunnel), from /proc.

RSS is ``VmRSS`` (resident pages, shared libraries included: they are the same before and after,
so differences are the connections' cost). CPU is user + system time of every thread
(``/proc/PID/stat`` fields 14 and 15), in seconds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"process {pid} has no VmRSS: it exited (see its log)")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14 and stime 15 (1-based) of the full line.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def open_files_limit(pid: int) -> int:
    """The soft ``Max open files`` of a running process."""
    with open(f"/proc/{pid}/limits", encoding="ascii") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise RuntimeError(f"process {pid} has no open-files limit in /proc: it exited")


def total_rss(pids: Iterable[int]) -> int:
    return sum(rss_bytes(pid) for pid in pids)


def total_cpu(pids: Iterable[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()
