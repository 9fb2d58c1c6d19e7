"""The scaling section: the mesh paths with 1 and with 2 proxy workers per agent.

Both agents are restarted with ``--workers W`` (W = 1, then 2; the order alternates between
repetitions, so drift of the shared machine spreads over both), and the cross-node and same-node
paths run the throughput workloads (1 and ``streams`` iperf3 streams) and the 1 KB
request/response. The proxy CPU of a sample counts the agents' main processes and their workers.

What it can show on the 2-core lab machine: iperf3's client and server, node1's agent and (cross
node) node2's agent all share the two cores. With one worker per agent the proxy of each node is
one event loop; with two, a node's flows are spread over two loops, but there are still only two
cores for everything, so a path whose single-worker run already kept both cores busy cannot
gain. The ratio is informative on a machine with spare cores (``make bench`` on a bigger host).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

from bench import procstat, stats, workloads
from bench.settings import Settings
from bench.testbed import BenchPath, Testbed

WORKERS = (1, 2)
PATHS = ("mesh_cross", "mesh_same")


WORKER = "agent.workers.worker"  # what a worker process runs (``procstat.role``)


def _workers(pid: int) -> list[int]:
    """``pid``'s worker processes. Only those: the agent's other children come and go (the
    key child leaves a few seconds after the start-up's certificate requests), and a sample
    must not read a process that left during it."""
    found = []
    for child in procstat.children(pid):
        with contextlib.suppress(OSError):  # a child that just exited
            if procstat.role(child) == WORKER:
                found.append(child)
    return found


def _with_workers(path: BenchPath) -> BenchPath:
    pids = [*path.proxy_pids, *(c for p in path.proxy_pids for c in _workers(p))]
    return dataclasses.replace(path, proxy_pids=tuple(pids))


def _runs(
    s: Settings,
) -> list[tuple[str, Callable[[Testbed, BenchPath, Settings], dict[str, Any]]]]:
    return [
        ("bulk_1", lambda bed, p, st: workloads.bulk(bed, p, st, 1)),
        (f"bulk_{s.streams}", lambda bed, p, st: workloads.bulk(bed, p, st, st.streams)),
        ("rr", workloads.request_response),
    ]


def section(bed: Testbed, s: Settings, say: Callable[[str], None]) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    for rep in range(s.reps):
        order = WORKERS if rep % 2 == 0 else tuple(reversed(WORKERS))
        for workers in order:
            for node in ("node1", "node2"):
                bed.restart_agent(node, workers=workers)
            for key in PATHS:
                path = _with_workers(next(p for p in bed.paths if p.key == key))
                for name, run in _runs(s):
                    sample = run(bed, path, s)
                    load1 = round(procstat.load_average()[0], 2)
                    samples.append(
                        {"rep": rep, "workers": workers, "path": key, "workload": name,
                         "load1": load1, **sample}
                    )  # fmt: skip
                    say(f"[{rep + 1}/{s.reps}] {workers} worker(s) {path.title} {name}: "
                        f"{_headline(name, sample)}")  # fmt: skip
    for node in ("node1", "node2"):
        bed.restart_agent(node, workers=1)  # as the lab started them, for whatever follows
    return {"workers": list(WORKERS), "samples": samples}


def _headline(workload: str, sample: dict[str, Any]) -> str:
    if "error" in sample:
        return "ERROR " + str(sample["error"])
    if workload.startswith("bulk_"):
        return f"{sample['gbps']:.2f} Gbit/s, proxy CPU {sample['proxy_cpu_s']:.1f} s"
    return f"p50 {sample['p50_us']:.0f} µs, p99 {sample['p99_us']:.0f} µs"


def medians(found: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, float | None]]:
    """Per (path, workload, workers): the median Gbit/s (bulk) or p50/p99 µs (rr), and the
    median proxy CPU seconds."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for sample in found.get("samples", []):
        if "error" in sample:
            continue
        key = (sample["path"], sample["workload"], sample["workers"])
        groups.setdefault(key, []).append(sample)
    out: dict[tuple[str, str, int], dict[str, float | None]] = {}
    for key, group in groups.items():
        values: dict[str, float | None] = {"cpu": stats.median([g["proxy_cpu_s"] for g in group])}
        if key[1].startswith("bulk_"):
            values["gbps"] = stats.median([g["gbps"] for g in group])
        else:
            values["p50"] = stats.median([g["p50_us"] for g in group])
            values["p99"] = stats.median([g["p99_us"] for g in group])
        out[key] = values
    return out


def markdown(found: dict[str, Any] | None) -> list[str]:
    if not found or not found.get("samples"):
        return []
    table = medians(found)
    one, two = found["workers"][0], found["workers"][-1]
    out = [
        "",
        "## Scaling: proxy workers per agent (`nodemesh agent --workers N`, `bench/scaling.py`)",
        "",
        f"| path | workload | {one} worker | {two} workers | {two}/{one} (Gbit/s: higher is "
        f"better; µs: lower) | proxy CPU s ({one} / {two}) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for path, workload in sorted({(k[0], k[1]) for k in table}):
        a, b = table.get((path, workload, one), {}), table.get((path, workload, two), {})
        metric = "gbps" if workload.startswith("bulk_") else "p50"
        unit = " Gbit/s" if metric == "gbps" else " µs p50"
        va, vb = a.get(metric), b.get(metric)
        ratio = stats.ratio(vb, va)
        fa = "-" if va is None else f"{va:.2f}{unit}" if metric == "gbps" else f"{va:.0f}{unit}"
        fb = "-" if vb is None else f"{vb:.2f}{unit}" if metric == "gbps" else f"{vb:.0f}{unit}"
        cpu = f"{a.get('cpu') or 0:.1f} / {b.get('cpu') or 0:.1f}"
        out.append(
            f"| {path} | {workload} | {fa} | {fb} | {'-' if ratio is None else f'{ratio:.2f}x'} "
            f"| {cpu} |"
        )
    out += [
        "",
        "Both agents run with the same worker count. On the 2-core lab machine the client, the"
        " server and both agents share the two cores, so the proxy is not the only bottleneck:"
        " a second worker per agent adds a loop per node but no core (see `bench/scaling.py`).",
    ]
    return out
