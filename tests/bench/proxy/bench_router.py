"""CPU per request in the source's router alone (``HttpRouter.admit`` and the request's
``Attempts``), sans-IO: what a change to routing or traffic control costs or saves per request,
measured where neither sockets nor the machine's load move it.

    .venv/bin/python -m tests.bench.proxy.bench_router svc|routed|grpc [--requests 20000]
        [--rounds 7] [--calls] [--callgrind]

Per request it does what the shells do for one that is answered: ``admit`` (route match,
backend choice, the backend Service's traffic control), then ``next_endpoint``,
``connected(reused=True)`` (a pooled session) and ``finish``, with the traffic counters wired to
the agent's metrics (``trafficmetrics.observe``). Paths: ``svc`` a Service port with no route
(HTTP/1.1 head as ``h2load`` sends it); ``routed`` the bench's HTTPRoute (``bench/testbed.py``:
a header match the requests do not meet, then a 90/10 split over two Services with a retry on
503); ``grpc`` a gRPC call to a Service port with no route.

Prints the process CPU µs per request of each round and the best (compare trees alternated);
``--calls`` the Python calls and built-ins per request (``sys.setprofile``: counts, not
times); ``--callgrind`` (under ``valgrind --tool=callgrind --instr-atstart=no``) turns the
instrumentation on for the measured rounds only, so callgrind's total over the requests is
instructions per request.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from types import FrameType
from typing import Any

from agent.policy.routes import GrpcRequest, HttpRequest
from agent.policy.traffic.control import TrafficControl
from agent.proxy import trafficmetrics
from agent.proxy.http_router import HttpRouter
from agent.proxy.resolve import ServiceTarget
from agent.state import Endpoint, Service, ServicePort, Snapshot, StateStore, Workload
from tests.bench.proxy.bench_http_cpu import ROUTE

VIP = "10.96.7.2"
SERVER = "10.244.2.2"
HEADERS = (("host", "web"), ("user-agent", "h2load"), ("accept", "*/*"))
GRPC_HEADERS = (
    ("content-type", "application/grpc"),
    ("te", "trailers"),
    ("user-agent", "bench-grpc"),
)


def _service(name: str, app_protocol: str) -> Service:
    port = ServicePort(80, 8000, name=app_protocol, app_protocol=app_protocol)
    return Service(
        name, "default", (VIP,) if name == "web" else (), (port,), {"app": "server"},
        (Endpoint(SERVER, "default/server"),),
    )  # fmt: skip


def state(path: str) -> Snapshot:
    store = StateStore()
    protocol = "grpc" if path == "grpc" else "http"
    with store.update() as tx:
        tx.put_workload(
            Workload("default/server", "server", "default", "server", "node2", (SERVER,),
                     {"app": "server"})
        )  # fmt: skip
        for name in ("web", "web-v1", "web-v2"):
            tx.put_service(_service(name, protocol))
        if path == "routed":
            tx.put_route(ROUTE)
    return store.snapshot()


def one(router: HttpRouter, snap: Snapshot, target: ServiceTarget, path: str) -> None:
    """One request's routing, as the shell does it for a request answered 200."""
    request: HttpRequest | GrpcRequest
    if path == "grpc":
        call = GrpcRequest.from_path("/nodemesh.bench.Echo/Unary", GRPC_HEADERS, authority=VIP)
        assert call is not None
        request = call
    else:
        request = HttpRequest.from_target("GET", "/index.html", HEADERS, authority="web")
    plan = router.admit(
        snap, target, request, "10.244.1.2", {"app": "client"}, ("node1", None),
        client_namespace="default", may_queue=True,
    )  # fmt: skip
    attempts = plan.attempts
    ip = attempts.next_endpoint()
    assert ip is not None
    attempts.connected(ip, reused=True)
    plan.finish(200, time.monotonic(), reset_before_response=False)


class Calls:
    """``sys.setprofile`` hook counting Python calls and built-ins."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event in ("call", "c_call"):
            self.count += 1


def _callgrind(on: bool) -> None:
    command = ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())]
    subprocess.run(command, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", choices=["svc", "routed", "grpc"])
    parser.add_argument("--requests", type=int, default=20000, help="per measured round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", action="store_true", help="count calls per request")
    parser.add_argument("--callgrind", action="store_true", help="see the module docstring")
    args = parser.parse_args()
    snap = state(args.path)
    service = snap.services[("default", "web")]
    target = ServiceTarget(service, service.ports[0], VIP)
    router = HttpRouter(
        TrafficControl(rng=random.Random(1), observer=trafficmetrics.observe), random.Random(2)
    )
    for _ in range(200):  # warm-up: traffic state, caches, metric children
        one(router, snap, target, args.path)
    if args.calls:
        calls = Calls()
        sys.setprofile(calls)
        for _ in range(args.requests):
            one(router, snap, target, args.path)
        sys.setprofile(None)
        per_request = calls.count / args.requests
        print(f"{args.path}: Python calls and built-ins per request: {per_request:.1f}")
        return
    per_round = []
    for _ in range(args.rounds):
        if args.callgrind:
            _callgrind(True)
        started = time.process_time()
        for _ in range(args.requests):
            one(router, snap, target, args.path)
        used = time.process_time() - started
        if args.callgrind:
            _callgrind(False)
        per_round.append(used / args.requests * 1e6)
    shown = " ".join(f"{us:.2f}" for us in per_round)
    print(f"{args.path}: process CPU µs per request: {shown}; best {min(per_round):.2f}")


if __name__ == "__main__":
    main()
