"""Pipelined requests and many-field heads through the real proxies on loopback
(``tests.integration.proxy.mesh``).

The readers parse at most ``MAX_WAITING`` pipelined requests ahead and hold the rest of a read
as bytes (``agent.proxy.http1_codec.RequestReader``): the shells must still serve a thousand
requests sent in one write, every one answered, in order, on the one connection, at the
destination (the plaintext listener, and through HBONE for the pod's IP) and at the source for
a Service VIP port (both nodes terminate). A head past the field count gets the 431 whole.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from agent.state import Endpoint, Service, ServicePort
from tests.integration.proxy.mesh import SERVER, Mesh, mesh_test
from tests.integration.proxy.test_http_refusal_loopback import connect, exchange

pytestmark = pytest.mark.root

VIP = "10.96.7.11"
REQUESTS = 1000


async def echo_path(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A keep-alive pod answering each GET with its path as the body."""
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(path), path))
            await writer.drain()
    writer.close()


def _server(mesh: Mesh) -> int:
    port = mesh.app(SERVER, echo_path)
    with mesh.store.update() as tx:
        sp = ServicePort(80, port, name="http-web", app_protocol="http")
        tx.put_service(
            Service("svc", "default", (VIP,), (sp,), {"app": "server"}, (Endpoint(SERVER),))
        )
    return port


async def pipelined(mesh: Mesh, dst: tuple[str, int], where: str) -> None:
    wire = b"".join(b"GET /%d HTTP/1.1\r\nHost: svc\r\n\r\n" % i for i in range(REQUESTS - 1))
    wire += b"GET /last HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"
    answer = await exchange(await connect(mesh, dst, where=where), wire)
    bodies = []
    while answer:
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        bodies.append(rest[:length])
        answer = rest[length:]
    assert bodies == [b"/%d" % i for i in range(REQUESTS - 1)] + [b"/last"]


@mesh_test
async def test_a_thousand_pipelined_requests_are_answered_in_order_at_the_plaintext_listener(
    mesh: Mesh,
) -> None:
    port = _server(mesh)
    await pipelined(mesh, (SERVER, port), "plaintext")


@mesh_test
async def test_a_thousand_pipelined_requests_are_answered_in_order_through_hbone(
    mesh: Mesh,
) -> None:
    port = _server(mesh)
    await pipelined(mesh, (SERVER, port), "source")


@mesh_test
async def test_a_thousand_pipelined_requests_are_answered_in_order_at_the_source(
    mesh: Mesh,
) -> None:
    _server(mesh)
    await pipelined(mesh, (VIP, 80), "source")


@mesh_test
async def test_a_head_of_more_fields_than_the_limit_gets_the_431_whole(mesh: Mesh) -> None:
    port = _server(mesh)
    fields = b"".join(b"x%d: v\r\n" % i for i in range(100))
    for dst, where in (((SERVER, port), "plaintext"), ((VIP, 80), "source")):
        answer = await exchange(
            await connect(mesh, dst, where=where),
            b"GET / HTTP/1.1\r\nHost: svc\r\n" + fields + b"\r\n",
        )
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert b"more than 100 header fields" in body
