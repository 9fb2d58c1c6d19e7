"""The plaintext inbound listener (15006) limits connections per client address as 15008 does.

Any address that reaches a meshed pod can connect to 15006, so without a limit one client could
open connections until the agent ran out of file descriptors. With a small
``InboundLimits.max_connections_per_peer`` these show that the connection past it is reset and
counted as ``peer_connection_limit``, that other addresses are served, and that every way a
connection ends (relay, HTTP on a declared port, a policy denial, an unreachable pod) gives its
slot back. Loopback only, as ``test_proxy_loopback.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from agent.proxy.hbone_limits import InboundLimits
from agent.state import Endpoint, PolicyObject, Service, ServicePort
from tests.integration.proxy.mesh import OUTSIDER, PLAIN, SERVER, Mesh, mesh_test, set_policies

pytestmark = pytest.mark.root

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
VIP = "10.96.7.10"


async def echo_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers with the peer's address, then echoes until EOF."""
    writer.write(f"peer={writer.get_extra_info('peername')[0]}\n".encode())
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def http_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One HTTP/1.1 answer to one request head, then close."""
    with contextlib.suppress(OSError):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()
    writer.close()


async def plaintext(mesh: Mesh, src: str, dst: tuple[str, int]) -> Conn:
    """A connection from outside the mesh at ``src`` captured into node2's 15006."""
    return await mesh.connect(src, dst, via="inbound", proxy=mesh.node2)


async def served(conn: Conn, src: str) -> bool:
    """True when the pod answered (its first line names ``src``)."""
    line = await asyncio.wait_for(conn[0].readline(), 10)
    return line == f"peer={src}\n".encode()


async def reset(conn: Conn) -> bool:
    """True when the proxy reset the connection before any byte."""
    try:
        await asyncio.wait_for(conn[0].read(), 10)
    except ConnectionResetError:
        return True
    finally:
        conn[1].close()
    return False


async def released(mesh: Mesh, src: str, held: int = 0) -> bool:
    """True once node2's plaintext listener holds at most ``held`` slots for ``src``: a
    connection the client closed ends at the proxy a moment later (polled, bounded)."""
    for _ in range(500):
        if mesh.node2.plaintext.peers.held.get(src, 0) <= held:
            return True
        await asyncio.sleep(0.01)
    return False


def limit(mesh: Mesh, n: int) -> None:
    mesh.node2.plaintext.limits = InboundLimits(max_connections_per_peer=n)


@mesh_test
async def test_connections_past_the_limit_from_one_address_are_reset_and_counted(
    mesh: Mesh,
) -> None:
    limit(mesh, 3)
    port = mesh.app(SERVER, echo_peer)
    rejections = mesh.node2.core.registry.rejections
    first = [await plaintext(mesh, OUTSIDER, (SERVER, port)) for _ in range(3)]
    for conn in first:
        assert await served(conn, OUTSIDER)
    assert await reset(await plaintext(mesh, OUTSIDER, (SERVER, port)))
    assert rejections["peer_connection_limit"] == 1
    other = await plaintext(mesh, PLAIN, (SERVER, port))  # another address has its own slots
    assert await served(other, PLAIN)
    first[0][1].close()  # one of the three ends: its slot is free again
    assert await released(mesh, OUTSIDER, held=2)
    again = await plaintext(mesh, OUTSIDER, (SERVER, port))
    assert await served(again, OUTSIDER)
    assert rejections["peer_connection_limit"] == 1
    for conn in [*first[1:], other, again]:
        conn[1].close()


def _declare_http(mesh: Mesh, port: int) -> None:
    with mesh.store.update() as tx:
        sp = ServicePort(80, port, name="http-web", app_protocol="http")
        endpoints = (Endpoint(SERVER),)
        tx.put_service(Service("svc", "default", (VIP,), (sp,), {"app": "server"}, endpoints))


async def _denied(mesh: Mesh) -> None:
    port = mesh.app(SERVER, echo_peer)
    spec = {"action": "DENY", "rules": [{"to": [{"operation": {"ports": [str(port)]}}]}]}
    set_policies(mesh.store, PolicyObject("AuthorizationPolicy", "default", "deny", spec))
    for n in (1, 2):
        assert await reset(await plaintext(mesh, OUTSIDER, (SERVER, port)))
        assert mesh.node2.core.registry.denials["default/deny"] == n


async def _http(mesh: Mesh) -> None:
    port = mesh.app(SERVER, http_ok)
    _declare_http(mesh, port)
    for _ in range(2):
        reader, writer = await plaintext(mesh, OUTSIDER, (SERVER, port))
        writer.write(b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"ok"), answer
        assert await released(mesh, OUTSIDER)


async def _closed_by_policy(mesh: Mesh) -> None:
    """A relayed connection that a DENY applied later closes (its task is cancelled)."""
    port = mesh.app(SERVER, echo_peer)
    for n in (1, 2):
        set_policies(mesh.store)
        conn = await plaintext(mesh, OUTSIDER, (SERVER, port))
        assert await served(conn, OUTSIDER)
        spec = {"action": "DENY", "rules": [{"to": [{"operation": {"ports": [str(port)]}}]}]}
        set_policies(mesh.store, PolicyObject("AuthorizationPolicy", "default", "deny", spec))
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(conn[0].read(), 10) == b""
        conn[1].close()
        assert mesh.node2.core.registry.denials["default/deny"] == n
        assert await released(mesh, OUTSIDER)


async def _unreachable(mesh: Mesh) -> None:
    for n in (1, 2):  # nothing listens on the pod's port 9
        assert await reset(await plaintext(mesh, OUTSIDER, (SERVER, 9)))
        assert mesh.node2.core.registry.rejections["upstream_unreachable"] == n


ENDINGS = {
    "policy_denied": _denied,
    "closed_by_a_later_policy": _closed_by_policy,
    "http_declared_port": _http,
    "upstream_unreachable": _unreachable,
}


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_every_way_a_connection_ends_releases_its_slot(ending: str) -> None:
    """With one slot per address, two connections in a row that end this way, then a relayed
    one, are all served: each gave its slot back (the client sees the end only after that, or
    the HTTP case waits for it); a second connection beside the relayed one is reset."""
    @mesh_test
    async def scenario(mesh: Mesh) -> None:
        limit(mesh, 1)
        await ENDINGS[ending](mesh)
        assert await released(mesh, OUTSIDER)
        echo = mesh.app(SERVER, echo_peer)
        conn = await plaintext(mesh, OUTSIDER, (SERVER, echo))
        assert await served(conn, OUTSIDER)
        rejections = mesh.node2.core.registry.rejections
        assert rejections["peer_connection_limit"] == 0
        # and the limit was in force all along: the one slot is taken now
        assert await reset(await plaintext(mesh, OUTSIDER, (SERVER, echo)))
        assert rejections["peer_connection_limit"] == 1
        conn[1].close()

    scenario()


def test_refusals_are_all_counted_and_logged_once_while_the_client_stays_at_the_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that keeps connecting past the limit cannot make the agent write a line for
    each refusal; once one of its connections has ended, the next refusal is logged again."""
    caplog.set_level(logging.INFO, logger="agent.proxy.records")

    def logged() -> int:
        return sum("rejected (peer_connection_limit)" in r.getMessage() for r in caplog.records)

    @mesh_test
    async def scenario(mesh: Mesh) -> None:
        limit(mesh, 1)
        port = mesh.app(SERVER, echo_peer)
        rejections = mesh.node2.core.registry.rejections
        held = await plaintext(mesh, OUTSIDER, (SERVER, port))
        assert await served(held, OUTSIDER)
        for _ in range(3):
            assert await reset(await plaintext(mesh, OUTSIDER, (SERVER, port)))
        assert (rejections["peer_connection_limit"], logged()) == (3, 1)
        held[1].close()
        assert await released(mesh, OUTSIDER)
        held = await plaintext(mesh, OUTSIDER, (SERVER, port))
        assert await served(held, OUTSIDER)
        for _ in range(2):
            assert await reset(await plaintext(mesh, OUTSIDER, (SERVER, port)))
        assert (rejections["peer_connection_limit"], logged()) == (5, 2)
        held[1].close()

    scenario()
