"""Benchmark of the node proxy in the lab: throughput and 1 KB request/response latency through
the mesh next to direct, in one run.

    sudo .venv/bin/python -m tests.bench.proxy.bench_proxy [--seconds 5] [--requests 2000]
    sudo .venv/bin/python -m tests.bench.proxy.bench_proxy --count [--requests 5000]

Builds a lab with agents and the CA (node1: client, neighbor meshed, outsider not; node2: server
meshed, plain not), then measures, side by side:
  - direct: outsider -> plain (no capture at either end; the baseline);
  - mesh cross-node: client -> server (captured, HBONE mTLS through both node proxies);
  - mesh same-node: client -> neighbor (captured, no TLS, one proxy hop).
Throughput is iperf3 (one TCP stream); latency is N sequential 1 KB echoes on one connection,
p50/p99 of the round-trip times. Numbers on a shared 2-core VM vary between runs; the ratios
measured in one run are what to compare.

``--count``: no throughput or latency; the cross-node round trips run with ``perf stat`` attached
to each agent's processes (main and workers) and print each agent's system calls by name per
round trip, which the load does not move (docs/performance/round-trip.md, "A round trip in counts").
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent.lab import control
from agent.lab.handle import Lab
from tests.labtools import iperf

TOPOLOGY = """\
nodes:
  - name: node1
    pods:
      - {name: client, namespace: default, serviceAccount: client, annotations: {MESH}}
      - {name: neighbor, namespace: default, serviceAccount: neighbor, annotations: {MESH}}
      - {name: outsider, namespace: default, serviceAccount: outsider}
  - name: node2
    pods:
      - {name: server, namespace: default, serviceAccount: server, annotations: {MESH}}
      - {name: plain, namespace: default, serviceAccount: plain}
""".replace("{MESH}", "{nodemesh.io/mesh: enabled}")
ECHO_PORT = 7000
ECHO = f"""
import socket, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", {ECHO_PORT}))
srv.listen(16)
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while d := c.recv(65536):
        c.sendall(d)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""
PINGPONG = """
import json, socket, sys, time
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((ip, port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg, times = b"x" * 1024, []
for i in range(n + 100):
    t = time.perf_counter_ns()
    s.sendall(msg)
    got = 0
    while got < len(msg):
        got += len(s.recv(65536))
    if i >= 100:  # warm-up: connection setup, pool dial, TLS handshake
        times.append((time.perf_counter_ns() - t) / 1000)
times.sort()
print(json.dumps({"p50": times[len(times) // 2], "p99": times[int(len(times) * 0.99)]}))
"""


def latency(lab: Lab, client: str, server: str, requests: int) -> dict[str, float]:
    ip = str(lab.pod(server)["ip"])
    out = lab.exec(
        client, sys.executable, "-c", PINGPONG, ip, str(ECHO_PORT), str(requests),
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    result: dict[str, float] = json.loads(out.stdout)
    return result


def agent_pids(lab: Lab, node: str) -> list[int]:
    """The agent's main process and its children (workers, helpers)."""
    labdir, _ = control.load(lab.name)
    main = labdir.pids()[f"agent-{node}"]
    pids, todo = [], [main]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        for task in Path(f"/proc/{pid}/task").iterdir():
            todo += [int(c) for c in (task / "children").read_text().split()]
    return pids


TCP_COUNTERS = ("TcpOutSegs", "TcpExtDelayedACKs", "TcpExtTCPPureAcks")


def tcp_counters(lab: Lab, target: str) -> dict[str, int]:
    """The kernel's TCP counters of ``target``'s network namespace (a node or a pod)."""
    out = lab.exec(target, "nstat", "-az", *TCP_COUNTERS, capture_output=True, text=True)
    return {f[0]: int(f[1]) for f in (line.split() for line in out.stdout.splitlines()[1:])}


def count_syscalls(lab: Lab, requests: int) -> None:
    """Cross-node round trips with ``perf stat`` on each agent: system calls per round trip,
    and the TCP segments, pure ACKs and delayed ACKs of each namespace on the path."""
    latency(lab, "client", "server", 200)  # the pool's dial and handshake are not counted
    spaces = ("client", "node1", "node2", "server")
    before = {t: tcp_counters(lab, t) for t in spaces}
    perfs = {}
    for node in ("node1", "node2"):
        pids = ",".join(map(str, agent_pids(lab, node)))
        argv = ["perf", "stat", "-x", ",", "-e", "syscalls:sys_enter_*", "-p", pids]
        perfs[node] = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # perf attaches
    lat = latency(lab, "client", "server", requests)
    for node, perf in perfs.items():
        os.kill(perf.pid, signal.SIGINT)
        _, err = perf.communicate()
        counts = {}
        for line in err.splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[0].isdigit() and int(fields[0]):
                counts[fields[2].removeprefix("syscalls:sys_enter_")] = int(fields[0])
        # the 100 warm-up round trips of the latency client are counted too
        per_rr = {k: round(v / (requests + 100), 2) for k, v in counts.items()}
        print(node, json.dumps(dict(sorted(per_rr.items(), key=lambda kv: -kv[1]))), flush=True)
    for target in spaces:
        after = tcp_counters(lab, target)
        per_rr = {k: round((after[k] - before[target][k]) / (requests + 100), 2) for k in after}
        print(target, json.dumps(per_rr))
    print(f"p50 {lat['p50']:.0f} us, p99 {lat['p99']:.0f} us (perf attached)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--count", action="store_true", help="system calls per round trip")
    args = parser.parse_args()
    lab = Lab.up("pb" + secrets.token_hex(3), topology=TOPOLOGY, timeout=120)
    echoes = []
    try:
        for pod in ("server", "plain", "neighbor"):
            echoes.append(lab.popen(pod, sys.executable, "-c", ECHO))
        time.sleep(1.0)
        if args.count:
            count_syscalls(lab, args.requests)
            return
        paths = {
            "direct (outsider -> plain)": ("outsider", "plain"),
            "mesh cross-node (client -> server)": ("client", "server"),
            "mesh same-node (client -> neighbor)": ("client", "neighbor"),
        }
        print(f"{'path':40} {'Gbit/s':>8} {'p50 us':>8} {'p99 us':>8}")
        for title, (src, dst) in paths.items():
            gbps = iperf(lab, src, dst, args.seconds)
            lat = latency(lab, src, dst, args.requests)
            print(f"{title:40} {gbps:8.2f} {lat['p50']:8.0f} {lat['p99']:8.0f}", flush=True)
    finally:
        for proc in echoes:
            proc.kill()
            proc.wait()
        lab.down()


if __name__ == "__main__":
    main()
