"""Benchmark of traffic control: its per-connection decisions, and its cost in the real proxy.

    .venv/bin/python -m tests.bench.traffic.bench_traffic [--connections 20000]
    sudo .venv/bin/python -m tests.bench.traffic.bench_traffic --lab [--connections 500]

Without ``--lab`` (sans-IO, no sockets):
For Services of 2 to 1,000 endpoints, each balancer, and a 90/10 split over peak-EWMA, runs the
decisions one connection costs the proxy: ``admit`` (limits, fault roll, budget), ``next_endpoint``
(split, outlier availability, locality, balancer), ``connected`` and ``finish`` (RTT samples,
outlier accounting), and prints microseconds per connection. Endpoint 0 is made slower so
peak-EWMA has something to avoid. Single thread; numbers vary with the machine's load.

With ``--lab``: builds a lab (client on node1; web-0 and web-1 on node2 behind Service web) and
times N sequential connections (connect, first byte, close) from client to web-0's pod IP and
to the Service VIP (traffic control with the default policy), interleaved in rounds so both see
the same machine load; prints p50/p99 and connections per second of each.
"""

from __future__ import annotations

import argparse
import random
import secrets
import socket
import statistics
import sys
import time

from agent.policy.traffic.config import Subset, TrafficConfig
from agent.policy.traffic.service import EndpointInfo, ServiceTraffic


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(config: TrafficConfig, endpoints: int, connections: int) -> tuple[float, float]:
    """(microseconds per connection, share of the slow endpoint)."""
    clock = Clock()
    traffic = ServiceTraffic("bench/web", config, clock=clock, rng=random.Random(1))
    ips = [f"10.244.{i // 250}.{i % 250 + 2}" for i in range(endpoints)]
    traffic.sync(
        [
            EndpointInfo(ip, {"version": "v2" if i % 10 == 0 else "v1"}, "node2")
            for i, ip in enumerate(ips)
        ]
    )
    slow = ips[0]
    chosen_slow = 0
    start = time.perf_counter()
    for _ in range(connections):
        attempts = traffic.admit("10.244.9.9", {"app": "client"}, ("node1", None))
        ip = attempts.next_endpoint()
        assert ip is not None
        rtt = 0.05 if ip == slow else 0.002
        clock.now += rtt
        attempts.connected(ip)
        attempts.finish(first_byte_at=clock.now + rtt)
        clock.now += 0.001
        chosen_slow += ip == slow
    elapsed = time.perf_counter() - start
    return elapsed / connections * 1e6, chosen_slow / connections


def lab_bench(connections: int) -> None:
    from agent.lab.handle import Lab
    from agent.lab.netns import call_in
    from tests.integration.traffic.test_traffic_lab import TOPOLOGY, WEB, vip, wait

    lab = Lab.up("tb" + secrets.token_hex(3), topology=TOPOLOGY, timeout=90)
    procs = [lab.popen(p, sys.executable, "-c", WEB, p, "0") for p in ("web-0", "web-1")]
    try:
        targets = {"pod web-0": lab.pod("web-0")["ip"], "Service web": vip(lab)}

        def once(ip: str) -> float:
            start = time.perf_counter()
            with socket.create_connection((ip, 8080 if ip != targets["Service web"] else 80)) as s:
                if not s.recv(16):
                    raise OSError(f"{ip}: no answer")
            return time.perf_counter() - start

        def ready() -> bool:
            try:
                return all(call_in(lab.netns("client"), once, ip) > 0 for ip in targets.values())
            except OSError:
                return False

        wait(ready, "both targets to answer", timeout=30)
        times: dict[str, list[float]] = {name: [] for name in targets}
        for _ in range(10):
            for name, ip in targets.items():
                batch = call_in(
                    lab.netns("client"), lambda ip=ip: [once(ip) for _ in range(connections // 10)]
                )
                times[name].extend(batch)
        for name, samples in times.items():
            samples.sort()
            p99 = samples[int(len(samples) * 0.99) - 1]
            print(
                f"{name:<12} n={len(samples)} p50={statistics.median(samples) * 1e3:.2f} ms "
                f"p99={p99 * 1e3:.2f} ms rate={len(samples) / sum(samples):.0f} conn/s"
            )
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        lab.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=20000)
    parser.add_argument("--lab", action="store_true", help="measure in a lab (root)")
    args = parser.parse_args()
    if args.lab:
        lab_bench(args.connections)
        return
    split = (Subset("v1", {"version": "v1"}, 90), Subset("v2", {"version": "v2"}, 10))
    configs = {
        "PEAK_EWMA": TrafficConfig(),
        "ROUND_ROBIN": TrafficConfig(balancer="ROUND_ROBIN"),
        "LEAST_CONNECTIONS": TrafficConfig(balancer="LEAST_CONNECTIONS"),
        "RANDOM": TrafficConfig(balancer="RANDOM"),
        "PEAK_EWMA + 90/10 split": TrafficConfig(subsets=split),
    }
    print(f"{'config':<26}{'endpoints':>10}{'us/conn':>10}{'slow share':>12}")
    for name, config in configs.items():
        for endpoints in (2, 10, 100, 1000):
            micros, share = run(config, endpoints, args.connections)
            print(f"{name:<26}{endpoints:>10}{micros:>10.1f}{share:>12.4f}")


if __name__ == "__main__":
    main()
