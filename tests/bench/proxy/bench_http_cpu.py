"""CPU per HTTP/1.1 request through both node proxies, in one process: what a change to the HTTP
path costs or saves, without the bench's lab and its noise from h2load and the machine's load.

    sudo .venv/bin/python -m tests.bench.proxy.bench_http_cpu svc|routed|pod|l4|direct \
        [--requests 4000] [--rounds 5] [--connections 4] [--no-access-log] [--log FILE]

The proxies' two-node loopback mesh (``tests/integration/proxy/mesh.py``: real ``NodeProxy``
objects, HBONE with mTLS between them, on uvloop), with request telemetry wired as the agent
wires it (``TcpMetrics`` and ``HttpMetrics`` on both registries, the access log at INFO through
``logging.basicConfig``'s format to ``--log``, so ``AccessLogWriter`` writes it). An app answers
every request with a fixed 12-byte body; ``--connections`` keep-alive clients send ``h2load``'s
request head one request at a time. Paths: ``svc`` a Service VIP port declared HTTP (both nodes
terminate), ``routed`` that port with the bench lab's HTTPRoute attached (``bench/testbed.py``:
a header match the requests do not meet, then a 90/10 split over two Services selecting the
same pod, with retries), ``pod`` the pod's port declared HTTP (``nodemesh.io/http-ports``:
node2 terminates), ``l4`` the same port undeclared, ``direct`` no proxy (the clients' and
app's own share). ``--policed`` attaches an ALLOW AuthorizationPolicy selecting the server pod
with a path rule every request meets (``/*``): the usual production case, in which each request
is authorized at the destination (``http_inbound.RequestAdmission``).

Prints the process CPU time per request of each measured round (after a warm-up) and the best
(the least disturbed by other processes; compare trees alternated). With ``--callgrind`` (run
under ``valgrind --tool=callgrind --instr-atstart=no``) instrumentation is on only during the
measured rounds, so callgrind's instruction count divided by the requests is the same measure
without the machine's load; the connect and handshake timeouts are raised for it:

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/svc.cg \\
        .venv/bin/python -m tests.bench.proxy.bench_http_cpu svc --callgrind --rounds 1 \\
        --requests 1000   # then: instructions (callgrind_annotate's total) / 1000

With ``--profile FILE`` cProfile runs over the measured rounds only and its stats go to FILE:
the Python calls (and built-ins) per request, by function (``pstats``; divide by the rounds'
requests).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, cast

import uvloop

import tests.integration.proxy.mesh as mesh_module
from agent.state import Endpoint, PolicyObject, RouteObject, Service, ServicePort
from agent.telemetry.accesslog import ACCESS_LOGGER, RequestSampler
from agent.telemetry.http import HttpMetrics
from agent.telemetry.tcp import TcpMetrics
from tests.integration.proxy.mesh import CLIENT, SERVER, Mesh, free_port, listener
from tests.workloads import workload

VIP = "10.96.7.2"
REQUEST = b"GET /index.html HTTP/1.1\r\nhost: web\r\nuser-agent: h2load\r\naccept: */*\r\n\r\n"
BODY = b"hello world\n"
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\ncontent-type: text/plain\r\n\r\n%s" % (
    len(BODY),
    BODY,
)


ROUTE_BACKENDS = ("web-v1", "web-v2")
ROUTE = RouteObject(
    "HTTPRoute",
    "default",
    "web",
    {
        "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
        "rules": [  # a header match the requests do not meet, then a 90/10 split with retries
            {
                "matches": [{"headers": [{"name": "x-bench-canary", "value": "true"}]}],
                "backendRefs": [{"name": "web-v2", "port": 80}],
            },
            {
                "backendRefs": [
                    {"name": "web-v1", "port": 80, "weight": 90},
                    {"name": "web-v2", "port": 80, "weight": 10},
                ],
                "retry": {"attempts": 2, "codes": [503], "backoff": "10ms"},
            },
        ],
    },
    1,
    "bench-route",
)


class App(asyncio.Protocol):
    """Answers each request head with ``RESPONSE`` (the requests carry no body)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport, self.buffer = cast(asyncio.Transport, transport), b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        heads = self.buffer.count(b"\r\n\r\n")
        if heads:
            self.buffer = self.buffer[self.buffer.rindex(b"\r\n\r\n") + 4 :]
            self.transport.write(RESPONSE * heads)


class Client(asyncio.Protocol):
    """``count`` requests, one at a time; ``done`` when the last response arrived."""

    def __init__(self, count: int, done: asyncio.Future[None]) -> None:
        self.left, self.done, self.buffer = count, done, b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= len(RESPONSE):
            if not self.buffer.startswith(RESPONSE):
                self.done.set_exception(AssertionError(f"not the app's answer: {self.buffer!r}"))
                return
            self.buffer = self.buffer[len(RESPONSE) :]
            self.left -= 1
            if self.left == 0:
                self.done.set_result(None)
                return
            self.transport.write(REQUEST)


def _made(client: Client) -> Callable[[], Client]:
    return lambda: client


async def _captured(mesh: Mesh, dst: tuple[str, int]) -> tuple[str, int]:
    """A listener whose next connection node1's outbound handles as captured to ``dst``."""
    loop = asyncio.get_running_loop()
    lst = listener("127.0.0.1")

    async def accept_one() -> None:
        conn, _ = await loop.sock_accept(lst)
        conn.setblocking(False)
        rest = await mesh.node1.outbound.handle(conn, original_dst=dst)
        if rest is not None:
            await rest

    mesh._tasks.append(asyncio.create_task(accept_one()))
    mesh._sockets.append(lst)
    return "127.0.0.1", int(lst.getsockname()[1])


def _declare(mesh: Mesh, path: str, port: int) -> tuple[str, int]:
    """The destination the clients dial for ``path``, declared as that path needs."""
    with mesh.store.update() as tx:
        if path in ("svc", "routed"):
            http = ServicePort(80, port, name="http", app_protocol="http")
            endpoints = (Endpoint(SERVER),)
            tx.put_service(Service("web", "default", (VIP,), (http,), {"app": "server"}, endpoints))
        if path == "routed":  # the bench lab's HTTPRoute (bench/testbed.py) over two Services
            for name in ROUTE_BACKENDS:
                tx.put_service(Service(name, "default", (), (http,), {"app": "server"}, endpoints))
            tx.put_route(ROUTE)
        elif path == "pod":
            server = workload("server", "node2", SERVER, app="server")
            tx.put_workload(replace(server, http_ports=frozenset({port})))
    return (VIP, 80) if path in ("svc", "routed") else (SERVER, port)


POLICY = PolicyObject(
    "AuthorizationPolicy",
    "default",
    "bench-allow",
    {
        "selector": {"matchLabels": {"app": "server"}},
        "action": "ALLOW",
        "rules": [{"to": [{"operation": {"paths": ["/*"]}}]}],
    },
)


def police(mesh: Mesh) -> None:
    """``--policed``: the server pod selected by an ALLOW policy every request meets."""
    with mesh.store.update() as tx:
        tx.put_policy(POLICY)


def _callgrind(on: bool) -> None:
    command = ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())]
    subprocess.run(command, check=True, capture_output=True)


async def run(args: argparse.Namespace) -> list[float]:
    loop = asyncio.get_running_loop()
    mesh = Mesh(handshake_timeout=120.0 if args.callgrind else 10.0)
    await mesh.start()
    try:
        telemetry(mesh)
        port = free_port(SERVER)
        dst = _declare(mesh, args.path, port)
        if args.policed:
            police(mesh)
        server = await loop.create_server(App, SERVER, port)

        async def batch(per_connection: int) -> None:
            done: list[asyncio.Future[None]] = []
            for _ in range(args.connections):
                host, p = dst if args.path == "direct" else await _captured(mesh, dst)
                finished: asyncio.Future[None] = loop.create_future()
                made = _made(Client(per_connection, finished))
                await loop.create_connection(made, host, p, local_addr=(CLIENT, 0))
                done.append(finished)
            await asyncio.wait_for(asyncio.gather(*done), 600)

        per_round = await rounds(args, batch, args.requests)
        server.close()
        return per_round
    finally:
        await mesh.close()


def telemetry(mesh: Mesh) -> None:
    """Request telemetry on both proxies, as the agent wires it."""
    for node in (mesh.node1, mesh.node2):
        node.core.registry.observers.append(TcpMetrics(mesh.store))
        metrics = HttpMetrics(mesh.store, sampler=RequestSampler(1.0))
        node.core.registry.request_observers.append(metrics)


async def rounds(
    args: argparse.Namespace, batch: Callable[[int], Awaitable[None]], total: int
) -> list[float]:
    """A warm-up batch (connections, sessions, label series and caches made), then
    ``args.rounds`` measured batches of ``total`` exchanges over ``args.connections``: the
    process CPU µs per exchange of each (callgrind's instrumentation on only meanwhile)."""
    await batch(50)
    per_round: list[float] = []
    per_connection = total // args.connections
    profile = cProfile.Profile() if args.profile else None
    for _ in range(args.rounds):
        if args.callgrind:
            _callgrind(True)
        if profile is not None:
            profile.enable()
        started = time.process_time()
        await batch(per_connection)
        used = time.process_time() - started
        if profile is not None:
            profile.disable()
        if args.callgrind:
            _callgrind(False)
        per_round.append(used / (per_connection * args.connections) * 1e6)
    if profile is not None:
        profile.dump_stats(args.profile)
    return per_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", choices=["svc", "routed", "pod", "l4", "direct"])
    parser.add_argument("--requests", type=int, default=4000, help="per measured round")
    report(parser, run, "request")


def report(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], Awaitable[list[float]]],
    unit: str,
) -> None:
    """Run ``run`` (``measure``) and print each round's CPU µs per ``unit`` and the best."""
    per_round = measure(parser, run)
    shown = " ".join(f"{us:.1f}" for us in per_round)
    path = parser.parse_args().path
    print(f"{path}: process CPU µs per {unit}: {shown}; best {min(per_round):.1f}")


def measure(
    parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Awaitable[list[float]]]
) -> list[float]:
    """The harnesses' shared options and set-up: root, callgrind's timeouts, the access log
    through ``logging.basicConfig``'s format, uvloop; ``run``'s CPU µs per round."""
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--no-access-log", action="store_true", help="the log's logger off")
    parser.add_argument("--log", default=os.devnull, help="where the access log goes")
    parser.add_argument("--callgrind", action="store_true", help="see bench_http_cpu's docstring")
    parser.add_argument("--profile", help="cProfile stats of the measured rounds to this file")
    parser.add_argument("--policed", action="store_true", help="see bench_http_cpu's docstring")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("the mesh's sockets need root (SO_MARK, IP_TRANSPARENT): run with sudo")
    if args.callgrind:  # ~50x slower: no connect may time out
        settings: Any = mesh_module.ProxySettings
        mesh_module.ProxySettings = lambda **kw: settings(**{**kw, "connect_timeout": 120.0})  # type: ignore[misc,assignment]
    with open(args.log, "a") as log_file:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=log_file,
        )
        if args.no_access_log:
            logging.getLogger(ACCESS_LOGGER).setLevel(logging.WARNING)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(run(args))


if __name__ == "__main__":
    main()
