"""Connections past a pod's limit on 15001, or past the process's cap, are reset at once and
counted, while what is open keeps working and the agent keeps answering (loopback only).

Passthrough (no CA) in a child process whose descriptor limit is 300 (``capped_agent``): its
cap is 75 connections (300 less a reserve of 150, two descriptors each). Without the cap, the
130 connections opened here needed about 260 descriptors: at EMFILE the accept loop retried
every 0.1 s while clients waited in the queue, and the admin and metrics servers (uvloop)
accepted and closed every connection. The node proxy (with a CA): the per-pod limit on 15001
through the accept loop as the agent wires it (``wiring.connection_caps``), counted in the
proxy's rejection counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from agent.acceptor import accept_forever, serve_accepted
from agent.base.conncaps import GLOBAL_LIMIT, POD_LIMIT
from agent.base.constants import Listener
from agent.config import AgentConfig
from agent.proxy import sockets
from agent.wiring import connection_caps
from tests.integration.proxy.mesh import CLIENT, LOCAL, OUTSIDER, Mesh, listener, mesh_test

pytestmark = pytest.mark.root

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
ROOT = Path(__file__).parents[3]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def open_from(source: str, port: int) -> Conn:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def works(conn: Conn) -> bool:
    """True when a byte sent comes back (the connection is relayed to the echo server)."""
    conn[1].write(b"x")
    try:
        return await asyncio.wait_for(conn[0].readexactly(1), 10) == b"x"
    except (OSError, asyncio.IncompleteReadError):
        return False


async def reset(source: str, port: int) -> bool:
    """True when the agent reset a new connection from ``source`` before any byte (on loopback
    the reset may come before the client's ``connect`` has returned)."""
    try:
        reader, writer = await open_from(source, port)
    except ConnectionResetError:
        return True
    try:
        await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return True
    finally:
        writer.close()
    return False


async def served_soon(source: str, port: int, held: list[Conn]) -> bool:
    """True once a new connection from ``source`` is relayed (kept in ``held``): the agent
    sees the end of a connection a client closed a moment later (polled, bounded)."""
    for _ in range(100):
        with contextlib.suppress(ConnectionResetError):
            conn = await open_from(source, port)
            held.append(conn)
            if await works(conn):
                return True
        await asyncio.sleep(0.05)
    return False


def get(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        return answer.status, answer.read().decode()


def counted(metrics: str, reason: str) -> float:
    line = f'nodemesh_rejected_connections_total{{reason="{reason}"}} '
    found = [float(s.removeprefix(line)) for s in metrics.splitlines() if s.startswith(line)]
    return found[0] if found else 0.0


def test_past_each_limit_connections_are_reset_and_counted_and_the_agent_keeps_serving() -> None:
    async def scenario() -> None:
        # On an address no client uses: a connection from an address to itself is refused
        # (``resolve.looped``).
        server = await asyncio.start_server(echo, "127.0.0.9", 0)
        echo_port = server.sockets[0].getsockname()[1]
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.integration.proxy.capped_agent",
            "--nofile=300",
            "--per-pod=20",
            f"--echo=127.0.0.9:{echo_port}",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        held: list[Conn] = []
        try:
            assert child.stdout is not None
            started = json.loads(await asyncio.wait_for(child.stdout.readline(), 60))
            ports, cap = started["ports"], started["cap"]
            assert cap == 75  # (300 - 150) // 2
            outbound, inbound = ports["OUTBOUND"], ports["INBOUND"]
            first = await open_from("127.0.0.1", outbound)
            assert await works(first)
            held.append(first)
            for _ in range(19):
                held.append(await open_from("127.0.0.1", outbound))
            assert all([await works(c) for c in held])
            # the pod's 21st: reset, counted, and its other connections are untouched
            assert await reset("127.0.0.1", outbound)
            for source in ("127.0.0.2", "127.0.0.3"):  # other pods up to the process's cap
                held += [await open_from(source, outbound) for _ in range(20)]
            held += [await open_from("127.0.0.4", inbound) for _ in range(15)]  # 15006 too
            assert all([await works(c) for c in held]) and len(held) == cap
            # the process is full: every listener, every source, reset at once
            for n in range(55):
                port = inbound if n % 2 else outbound
                assert await reset(f"127.0.0.{5 + n % 3}", port)
            assert await works(first)  # what was open keeps working
            status, _ = await asyncio.to_thread(get, ports["admin"], "/status")
            assert status == 200  # and the admin API answers
            _, metrics = await asyncio.to_thread(get, ports["metrics"], "/metrics")
            assert counted(metrics, POD_LIMIT) == 1
            assert counted(metrics, GLOBAL_LIMIT) == 55
            assert 'reason="EMFILE"' not in metrics  # never out of descriptors
            for conn in held[-5:]:  # five end: their slots are free again
                conn[1].close()
            del held[-5:]
            assert await served_soon("127.0.0.8", outbound, held)
        finally:
            for _, writer in held:
                writer.close()
            if child.stdin is not None:
                child.stdin.close()
            try:
                await asyncio.wait_for(child.wait(), 10)
            except TimeoutError:
                child.kill()
                await child.wait()
            server.close()

    asyncio.run(scenario())


@mesh_test
async def test_a_pod_past_its_limit_on_the_outbound_listener_is_reset_and_counted_by_the_proxy(
    mesh: Mesh,
) -> None:
    """The node proxy's 15001 as the agent serves it: accept loop, gate, ``serve_accepted``,
    ``Outbound.handle``; refusals in the proxy's own rejection counter."""
    node = mesh.node1
    config = AgentConfig(node="node1", pin_dir=Path("/nonexistent"), max_connections_per_pod=3)
    caps = connection_caps(config, passthrough=False)
    caps.reject = node.core.registry.reject
    gate = caps.gate(Listener.OUTBOUND)
    port = mesh.app(LOCAL, echo)
    sock = listener("127.0.0.1")
    mesh._sockets.append(sock)
    connections: set[asyncio.Future[None]] = set()

    async def captured(conn: socket.socket, slot: Listener) -> asyncio.Future[None] | None:
        sockets.accepted(conn)  # as ``ProxyComponent.handle``
        return await node.outbound.handle(conn, original_dst=(LOCAL, port))

    def serve(conn: socket.socket) -> None:
        task = asyncio.create_task(
            serve_accepted(captured, conn, Listener.OUTBOUND, connections, gate)
        )
        connections.add(task)
        task.add_done_callback(connections.discard)

    mesh._tasks.append(
        asyncio.create_task(accept_forever(sock, serve, listener="OUTBOUND", gate=gate))
    )
    listen_port = sock.getsockname()[1]
    try:
        held = [await open_from(CLIENT, listen_port) for _ in range(3)]
        assert all([await works(c) for c in held])
        assert await reset(CLIENT, listen_port)
        assert node.core.registry.rejections[POD_LIMIT] == 1
        assert await works(held[0])
        # another pod has its own slots (not LOCAL itself: a connection from an address to
        # itself is refused, ``resolve.looped``)
        other = await open_from(OUTSIDER, listen_port)
        assert await works(other)
        held[0][1].close()
        assert await served_soon(CLIENT, listen_port, held)
        for conn in [*held, other]:
            conn[1].close()
    finally:
        for served in list(connections):
            served.cancel()
