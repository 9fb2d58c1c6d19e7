"""Benchmark of the node proxy in the lab: throughput and 1 KB request/response latency through
the mesh next to direct, in one run.

    sudo .venv/bin/python -m tests.bench.proxy.bench_proxy [--seconds 5] [--requests 2000]

Builds a lab with agents and the CA (node1: client, neighbor meshed, outsider not; node2: server
meshed, plain not), then measures, side by side:
  - direct: outsider -> plain (no capture at either end; the baseline);
  - mesh cross-node: client -> server (captured, HBONE mTLS through both node proxies);
  - mesh same-node: client -> neighbor (captured, no TLS, one proxy hop).
Throughput is iperf3 (one TCP stream); latency is N sequential 1 KB echoes on one connection,
p50/p99 of the round-trip times. Numbers on a shared 2-core VM vary between runs; the ratios
measured in one run are what to compare.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    lab = Lab.up("pb" + secrets.token_hex(3), topology=TOPOLOGY, timeout=120)
    echoes = []
    try:
        for pod in ("server", "plain", "neighbor"):
            echoes.append(lab.popen(pod, sys.executable, "-c", ECHO))
        time.sleep(1.0)
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
