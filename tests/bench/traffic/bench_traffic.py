"""Benchmark of traffic control's per-connection decisions (sans-IO, no sockets).

    .venv/bin/python -m tests.bench.traffic.bench_traffic [--connections 20000]

For Services of 2 to 1,000 endpoints, each balancer, and a 90/10 split over peak-EWMA, runs the
decisions one connection costs the proxy: ``admit`` (limits, fault roll, budget), ``next_endpoint``
(split, outlier availability, locality, balancer), ``connected`` and ``finish`` (RTT samples,
outlier accounting), and prints microseconds per connection. Endpoint 0 is made slower so
peak-EWMA has something to avoid. Single thread; numbers vary with the machine's load.
"""

from __future__ import annotations

import argparse
import random
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=20000)
    args = parser.parse_args()
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
