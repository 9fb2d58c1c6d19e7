"""HBONE windows in the lab: does a bulk stream make a small one on its HBONE connection wait?

    sudo .venv/bin/python -m tests.bench.proxy.bench_windows_lab [--rounds 3] [--windows A,B]

The in-process harness (``bench_windows``) runs both proxies on one event loop, so what is in
flight between them never waits for another process: here each agent is its own process on its
own node. Both agents run ``--workers 1`` (so that the two pod connections share one HBONE
connection) and are restarted with each ``--hbone-window`` in turn, alternating the order round
by round. Per window and round: 1 KB round trips client -> server alone (p50), then the same
while iperf3 sends one bulk stream client -> server (p50/p99 of the round trips, the bulk's
Gbit/s, and both agents' CPU seconds per GB during it). Prints one line per measurement and
the medians; the closing numbers are in docs/performance/bulk-and-windows.md ("HBONE windows").
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time

from agent.lab import control
from agent.lab.handle import Lab
from tests.bench.proxy.bench_proxy import ECHO, ECHO_PORT, PINGPONG, TOPOLOGY

AGENTS = ("agent-node1", "agent-node2")
BULK_SECONDS = 6


def agent_cpu(lab: Lab) -> float:
    """CPU seconds both agents (their whole process trees' main processes) have used."""
    labdir, _ = control.load(lab.name)
    total = 0.0
    for name in AGENTS:
        with open(f"/proc/{labdir.pids()[name]}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def restart(lab: Lab, window: str) -> None:
    for name in AGENTS:
        lab.kill(name, signal.SIGTERM)
        lab.start(name, "--workers", "1", "--hbone-window", window, without=("--workers",))


def round_trips(lab: Lab, n: int) -> dict[str, float]:
    ip = str(lab.pod("server")["ip"])
    out = lab.exec(
        "client", sys.executable, "-c", PINGPONG, ip, str(ECHO_PORT), str(n),
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    result: dict[str, float] = json.loads(out.stdout)
    return result


def measure(lab: Lab) -> dict[str, float]:
    alone = round_trips(lab, 1000)
    srv = lab.popen("server", "iperf3", "-s", "-1", stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    ip = str(lab.pod("server")["ip"])
    before = agent_cpu(lab)
    bulk = lab.popen(
        "client", "iperf3", "-J", "-c", ip, "-t", str(BULK_SECONDS), stdout=subprocess.PIPE
    )
    time.sleep(1.0)  # the bulk stream is up to speed
    loaded = round_trips(lab, 1000)
    out, _ = bulk.communicate(timeout=60)
    used = agent_cpu(lab) - before
    srv.wait(timeout=30)
    received = json.loads(out)["end"]["sum_received"]
    gbytes = received["bytes"] / 1e9
    return {
        "rr_alone_p50": alone["p50"],
        "rr_bulk_p50": loaded["p50"],
        "rr_bulk_p99": loaded["p99"],
        "bulk_gbps": received["bits_per_second"] / 1e9,
        "cpu_s_per_gb": used / gbytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--windows", default="512KiB,4MiB")
    args = parser.parse_args()
    windows = args.windows.split(",")
    lab = Lab.up("bw" + secrets.token_hex(3), topology=TOPOLOGY, timeout=120)
    echo = lab.popen("server", sys.executable, "-c", ECHO)
    results: dict[str, list[dict[str, float]]] = {}
    try:
        time.sleep(1.0)
        for rnd in range(args.rounds):
            for window in windows if rnd % 2 == 0 else windows[::-1]:
                restart(lab, window)
                res = measure(lab)
                results.setdefault(window, []).append(res)
                print(f"round {rnd} {window:7} {json.dumps(res)}", flush=True)
    finally:
        echo.kill()
        echo.wait()
        lab.down()
    for window, runs in results.items():
        cells = [f"{k} {statistics.median(r[k] for r in runs):.2f}" for k in runs[0]]
        print(f"{window:7} medians: " + "; ".join(cells))


if __name__ == "__main__":
    main()
