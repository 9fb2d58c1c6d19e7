"""Hostile HBONE peers over real TLS sockets on loopback (issue 15): each is refused with its
cause counted, what its connection makes the server hold stays under the bound, and a tunnel on
another connection keeps flowing; ordinary peers that look alike are not refused."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import ssl
from collections.abc import Iterator

import pytest
from hpack import Encoder

from agent.base.metrics import REGISTRY
from agent.proxy.h2wire import HboneSettings
from agent.proxy.hbone_limits import InboundLimits, connection_memory_bound
from agent.proxy.tunnel import HboneProtocol
from tests.integration.proxy.mesh import CLIENT, CLIENT_ID, LOCAL, SERVER, Mesh, listener, mesh_test
from tests.integration.proxy.test_hbone_bad_input import (
    Conn,
    closed_by_server,
    h2_session,
    status_of,
    still_serves,
    tls_connect,
    wait_for_count,
)
from tests.integration.proxy.test_proxy_loopback import echo_peer
from tests.unit.proxy.hostile import END_HEADERS, HEADERS, PING, RST_STREAM, frame

pytestmark = pytest.mark.root

BOUND = connection_memory_bound(HboneSettings())


def refusals(cause: str) -> float:
    return REGISTRY.get_sample_value("nodemesh_hbone_refusals_total", {"cause": cause}) or 0.0


@contextlib.contextmanager
def error_logs() -> Iterator[list[logging.LogRecord]]:
    """ERROR records logged meanwhile (a traceback per hostile connection is a defect)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    try:
        yield records
    finally:
        logging.getLogger().removeHandler(handler)


async def live_tunnel(mesh: Mesh) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An established tunnel client pod -> server pod through both proxies."""
    port = mesh.app(SERVER, echo_peer)
    reader, writer = await mesh.connect(CLIENT, (SERVER, port))
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"peer=")
    return reader, writer


async def still_flows(tunnel: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bool:
    reader, writer = tunnel
    writer.write(b"still here\n")
    return await asyncio.wait_for(reader.readline(), 10) == b"still here\n"


async def non_reading_session(mesh: Mesh) -> Conn:
    """An HBONE client (preface and SETTINGS sent) with a tiny receive buffer that never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((CLIENT, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (SERVER, mesh.hbone_port))
    conn, _ = await h2_session(mesh, sock=sock)
    return conn  # nobody reads ``conn[0]``: once its buffer is full, the socket is not read


async def measure_held(mesh: Mesh, known: set[HboneProtocol]) -> list[int]:
    """The server side of the newest inbound connection records, after each read it handles,
    what it holds by its own accounting; returns [peak]."""
    for _ in range(200):
        new = mesh.node2.inbound.connections - known
        if new:
            break
        await asyncio.sleep(0.01)
    (proto,) = new
    peak = [0]
    receive = proto.data_received

    def measured(data: bytes) -> None:
        receive(data)
        peak[0] = max(peak[0], proto.held_bytes())

    proto.data_received = measured  # type: ignore[method-assign]
    return peak


@mesh_test
async def test_ping_flood_from_a_peer_that_does_not_read_is_cut_off(mesh: Mesh) -> None:
    tunnel = await live_tunnel(mesh)
    before = refusals("control_flood")
    known = set(mesh.node2.inbound.connections)
    _, writer = await non_reading_session(mesh)
    peak = await measure_held(mesh, known)
    pings = frame(PING, 0, 0, b"12345678") * 1000  # each read's replies fit the budget
    with contextlib.suppress(ConnectionError):
        for _ in range(1000):  # up to 17 MB of PINGs, sent as fast as the server reads
            writer.write(pings)
            await asyncio.wait_for(writer.drain(), 10)
            if refusals("control_flood") > before:
                break
    assert refusals("control_flood") == before + 1
    assert 0 < peak[0] <= BOUND
    writer.close()
    assert await still_flows(tunnel)
    assert await still_serves(mesh)


@mesh_test
async def test_sequential_cancels_of_pending_connects_keep_the_connection(mesh: Mesh) -> None:
    """A client whose per-try timeout resets each CONNECT while the server is still connecting
    (to a pod whose accept queue is full), one at a time: the connection survives them all."""
    stuck = listener(SERVER)  # backlog filled below: further SYNs are dropped, connects hang
    stuck.listen(0)
    filler = socket.create_connection(stuck.getsockname())
    before = refusals("rapid_reset")
    try:
        conn, h2c = await h2_session(mesh)
        port = stuck.getsockname()[1]
        for i in range(150):
            sid = 2 * i + 1
            h2c.send_headers(sid, [(":method", "CONNECT"), (":authority", f"{SERVER}:{port}")])
            conn[1].write(h2c.data_to_send())
            await asyncio.sleep(0.01)
            h2c.reset_stream(sid)
            conn[1].write(h2c.data_to_send())
        app = mesh.app(SERVER, echo_peer)
        h2c.send_headers(301, [(":method", "CONNECT"), (":authority", f"{SERVER}:{app}")])
        assert await status_of(conn, h2c, 301) == 200  # the same connection
        assert refusals("rapid_reset") == before
        conn[1].close()
    finally:
        filler.close()
        stuck.close()


@mesh_test
async def test_rapid_reset_burst_closes_only_its_connection(mesh: Mesh) -> None:
    tunnel = await live_tunnel(mesh)
    before = refusals("rapid_reset")
    conn, _ = await h2_session(mesh)
    block = Encoder().encode([(b":method", b"CONNECT"), (b":authority", f"{SERVER}:9".encode())])
    burst = b"".join(
        frame(HEADERS, END_HEADERS, sid, block) + frame(RST_STREAM, 0, sid, bytes(4))
        for sid in range(1, 2000, 2)
    )
    conn[1].write(burst)
    assert await closed_by_server(conn)
    assert refusals("rapid_reset") == before + 1
    assert await still_flows(tunnel)


@mesh_test
async def test_invalid_utf8_header_closes_cleanly(mesh: Mesh) -> None:
    before = refusals("invalid_header")
    with error_logs() as errors:
        conn, _ = await h2_session(mesh)
        block = Encoder().encode([(b":method", b"CONNECT"), (b":authority", b"\xff:80")])
        conn[1].write(frame(HEADERS, END_HEADERS, 1, block))
        assert await closed_by_server(conn)
    assert refusals("invalid_header") == before + 1
    assert errors == []
    assert await still_serves(mesh)


@mesh_test
async def test_refused_streams_do_not_wedge_the_pooled_connection(mesh: Mesh) -> None:
    """150 CONNECTs refused with 503 (nobody listens) through node1's pool: each client sees
    its connection closed, and the one pooled connection still opens streams."""
    for _ in range(150):
        conn = await mesh.connect(CLIENT, (SERVER, 9))
        assert await closed_by_server(conn)
    (pooled,) = mesh.node1.pool.connections()
    assert pooled.codec.can_open_stream() and pooled.codec.open_streams == 0
    assert mesh.node1.pool.dials == 1
    tunnel = await live_tunnel(mesh)
    assert await still_flows(tunnel)


@mesh_test
async def test_handshakes_in_progress_are_capped(mesh: Mesh) -> None:
    mesh.node2.inbound.limits = InboundLimits(max_handshakes=2)
    silent = [await asyncio.open_connection(SERVER, mesh.hbone_port) for _ in range(2)]
    await asyncio.sleep(0.1)
    third = await asyncio.open_connection(SERVER, mesh.hbone_port)
    assert await closed_by_server(third)
    assert await wait_for_count(mesh, "handshake_limit") == 1
    for _, writer in silent:
        writer.close()
    while mesh.node2.inbound.handshaking:
        await asyncio.sleep(0.02)
    assert await still_serves(mesh)


@mesh_test
async def test_connections_per_peer_are_capped(mesh: Mesh) -> None:
    mesh.node2.inbound.limits = InboundLimits(max_connections_per_peer=2)
    first = [await tls_connect(mesh, mesh.ca.issue(CLIENT_ID)) for _ in range(2)]
    with pytest.raises((ConnectionError, ssl.SSLError)):  # reset before any TLS
        await tls_connect(mesh, mesh.ca.issue(CLIENT_ID))
    assert await wait_for_count(mesh, "peer_connection_limit") == 1
    other = await tls_connect(mesh, mesh.ca.issue(CLIENT_ID), source=LOCAL)  # another address
    assert not other[0].at_eof()
    for conn in [*first, other]:
        conn[1].close()


def test_refusals_past_the_per_peer_cap_are_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer that keeps connecting past the cap cannot make the agent write a line for each
    refusal (``conncaps.PeerSlots``); every refusal is counted."""
    caplog.set_level(logging.INFO, logger="agent.proxy.records")

    @mesh_test
    async def scenario(mesh: Mesh) -> None:
        mesh.node2.inbound.limits = InboundLimits(max_connections_per_peer=1)
        held = await tls_connect(mesh, mesh.ca.issue(CLIENT_ID))
        for n in (1, 2, 3):
            with pytest.raises((ConnectionError, ssl.SSLError)):  # reset before any TLS
                await tls_connect(mesh, mesh.ca.issue(CLIENT_ID))
            assert await wait_for_count(mesh, "peer_connection_limit", n) == n
        lines = [r for r in caplog.records if "(peer_connection_limit)" in r.getMessage()]
        assert len(lines) == 1
        held[1].close()

    scenario()


@mesh_test
async def test_idle_inbound_connection_is_closed(mesh: Mesh) -> None:
    mesh.node2.inbound.limits = InboundLimits(idle_timeout=0.3)
    conn, _ = await h2_session(mesh)
    assert await closed_by_server(conn)
    for _ in range(100):
        if not mesh.node2.inbound.connections:
            break
        await asyncio.sleep(0.02)
    assert not mesh.node2.inbound.connections


@mesh_test
async def test_server_closes_a_connection_whose_peer_does_not_answer_pings(mesh: Mesh) -> None:
    """Server-side keepalive: a client that never answers PING (it reads, but its h2 state is
    never fed) is closed after ``ping_timeout``."""
    usual = mesh.node2.core.settings
    quick = HboneSettings(ping_interval=0.2, ping_timeout=0.3)
    mesh.node2.core.settings = dataclasses.replace(usual, hbone=quick)
    conn, _ = await h2_session(mesh)
    assert await closed_by_server(conn)
    mesh.node2.core.settings = usual  # the next client does not answer PINGs either
    assert await still_serves(mesh)
