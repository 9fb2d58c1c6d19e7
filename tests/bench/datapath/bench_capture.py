"""Benchmark of the capture datapath in the lab: per-packet program cost and throughput.

    sudo .venv/bin/python -m tests.bench.datapath.bench_capture [--seconds 5]

Builds a lab (the datapath tests' topology, with agents), then runs iperf3 between pods:
  - outsider -> plain: neither meshed, no capture (baseline);
  - client -> plain: captured at node1 into the agent's relay (one user-space hop);
  - client -> server: captured at node1 and again at node2's uplink (two hops).
While it runs, ``kernel.bpf_stats_enabled=1`` (restored afterwards) makes the kernel account
each program's run time; cost per packet = run_time_ns / run_cnt over the whole run. Numbers
on a shared 2-core VM vary from run to run; ratios measured side by side in one run matter.
"""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path

from agent.datapath import bpfsys
from agent.lab.handle import Lab
from tests.integration.datapath.harness import TOPOLOGY
from tests.labtools import iperf

STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def program_stats(pin_dir: Path) -> dict[str, tuple[int, int]]:
    """{program name: (run_time_ns, run_cnt)} of the programs pinned under ``pin_dir``."""
    result = {}
    for path in sorted(pin_dir.glob("*/prog_*")):
        fd = bpfsys.open_pinned(str(path))
        try:
            _, name, ns, cnt = bpfsys.prog_stats(fd)
        finally:
            os.close(fd)
        result[f"{pin_dir.name}/{name}"] = (ns, cnt)
    return result


SCENARIOS = {
    "outsider->plain (no capture)": ("outsider", "plain"),
    "client->plain (captured once)": ("client", "plain"),
    "client->server (captured at both nodes)": ("client", "server"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    lab = Lab.up("b" + secrets.token_hex(3), topology=TOPOLOGY)
    previous = STATS.read_text().strip()
    rates: dict[str, float] = {}
    costs: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        pins = [Path(n["pinDir"]) for n in lab.status()["nodes"]]
        STATS.write_text("1")
        for name, (client, server) in SCENARIOS.items():
            before = {k: v for p in pins for k, v in program_stats(p).items()}
            rates[name] = iperf(lab, client, server, args.seconds)
            after = {k: v for p in pins for k, v in program_stats(p).items()}
            costs[name] = {k: (after[k][0] - v[0], after[k][1] - v[1]) for k, v in before.items()}
    finally:
        STATS.write_text(previous)
        lab.down()
    base = rates["outsider->plain (no capture)"]
    for name, rate in rates.items():
        print(f"{name:42s} {rate:6.2f} Gbit/s  ratio {rate / base:.2f}")
        for prog, (ns, cnt) in costs[name].items():
            if cnt:
                print(f"    {prog:38s} {cnt:9d} runs  {ns / cnt:7.1f} ns/packet")


if __name__ == "__main__":
    main()
