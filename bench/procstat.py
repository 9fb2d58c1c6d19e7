"""Memory and CPU of the processes that make up a path's proxy (agents or stunnel), from /proc.

RSS is ``VmRSS`` (resident pages, shared libraries included: they are the same before and after,
so differences are the connections' cost). CPU is user + system time of every thread
(``/proc/PID/stat`` fields 14 and 15), in seconds. ``memory`` adds what an agent's processes
share: PSS (each shared page divided among the processes mapping it, so the PSS of an agent and
its helper child add up to what they cost together) and the anonymous part (heap, Python
objects, stacks: what the process itself allocated).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"process {pid} has no VmRSS: it exited (see its log)")


def memory(pid: int) -> dict[str, int]:
    """``rss_bytes``, ``pss_bytes`` and ``anon_bytes`` from ``/proc/PID/smaps_rollup``."""
    fields = {"Rss:": "rss_bytes", "Pss:": "pss_bytes", "Anonymous:": "anon_bytes"}
    found = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            name, _, rest = line.partition(" ")
            if name in fields:
                found[fields[name]] = int(rest.split()[0]) * 1024
    if len(found) != len(fields):
        raise RuntimeError(f"process {pid} has no memory figures in /proc: it exited")
    return found


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (every thread's), in pid order."""
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
            found += [int(c) for c in f.read().split()]
    return sorted(found)


def tree_memory(pid: int) -> list[dict[str, Any]]:
    """``memory`` of ``pid`` (role ``main``) and of each of its children with its ``role``. A
    child that exits between the listing and its reads (a key or compiler child ending) is left
    out: it is not part of what the process holds at rest."""
    processes: list[dict[str, Any]] = [{"pid": pid, "role": "main", **memory(pid)}]
    for child in children(pid):
        try:
            processes.append({"pid": child, "role": role(child), **memory(child)})
        except (FileNotFoundError, ProcessLookupError, RuntimeError):
            continue
    return processes


def role(pid: int) -> str:
    """What a process runs: the module after ``-m`` (``agent``, ``agent.datapath.netlinkd``),
    else its program's name."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    return os.path.basename(argv[0]) if argv else "?"


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
