"""The outbound listener is no way into the node itself: a captured connection to a loopback
address the state does not know (the agent's admin API on 127.0.0.1, which a pod reaches only
through the proxy when the node sets ``route_localnet``, as kube-proxy does), and a connection
from an address to itself (the proxy's own passthrough coming back to its listener: a client
that dials NODE_IP:15001 made the proxy dial it again, for ever), are refused and counted.

Root is needed for SO_MARK; only 127/8 addresses that loopback already owns are used."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from agent.proxy import sockets
from tests.integration.proxy.mesh import CLIENT, OUTSIDER, PLAIN, Mesh, listener, mesh_test

pytestmark = pytest.mark.root


async def _refused(reader: asyncio.StreamReader) -> bool:
    """The proxy closed the client without a byte (a reset or an end)."""
    try:
        return await asyncio.wait_for(reader.read(), 10) == b""
    except ConnectionResetError:
        return True


def _counting_listener(mesh: Mesh, ip: str) -> tuple[socket.socket, list[socket.socket]]:
    """A listener on ``ip`` that only counts (and keeps) what it accepts."""
    sock = listener(ip)
    mesh._sockets.append(sock)
    accepted: list[socket.socket] = []

    async def accept() -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            accepted.append(conn)
            mesh._sockets.append(conn)

    mesh._tasks.append(asyncio.create_task(accept()))
    return sock, accepted


@mesh_test
async def test_a_pod_cannot_reach_the_nodes_loopback_through_the_proxy(mesh: Mesh) -> None:
    admin, accepted = _counting_listener(mesh, "127.0.0.1")  # stands for 127.0.0.1:15000
    reader, writer = await mesh.connect(CLIENT, admin.getsockname())
    writer.write(b"GET /config_dump HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await _refused(reader)
    writer.close()
    assert accepted == []
    assert mesh.node1.core.registry.rejections["own_address"] == 1


@mesh_test
async def test_a_connection_to_the_proxys_own_listener_does_not_loop(mesh: Mesh) -> None:
    """``OUTSIDER``'s address stands for the node's: the proxy's listener is bound there and a
    connection from it to it is what the proxy's passthrough to NODE_IP:15001 looks like."""
    own = listener(OUTSIDER)
    mesh._sockets.append(own)
    served: list[int] = []

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        while len(served) < 20:  # on the old code the chain grows until this bound
            conn, _ = await loop.sock_accept(own)
            conn.setblocking(False)
            sockets.accepted(conn)
            served.append(1)
            mesh._tasks.append(asyncio.create_task(_handle(mesh, conn)))

    mesh._tasks.append(asyncio.create_task(serve()))
    reader, writer = await asyncio.open_connection(*own.getsockname(), local_addr=(OUTSIDER, 0))
    writer.write(b"x")
    assert await _refused(reader)
    writer.close()
    await asyncio.sleep(0.2)
    assert len(served) == 1
    assert mesh.node1.core.registry.rejections["own_address"] == 1


async def _handle(mesh: Mesh, conn: socket.socket) -> None:
    rest = await mesh.node1.outbound.handle(conn)
    if rest is not None:
        with contextlib.suppress(Exception):
            await rest


@mesh_test
async def test_a_loopback_address_the_state_knows_as_a_pod_is_still_a_destination(
    mesh: Mesh,
) -> None:
    """The loopback mesh's pods live in 127/8; a pod of the state is never refused as the
    node's own address."""
    plain, accepted = _counting_listener(mesh, PLAIN)
    _, writer = await mesh.connect(CLIENT, plain.getsockname())
    await asyncio.sleep(0.2)
    assert len(accepted) == 1
    writer.close()
    assert mesh.node1.core.registry.rejections["own_address"] == 0
