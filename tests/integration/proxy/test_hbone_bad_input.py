"""Hostile or broken HBONE clients: each is refused with the right status or close, counted
under its reason, and the proxy keeps serving a good client afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import tempfile
from pathlib import Path

import h2.config
import h2.connection
import h2.events

from agent.identity.certs import WorkloadCertificate
from agent.identity.keysmith import certificate
from agent.identity.tls import client_context
from tests.integration.proxy.mesh import (
    CLIENT,
    CLIENT_ID,
    LOCAL,
    SERVER,
    Mesh,
    TestCA,
    mesh_test,
    mesh_test_with,
)

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def tls_connect(
    mesh: Mesh,
    cert: WorkloadCertificate,
    alpn: str = "h2",
    *,
    source: str = CLIENT,
    sock: socket.socket | None = None,
) -> Conn:
    """A TLS connection to the server pod's HBONE port from ``source`` (or over ``sock``)."""
    ctx = client_context(cert, None, roots=[certificate(mesh.ca.root)])
    ctx.set_alpn_protocols([alpn])
    if sock is not None:
        return await asyncio.open_connection(ssl=ctx, server_hostname="", sock=sock)
    return await asyncio.open_connection(
        SERVER, mesh.hbone_port, ssl=ctx, server_hostname="", local_addr=(source, 0)
    )


async def closed_by_server(conn: Conn) -> bool:
    """True once the server closed the connection (EOF, reset or TLS alert)."""
    reader, writer = conn
    try:
        while await asyncio.wait_for(reader.read(65536), 10):
            pass
    except (ConnectionError, ssl.SSLError):
        pass
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()
    return True


async def wait_for_count(mesh: Mesh, reason: str, n: int = 1) -> int:
    for _ in range(200):
        if mesh.node2.core.registry.rejections[reason] >= n:
            break
        await asyncio.sleep(0.02)
    return mesh.node2.core.registry.rejections[reason]


async def h2_session(
    mesh: Mesh, cert: WorkloadCertificate | None = None, *, sock: socket.socket | None = None
) -> tuple[Conn, h2.connection.H2Connection]:
    conn = await tls_connect(mesh, cert or mesh.ca.issue(CLIENT_ID), sock=sock)
    h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    h2c.initiate_connection()
    conn[1].write(h2c.data_to_send())
    return conn, h2c


async def status_of(conn: Conn, h2c: h2.connection.H2Connection, stream_id: int) -> int | None:
    """The :status answered on ``stream_id``, or None if the connection closed first."""
    reader, writer = conn
    writer.write(h2c.data_to_send())
    while data := await asyncio.wait_for(reader.read(65536), 10):
        for event in h2c.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                return int(dict(event.headers)[b":status"])
        writer.write(h2c.data_to_send())
    return None


async def still_serves(mesh: Mesh) -> bool:
    conn, h2c = await h2_session(mesh)
    port = mesh.app(SERVER, _hello)
    h2c.send_headers(1, [(":method", "CONNECT"), (":authority", f"{SERVER}:{port}")])
    status = await status_of(conn, h2c, 1)
    conn[1].close()
    return status == 200


async def _hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"hello")
    writer.close()


@mesh_test
async def test_non_tls_bytes_are_refused(mesh: Mesh) -> None:
    reader, writer = await asyncio.open_connection(SERVER, mesh.hbone_port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await closed_by_server((reader, writer))
    assert await wait_for_count(mesh, "tls_handshake_failed") == 1
    assert await still_serves(mesh)


@mesh_test
async def test_wrong_alpn_is_refused(mesh: Mesh) -> None:
    conn = await tls_connect(mesh, mesh.ca.issue(CLIENT_ID), alpn="http/1.1")
    assert await closed_by_server(conn)
    assert await wait_for_count(mesh, "wrong_alpn") == 1
    assert await still_serves(mesh)


@mesh_test
async def test_untrusted_client_certificate_is_refused(mesh: Mesh) -> None:
    conn = await tls_connect(mesh, TestCA("someone else").issue(CLIENT_ID))
    assert await closed_by_server(conn)
    assert await wait_for_count(mesh, "tls_handshake_failed") == 1
    assert await still_serves(mesh)


@mesh_test
async def test_expired_client_certificate_is_refused(mesh: Mesh) -> None:
    conn = await tls_connect(mesh, mesh.ca.issue(CLIENT_ID, expired=True))
    assert await closed_by_server(conn)
    assert await wait_for_count(mesh, "tls_handshake_failed") == 1
    assert await still_serves(mesh)


def lenient_context(cert: WorkloadCertificate, tmp: Path) -> ssl.SSLContext:
    """A client that presents ``cert`` and does not check the server (a test key, on tmpfs)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    (tmp / "client.pem").write_bytes(cert.chain_pem().encode() + cert.key.pem())
    ctx.load_cert_chain(tmp / "client.pem")
    ctx.set_alpn_protocols(["h2"])
    return ctx


@mesh_test
async def test_wrong_trust_domain_is_refused(mesh: Mesh) -> None:
    cert = mesh.ca.issue("spiffe://evil.example/ns/default/sa/client")
    with tempfile.TemporaryDirectory() as tmp:
        ctx = lenient_context(cert, Path(tmp))
    conn = await asyncio.open_connection(
        SERVER, mesh.hbone_port, ssl=ctx, server_hostname="", local_addr=(CLIENT, 0)
    )
    assert await closed_by_server(conn)
    assert await wait_for_count(mesh, "tls_handshake_failed") == 1
    assert await still_serves(mesh)


@mesh_test_with(handshake_timeout=0.3)
async def test_slow_handshake_hits_the_deadline(mesh: Mesh) -> None:
    conn = await asyncio.open_connection(SERVER, mesh.hbone_port)  # never speaks
    assert await closed_by_server(conn)
    assert await wait_for_count(mesh, "handshake_timeout") == 1
    assert await still_serves(mesh)


@mesh_test
async def test_connect_to_a_proxy_port_gets_400(mesh: Mesh) -> None:
    conn, h2c = await h2_session(mesh)
    h2c.send_headers(1, [(":method", "CONNECT"), (":authority", f"{SERVER}:15008")])
    assert await status_of(conn, h2c, 1) == 400
    assert mesh.node2.core.registry.rejections["proxy_port"] == 1
    conn[1].close()


@mesh_test
async def test_connect_to_a_non_local_ip_gets_400(mesh: Mesh) -> None:
    conn, h2c = await h2_session(mesh)
    h2c.send_headers(1, [(":method", "CONNECT"), (":authority", f"{CLIENT}:80")])
    assert await status_of(conn, h2c, 1) == 400
    assert mesh.node2.core.registry.rejections["authority_mismatch"] == 1
    conn[1].close()


@mesh_test
async def test_malformed_authority_gets_400(mesh: Mesh) -> None:
    conn, h2c = await h2_session(mesh)
    h2c.send_headers(1, [(":method", "CONNECT"), (":authority", "server.default.svc:80")])
    assert await status_of(conn, h2c, 1) == 400
    conn[1].close()


@mesh_test
async def test_oversized_headers_close_the_connection(mesh: Mesh) -> None:
    conn, h2c = await h2_session(mesh)
    headers = [(":method", "CONNECT"), (":authority", f"{SERVER}:80"), ("x-pad", "a" * 20000)]
    h2c.send_headers(1, headers)
    assert await status_of(conn, h2c, 1) is None
    assert await still_serves(mesh)


@mesh_test
async def test_stream_flood_closes_the_connection(mesh: Mesh) -> None:
    (reader, writer), _ = await h2_session(mesh)
    flood = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    flood.initiate_connection()  # a fresh state that never learns the server's stream limit
    flood.data_to_send()
    for i in range(150):
        flood.send_headers(2 * i + 1, [(":method", "CONNECT"), (":authority", f"{SERVER}:9")])
    writer.write(flood.data_to_send())
    assert await closed_by_server((reader, writer))
    assert await still_serves(mesh)


@mesh_test
async def test_unreachable_pod_gets_503(mesh: Mesh) -> None:
    conn, h2c = await h2_session(mesh)
    h2c.send_headers(1, [(":method", "CONNECT"), (":authority", f"{SERVER}:9")])  # nobody listens
    assert await status_of(conn, h2c, 1) == 503
    assert mesh.node2.core.registry.rejections["upstream_unreachable"] == 1
    conn[1].close()


async def _peer_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1)  # answer only once asked, so the answer follows the 200
    writer.write(f"peer={writer.get_extra_info('peername')[0]}\n".encode())
    await writer.drain()
    writer.close()


@mesh_test
async def test_forwarded_ip_of_another_identity_is_not_believed(mesh: Mesh) -> None:
    """The client pod's certificate claiming ``forwarded: for=<neighbor's IP>``: the pod is
    reached from the connection's own source address instead."""
    port = mesh.app(SERVER, _peer_line)
    conn, h2c = await h2_session(mesh)
    h2c.send_headers(
        1,
        [(":method", "CONNECT"), (":authority", f"{SERVER}:{port}"), ("forwarded", f"for={LOCAL}")],
    )
    assert await status_of(conn, h2c, 1) == 200
    data = b""
    reader, writer = conn
    h2c.send_data(1, b"?")
    writer.write(h2c.data_to_send())
    while b"\n" not in data and (chunk := await asyncio.wait_for(reader.read(65536), 10)):
        for event in h2c.receive_data(chunk):
            if isinstance(event, h2.events.DataReceived):
                data += event.data
        writer.write(h2c.data_to_send())
    assert data == f"peer={CLIENT}\n".encode()
    writer.close()
