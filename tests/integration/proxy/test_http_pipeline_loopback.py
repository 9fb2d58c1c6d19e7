"""Pipelined requests and many-field heads through the real proxies on loopback
(``tests.integration.proxy.mesh``).

The readers parse at most ``MAX_WAITING`` pipelined requests ahead and hold the rest of a read
as bytes (``agent.proxy.http1_codec.RequestReader``): the shells must still serve a thousand
requests sent in one write, every one answered, in order, on the one connection, at the
destination (the plaintext listener, and through HBONE for the pod's IP) and at the source for
a Service VIP port (both nodes terminate). A head past the field count gets the 431 whole, and
a count chosen with ``--max-header-fields`` (``ProxySettings.max_header_fields``) is what
each node's shells give their readers. A head at the limits passes both nodes: what one node
added to it is admitted on top by the other (``http1.PEER_REQUEST``, ``PEER_RESPONSE``), and
only for a node's heads, not a plaintext client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable

import pytest

from agent.proxy.http1 import DEFAULT_MAX_HEAD_BYTES
from agent.proxy.http1_codec import field_size
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


def _server(
    mesh: Mesh,
    app: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]] = echo_path,
) -> int:
    """The pod ``app`` on ``SERVER``, its port declared HTTP behind the Service ``VIP``."""
    port = mesh.app(SERVER, app)
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


MANY = b"".join(b"x%d: v\r\n" % i for i in range(21))  # with Host or Content-Length: 22


async def many_fields(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A pod answering its one request with a head of 22 fields."""
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + MANY + b"\r\n")
        await writer.drain()
    writer.close()


def _limit(mesh: Mesh, *, source: int, destination: int) -> None:
    for node, count in ((mesh.node1, source), (mesh.node2, destination)):
        node.core.settings = dataclasses.replace(node.core.settings, max_header_fields=count)


async def _answers(mesh: Mesh, dst: tuple[str, int], where: str) -> tuple[bytes, bytes]:
    """The head and body answered to a request of 23 fields, and the status line answered to
    a request the pod answers with 22."""
    request = b"GET / HTTP/1.1\r\nHost: svc\r\nx-request-id: r\r\n" + MANY + b"\r\n"
    head, _, body = (await exchange(await connect(mesh, dst, where=where), request)).partition(
        b"\r\n\r\n"
    )
    plain = b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"
    answer = await exchange(await connect(mesh, dst, where=where), plain)
    return head.split(b"\r\n")[0] + b" | " + body, answer.split(b"\r\n")[0]


@mesh_test
async def test_a_chosen_field_count_bounds_the_sources_client_and_endpoint_readers(
    mesh: Mesh,
) -> None:
    """The source at 22 (the destination at the default): a client's 23 fields are 431 naming
    22 from the source, and the pod's 22-field response, passed by its node, is read whole;
    at 20 (21 and the field a destination node may add, ``PEER_RESPONSE``), the source
    refuses that response as one from a far endpoint (503)."""
    _server(mesh, many_fields)
    _limit(mesh, source=22, destination=100)
    refused, answered = await _answers(mesh, (VIP, 80), "source")
    assert (
        refused == b"HTTP/1.1 431 Request Header Fields Too Large | headers too large: "
        b"more than 22 header fields\n"
    )
    assert answered == b"HTTP/1.1 200 OK"
    _limit(mesh, source=20, destination=100)
    assert (await _answers(mesh, (VIP, 80), "source"))[1] == b"HTTP/1.1 503 Service Unavailable"


@mesh_test
async def test_a_chosen_field_count_bounds_the_destinations_client_and_pod_readers(
    mesh: Mesh,
) -> None:
    """The destination at 21: a client's 23 fields are 431 naming 21, and the pod's 22-field
    response is 502 (at 22 it is read whole)."""
    port = _server(mesh, many_fields)
    _limit(mesh, source=100, destination=21)
    refused, answered = await _answers(mesh, (SERVER, port), "plaintext")
    assert refused.startswith(b"HTTP/1.1 431 ") and refused.endswith(
        b"more than 21 header fields\n"
    )
    assert answered == b"HTTP/1.1 502 Bad Gateway"
    _limit(mesh, source=100, destination=22)
    assert (await _answers(mesh, (SERVER, port), "plaintext"))[1] == b"HTTP/1.1 200 OK"


def _head(fields: int, size: int | None = None) -> bytes:
    """An HTTP/1.0 ``GET /`` (the answer ends with the connection: no ``Connection`` field)
    with ``Host: svc`` and no x-request-id, of ``fields`` fields in all and, with ``size``,
    exactly that many bytes as the readers size a head (the method, the target, and each
    field's ``field_size``)."""
    small = [(b"x%d" % i, b"v") for i in range(fields - 1)]
    if size is not None:
        used = len(b"GET/") + field_size(b"host", b"svc") + sum(field_size(*f) for f in small)
        small[-1] = (
            b"big",
            b"b" * (size - used + field_size(*small[-1]) - field_size(b"big", b"")),
        )
    lines = b"".join(b"%s: %s\r\n" % f for f in small)
    return b"GET / HTTP/1.0\r\nHost: svc\r\n" + lines + b"\r\n"


async def _status(mesh: Mesh, dst: tuple[str, int], where: str, head: bytes) -> bytes:
    """The status line answered to ``head``, and the 431's body if it was refused."""
    answer = await exchange(await connect(mesh, dst, where=where), head)
    status, _, rest = answer.partition(b"\r\n")
    return status + (b" | " + rest.partition(b"\r\n\r\n")[2] if b" 431 " in status else b"")


@mesh_test
async def test_a_request_at_the_field_limit_passes_both_nodes_with_what_the_source_added(
    mesh: Mesh,
) -> None:
    """Both nodes at 22: a client's 22 fields without x-request-id reach the pod (the source
    adds the 23rd, which the destination admits on top for a source node: ``PEER_REQUEST``);
    23 are 431 at the source, and 23 from a plaintext client 431 at the destination."""
    port = _server(mesh)
    _limit(mesh, source=22, destination=22)
    assert await _status(mesh, (VIP, 80), "source", _head(22)) == b"HTTP/1.1 200 OK"
    refused = b"HTTP/1.1 431 Request Header Fields Too Large | headers too large: more than 22"
    assert (await _status(mesh, (VIP, 80), "source", _head(23))).startswith(refused)
    assert (await _status(mesh, (SERVER, port), "plaintext", _head(23))).startswith(refused)
    assert await _status(mesh, (SERVER, port), "plaintext", _head(22)) == b"HTTP/1.1 200 OK"


@mesh_test
async def test_a_request_at_the_byte_limit_passes_both_nodes_with_what_the_source_added(
    mesh: Mesh,
) -> None:
    """A client's head of exactly 60 KiB (as sized) without x-request-id reaches the pod; a
    byte more is 431 at the source, and from a plaintext client 431 at the destination."""
    port = _server(mesh)
    limit = DEFAULT_MAX_HEAD_BYTES
    over = b"HTTP/1.1 431 Request Header Fields Too Large | headers too large: head over the size"
    assert await _status(mesh, (VIP, 80), "source", _head(30, limit)) == b"HTTP/1.1 200 OK"
    assert (await _status(mesh, (VIP, 80), "source", _head(30, limit + 1))).startswith(over)
    plaintext = (SERVER, port), "plaintext"
    assert await _status(mesh, *plaintext, _head(30, limit)) == b"HTTP/1.1 200 OK"
    assert (await _status(mesh, *plaintext, _head(30, limit + 1))).startswith(over)


async def closing_http10(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A pod answering with HTTP/1.0 and 22 fields, closing: its node adds ``connection:
    close``, the 23rd (``PEER_RESPONSE``)."""
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n" + MANY + b"\r\n")
        await writer.drain()
    writer.close()


@mesh_test
async def test_a_response_at_the_field_limit_passes_both_nodes_with_what_the_destination_added(
    mesh: Mesh,
) -> None:
    """Both nodes at 22: the pod's 22-field response, passed with a 23rd by its node, reaches
    the client through the source."""
    _server(mesh, closing_http10)
    _limit(mesh, source=22, destination=22)
    assert await _status(mesh, (VIP, 80), "source", _head(3)) == b"HTTP/1.1 200 OK"
