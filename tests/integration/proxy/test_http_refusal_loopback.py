"""Refusals a first-time client meets on declared ports, through the real proxies on loopback
(``tests.integration.proxy.mesh``): each answer must reach the client whole.

* An HTTP/2 client (``curl --http2-prior-knowledge``: the preface, SETTINGS, HEADERS and more
  at once) on a port declared HTTP/1.1 gets the explaining 400, not a reset: the proxy closes
  lingering (``agent.proxy.linger``), reading what the client still sends. The client here
  sends more than the kernel buffers (the proxy's end of the connection has a small receive
  buffer), so a proxy that closed with those bytes unread reset the connection while the
  client was still sending, as curl saw (``Send failure: Broken pipe``).
* An HTTP/1.1 client on a port declared HTTP/2 (gRPC) gets an HTTP/1.1 400 naming the cause
  and the fix, not HTTP/2 frames (curl: ``Received HTTP/0.9``), counted as
  ``http1_on_h2_port``.

Each at the destination (the plaintext listener, and through HBONE: ``H2Relay`` and, with
``--no-h2-relay``, ``H2Proxy``) and at the source for a Service VIP port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import replace

import pytest

from agent.proxy import linger
from agent.proxy.h2guard import CLIENT_PREFACE, HTTP1_ON_H2
from agent.state import Endpoint, Service, ServicePort
from agent.telemetry.records import ConnectionRecord, RequestRecord
from tests.integration.proxy.mesh import CLIENT, OUTSIDER, SERVER, Mesh, listener, mesh_test

pytestmark = pytest.mark.root

VIP = "10.96.7.9"
SETTINGS = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64"
WINDOW_UPDATE = b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x3e\x7f\x00\x01"
# HEADERS of stream 1 (GET http://svc/ as curl sends it, HPACK static indexes and a literal)
HEADERS = b"\x00\x00\x06\x01\x04\x00\x00\x00\x01\x82\x84\x86\x41\x01s"
# curl's opening, then DATA past what the kernel holds for a peer that does not read
H2_CLIENT = CLIENT_PREFACE + SETTINGS + WINDOW_UPDATE + HEADERS
H2_CLIENT += b"\x00\x40\x00\x00\x00\x00\x00\x00\x01" + bytes(0x4000)  # 16 KiB DATA
H2_MORE = (b"\x00\x40\x00\x00\x00\x00\x00\x00\x01" + bytes(0x4000)) * 2  # 32 KiB more
HTTP1_REQUEST = b"GET /hello HTTP/1.1\r\nHost: svc\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n"


class Rejections:
    """The registry's refusals by cause (``nodemesh_http_rejected_requests_total``)."""

    def __init__(self) -> None:
        self.causes: list[str] = []

    def requested(self, connection: ConnectionRecord, request: RequestRecord) -> None:
        pass

    def rejected(self, cause: str) -> None:
        self.causes.append(cause)

    def would_deny(self, policy: str) -> None:
        pass


async def pod_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A pod that reads and never answers (no request may reach it here)."""
    with contextlib.suppress(OSError):
        while await reader.read(65536):
            pass
    writer.close()


async def connect(mesh: Mesh, dst: tuple[str, int], *, where: str) -> socket.socket:
    """A client socket captured at node1's outbound (``where="source"``) or node2's plaintext
    listener (``"plaintext"``); the proxy's end has a small receive buffer."""
    handle = mesh.node1.outbound.handle if where == "source" else mesh.node2.plaintext.handle
    lst = listener("127.0.0.1")
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by the accepted one
    mesh._sockets.append(lst)

    async def accept_one() -> None:
        conn, _ = await asyncio.get_running_loop().sock_accept(lst)
        conn.setblocking(False)
        rest = await handle(conn, original_dst=dst)
        if rest is not None:
            with contextlib.suppress(Exception):
                await rest

    mesh._tasks.append(asyncio.create_task(accept_one()))
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.bind((CLIENT if where == "source" else OUTSIDER, 0))
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, lst.getsockname())
    return client


async def exchange(client: socket.socket, *parts: bytes) -> bytes:
    """Send ``parts`` (each must go through: a reset fails the test), then read to the end."""
    loop = asyncio.get_running_loop()
    for part in parts:
        await asyncio.wait_for(loop.sock_sendall(client, part), 10)
    out = b""
    while chunk := await asyncio.wait_for(loop.sock_recv(client, 65536), 10):
        out += chunk
    client.close()
    return out


def observe(mesh: Mesh) -> Rejections:
    seen = Rejections()
    for node in (mesh.node1, mesh.node2):
        node.core.registry.request_observers.append(seen)
    return seen


async def h2_on_http1(mesh: Mesh, dst: tuple[str, int], where: str) -> None:
    seen = observe(mesh)
    answer = await exchange(await connect(mesh, dst, where=where), H2_CLIENT, H2_MORE)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:200]
    assert b"HTTP/2 connection preface" in body
    assert f"content-length: {len(body)}".encode() in head.lower()
    assert seen.causes == ["malformed"]


async def http1_on_h2(mesh: Mesh, dst: tuple[str, int], where: str) -> None:
    seen = observe(mesh)
    answer = await exchange(await connect(mesh, dst, where=where), HTTP1_REQUEST)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:200]
    assert f"content-length: {len(body)}".encode() in head
    assert b"declared HTTP/2 (h2c with prior knowledge)" in body
    assert b"declare the port http" in body
    assert seen.causes == [HTTP1_ON_H2]


def _server(mesh: Mesh, protocol: str) -> int:
    """A pod on ``server`` behind Service ``svc`` (VIP port 80), its port declared ``protocol``
    (the Service port applies to the pod port of each endpoint)."""
    port = mesh.app(SERVER, pod_app)
    with mesh.store.update() as tx:
        sp = ServicePort(80, port, name=f"{protocol}-web", app_protocol=protocol)
        endpoints = (Endpoint(SERVER),)
        tx.put_service(Service("svc", "default", (VIP,), (sp,), {"app": "server"}, endpoints))
    return port


@mesh_test
async def test_an_h2_client_on_an_http1_port_reads_the_400_at_the_plaintext_listener(
    mesh: Mesh,
) -> None:
    port = _server(mesh, "http")
    await h2_on_http1(mesh, (SERVER, port), "plaintext")


@mesh_test
async def test_an_h2_client_on_an_http1_port_reads_the_400_through_hbone(mesh: Mesh) -> None:
    port = _server(mesh, "http")
    await h2_on_http1(mesh, (SERVER, port), "source")  # the pod's IP: relayed to node2


@mesh_test
async def test_an_h2_client_on_an_http1_vip_port_reads_the_400_at_the_source(mesh: Mesh) -> None:
    _server(mesh, "http")
    await h2_on_http1(mesh, (VIP, 80), "source")


@mesh_test
async def test_an_http1_client_on_an_h2_port_gets_an_http1_400_at_the_plaintext_listener(
    mesh: Mesh,
) -> None:
    port = _server(mesh, "grpc")
    await http1_on_h2(mesh, (SERVER, port), "plaintext")


@mesh_test
async def test_an_http1_client_on_an_h2_port_gets_an_http1_400_through_the_frame_relay(
    mesh: Mesh,
) -> None:
    port = _server(mesh, "grpc")
    await http1_on_h2(mesh, (SERVER, port), "source")


@mesh_test
async def test_an_http1_client_on_an_h2_port_gets_an_http1_400_through_hbone_h2proxy(
    mesh: Mesh,
) -> None:
    core = mesh.node2.core
    core.settings = replace(core.settings, h2_relay=False)
    port = _server(mesh, "grpc")
    await http1_on_h2(mesh, (SERVER, port), "source")


@mesh_test
async def test_an_http1_client_on_an_h2_vip_port_gets_an_http1_400_at_the_source(
    mesh: Mesh,
) -> None:
    _server(mesh, "http2")
    await http1_on_h2(mesh, (VIP, 80), "source")


@mesh_test
async def test_a_client_that_keeps_sending_is_closed_past_the_byte_bound(mesh: Mesh) -> None:
    """The time bound set far off: only the byte bound can end the lingering."""
    port = _server(mesh, "http")
    default, linger.LINGER_SECONDS = linger.LINGER_SECONDS, 600.0
    try:
        client = await connect(mesh, (SERVER, port), where="plaintext")
        loop = asyncio.get_running_loop()
        sent = 0
        with contextlib.suppress(OSError):  # the proxy resets once past the bound
            while sent < 4 * linger.LINGER_BYTES:
                await asyncio.wait_for(loop.sock_sendall(client, H2_CLIENT), 10)
                sent += len(H2_CLIENT)
        assert sent < 4 * linger.LINGER_BYTES  # cut off, not all taken
        client.close()
    finally:
        linger.LINGER_SECONDS = default


@mesh_test
async def test_a_client_that_neither_sends_nor_closes_is_closed_past_the_time_bound(
    mesh: Mesh,
) -> None:
    """A client that reads the answer and its end but keeps its socket open: the lingering ends
    at the time bound (a short one here), not when the client closes, which it never does."""
    port = _server(mesh, "http")
    default, linger.LINGER_SECONDS = linger.LINGER_SECONDS, 0.2
    try:
        client = await connect(mesh, (SERVER, port), where="plaintext")
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, CLIENT_PREFACE)  # and then nothing, never closing
        out = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(client, 65536), 10):
            out += chunk
        assert out.startswith(b"HTTP/1.1 400 ")  # and the proxy's end of writing
        registry = mesh.node2.core.registry
        for _ in range(1000):  # lingering until the bound, then closed and forgotten
            if not len(registry):
                break
            await asyncio.sleep(0.01)
        assert not len(registry)
        client.close()
    finally:
        linger.LINGER_SECONDS = default
