"""Benchmark: what one ``/metrics`` scrape costs the agent's event loop, by label sets.

    .venv/bin/python -m tests.bench.telemetry.bench_scrape [--sets 100 1000] [--rounds 9]
    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python \
        -m tests.bench.telemetry.bench_scrape --sets 1000 --rounds R --no-steps  # R = 1, 3

Fills a ``TelemetryComponent`` as an agent has it: N client workloads (each its own pod and
app) each with one TCP connection opened and closed to a Service and one request, so the TCP
families carry N label sets and the request families (1 counter, 3 histograms) N more; the
Istio label set on each. Then scrapes it: the first scrape (every series new) and the next
ones (nothing new: the steady state of a 15 s scrape interval), CPU time min over rounds
(``time.process_time``), the exposition's size, and the longest the loop is held by one step
of the server's answer (a part of ``promtext.exposition_parts``, which the server writes
without joining them), min over rounds; without parts (the code before them) it is the
whole scrape.
Instructions per steady-state scrape: callgrind's totals of ``--rounds 3 --no-steps`` minus
``--rounds 1 --no-steps``, halved (the filling and the first scrape cancel out).
"""

from __future__ import annotations

import argparse
import json
import time

from agent.base import promtext
from agent.proxy.records import Registry
from agent.state import StateStore
from agent.state.model import Endpoint, Service, ServicePort
from agent.telemetry.agentmetrics import AgentSources
from agent.telemetry.component import TelemetryComponent
from agent.telemetry.records import OUTBOUND, ConnectionRecord, RequestRecord
from tests.workloads import workload

VIP = "10.96.0.10"
SERVER_ID = "spiffe://cluster.local/ns/shop/sa/server"


def _store(sets: int) -> StateStore:
    store = StateStore()
    with store.update() as txn:
        for i in range(sets):
            ip = f"10.244.{1 + i // 250}.{2 + i % 250}"
            txn.put_workload(workload(f"client-{i}", "node1", ip, namespace="shop", app=f"c{i}"))
        txn.put_workload(workload("server-0", "node2", "10.245.0.2", sa="server", app="server"))
        txn.put_service(
            Service(
                name="server",
                namespace="shop",
                cluster_ips=(VIP,),
                ports=(ServicePort(80, 8080),),
                selector={"app": "server"},
                endpoints=(Endpoint("10.245.0.2", "shop/server-0"),),
            )
        )
    return store


def filled(sets: int) -> TelemetryComponent:
    """A component whose TCP and request metrics hold ``sets`` label sets each."""
    component = TelemetryComponent(
        store=_store(sets), address=("127.0.0.1", 0), sources=AgentSources()
    )
    component.tcp._access_log = False
    component.http._access_log = False
    registry = Registry()
    registry.observers.append(component.tcp)
    registry.request_observers.append(component.http)
    for i in range(sets):
        ip = f"10.244.{1 + i // 250}.{2 + i % 250}"
        record = ConnectionRecord(
            OUTBOUND,
            f"{ip}:40000",
            f"{VIP}:80",
            source_identity=f"spiffe://cluster.local/ns/shop/sa/client-{i}",
            destination_identity=SERVER_ID,
            path="hbone",
            upstream="10.245.0.2:8080",
        )
        conn_id = registry.add(record, lambda _reason: None)
        record.bytes_sent, record.bytes_received = 1000 + i, 20000 + i
        registry.request_done(
            record, RequestRecord("GET", "/", "server:80", 200, 3.0 + i % 50, 10, 2000, "-", "r")
        )
        registry.remove(conn_id)
    return component


def longest_step(component: TelemetryComponent) -> float:
    """The longest the loop is held by one step of a scrape (seconds of CPU)."""
    parts_of = getattr(promtext, "exposition_parts", None)
    if parts_of is None:  # before parts: the scrape is one step
        start = time.process_time()
        component.exposition()
        return time.process_time() - start
    longest, parts = 0.0, []
    start = time.process_time()
    for part in parts_of(component.registry):
        parts.append(part)
        now = time.process_time()
        longest, start = max(longest, now - start), now
    return longest


def measure(sets: int, rounds: int, steps: bool = True) -> dict[str, object]:
    component = filled(sets)
    start = time.process_time()
    body = component.exposition()
    first = time.process_time() - start
    best = block = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        component.exposition()
        best = min(best, time.process_time() - start)
    for _ in range(rounds if steps else 0):
        block = min(block, longest_step(component))
    return {
        "sets": sets,
        "first_scrape_ms": round(first * 1000, 2),
        "scrape_ms_min": round(best * 1000, 2),
        "longest_step_ms": round(block * 1000, 2),
        "bytes": len(body),
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--no-steps", action="store_true", help="scrapes only (for callgrind's difference)"
    )
    args = parser.parse_args()
    for sets in args.sets:
        print(json.dumps(measure(sets, args.rounds, not args.no_steps)))


if __name__ == "__main__":
    main()
