"""A passthrough agent's serving half in a process of its own, under a small descriptor limit.

Run by ``test_connection_caps_loopback.py`` (not a test itself): ``RLIMIT_NOFILE`` is set to
``--nofile`` (soft and hard), then what a single-process agent without a CA runs for its
listeners is started as ``agent.app.Agent`` wires it: the caps (``wiring.connection_caps``,
passthrough), an accept loop per listener with its gate (``accept_forever``, ``serve_accepted``),
plain passthrough (``agent.proxy.passthrough``), ``/metrics`` with the rejection counter
(``wiring.observability``'s source for it) and the admin API. The listeners are on 127.0.0.1
and every connection goes to ``--echo`` (a loopback listener has no original destination to
go to). Prints one JSON line (the ports, the cap), then serves until stdin closes.

    python -m tests.integration.proxy.capped_agent --nofile 300 --per-pod 20 --echo IP:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import uvloop

from agent.acceptor import accept_forever, serve_accepted
from agent.admin.api import AdminSources
from agent.admin.component import AdminComponent
from agent.base.conncaps import Gate
from agent.base.constants import Listener
from agent.config import AgentConfig
from agent.proxy.passthrough import Passthrough
from agent.state import StateStore
from agent.telemetry.agentmetrics import AgentSources
from agent.telemetry.component import TelemetryComponent
from agent.wiring import connection_caps, rejection_counts

SLOTS = (Listener.OUTBOUND, Listener.INBOUND)


async def main(args: argparse.Namespace) -> None:
    host, port = args.echo.rsplit(":", 1)
    echo = (host, int(port))
    config = AgentConfig(
        node="n1", pin_dir=Path("/nonexistent"), max_connections_per_pod=args.per_pod
    )
    caps = connection_caps(config, passthrough=True)
    passthrough = Passthrough()

    async def handle(conn: socket.socket, slot: Listener) -> asyncio.Future[None] | None:
        await passthrough.handle(conn, slot, original_dst=echo)
        return None

    connections: set[asyncio.Future[None]] = set()
    loops = []
    ports = {}
    for slot in SLOTS:
        sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        sock.setblocking(False)
        ports[slot.name] = sock.getsockname()[1]
        gate = caps.gate(slot)

        def serve(conn: socket.socket, slot: Listener = slot, gate: Gate = gate) -> None:
            task = asyncio.create_task(serve_accepted(handle, conn, slot, connections, gate))
            connections.add(task)
            task.add_done_callback(connections.discard)

        loops.append(
            asyncio.create_task(accept_forever(sock, serve, listener=slot.name, gate=gate))
        )
    store = StateStore()
    parts = SimpleNamespace(proxy=None, caps=caps)
    metrics = TelemetryComponent(
        store=store,
        address=("127.0.0.1", 0),
        sources=AgentSources(rejections=rejection_counts(parts)),
    )
    admin = AdminComponent(
        address=("127.0.0.1", 0),
        sources=AdminSources(node="n1", store=store, config={}, not_ready=list, drain=lambda: None),
    )
    for component in (metrics, admin):
        await component.start()
    ports.update(metrics=metrics.port, admin=admin.port)
    print(json.dumps({"ports": ports, "cap": caps.total}), flush=True)
    stdin = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin
    )
    await stdin.read()
    for task in loops:
        task.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--nofile", type=int, required=True)
    parser.add_argument("--per-pod", type=int, required=True)
    parser.add_argument("--echo", required=True)
    parsed = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (parsed.nofile, parsed.nofile))
    uvloop.run(main(parsed))
