"""HTTP/1.1 conformance through the real proxies on loopback (``tests.integration.proxy.mesh``):
what a client of Envoy expects of the mesh's HTTP path, on each path (a pod port: the
destination only; a Service: the source and the destination; a same-node pod), raw bytes in and
out so that nothing of a client library's own tolerance hides a fault.

* A response delimited by the pod's close, via a Service to a pod on the other node: the source
  chunks it for its keep-alive client, and the client gets the whole body, its last chunk, and
  the next request served. Before, the destination's reset after its end of stream made the
  source drop what it had not read yet and the end: the client got a cut chunked body and the
  connection's close (``TunnelStream._on_error``).
* A final answer (417) to a client waiting for ``100-continue``, on every path: the client
  gets it with ``connection: close`` and the connection ends. Before, the mesh waited for
  the body the client never sent, forwarded the client's next request to the pod as that
  body and answered the rest 400.
* An absolute-form target (``GET http://x/admin``), and paths a server reads as ``/admin``
  (``/public/../admin``, ``/%61dmin``), meet the DENY on ``/admin`` on every path: before,
  policy saw them as sent, no ``/admin`` rule matched, and the pod was asked for ``/admin``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from agent.state import Endpoint, PolicyObject, Service, ServicePort
from tests.integration.proxy.mesh import (
    CLIENT,
    LOCAL,
    OUTSIDER,
    SERVER,
    Mesh,
    free_port,
    listener,
    mesh_test,
    set_policies,
)

pytestmark = pytest.mark.root

VIP, LOCAL_VIP = "10.96.7.9", "10.96.7.10"


async def pod(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each GET (no bodies here) with its target; ``/close`` without a length, ended by
    the connection's close."""
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while head := await reader.readuntil(b"\r\n\r\n"):
            target = head.split(b" ", 2)[1]
            if target == b"/417":  # answered at once, its body never read
                writer.write(b"HTTP/1.1 417 Expectation Failed\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
                continue
            if target == b"/close":
                writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + b"d" * 5000)
                await writer.drain()
                break
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(target), target))
            await writer.drain()
    writer.close()


def _pods(mesh: Mesh) -> int:
    """``pod`` on ``server`` (node2) and ``local`` (node1), behind a Service each, port declared
    HTTP (which declares the pod port too)."""
    port = free_port(SERVER)
    for ip in (SERVER, LOCAL):
        mesh._sockets.append(sock := listener(ip, port))
        mesh._tasks.append(asyncio.create_task(_serve(sock)))
    with mesh.store.update() as tx:
        for name, vip, app, ip in (
            ("web", VIP, "server", SERVER),
            ("loc", LOCAL_VIP, "local", LOCAL),
        ):
            sp = ServicePort(80, port, name="http", app_protocol="http")
            tx.put_service(Service(name, "default", (vip,), (sp,), {"app": app}, (Endpoint(ip),)))
    return port


async def _serve(sock: socket.socket) -> None:
    server = await asyncio.start_server(pod, sock=sock)
    async with server:
        await server.serve_forever()


async def exchange(mesh: Mesh, dst: tuple[str, int], request: bytes, *, plaintext: bool) -> bytes:
    """Send ``request`` from ``client`` captured at node1 (or, ``plaintext``, from a pod outside
    the mesh at node2's plaintext listener) and read until the proxy closes."""
    if plaintext:
        lst = listener("127.0.0.1")
        mesh._sockets.append(lst)
        loop = asyncio.get_running_loop()

        async def accept_one() -> None:
            conn, _ = await loop.sock_accept(lst)
            conn.setblocking(False)
            await mesh.node2.plaintext.handle(conn, original_dst=dst)

        mesh._tasks.append(asyncio.create_task(accept_one()))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", lst.getsockname()[1], local_addr=(OUTSIDER, 0)
        )
    else:
        reader, writer = await mesh.connect(CLIENT, dst)
    writer.write(request)
    out = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return out


CLOSE_THEN_NEXT = (
    b"GET /close HTTP/1.1\r\nHost: web\r\n\r\n"
    b"GET /next HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
)


@mesh_test
async def test_a_response_ended_by_the_pods_close_reaches_a_service_client_whole(
    mesh: Mesh,
) -> None:
    port = _pods(mesh)
    for dst in ((VIP, 80), (LOCAL_VIP, 80)):  # through node2, and a same-node pod
        out = await exchange(mesh, dst, CLOSE_THEN_NEXT, plaintext=False)
        assert out.startswith(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"), out[:200]
        assert b"\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n" in out, (dst, out[-200:])
        body = out.split(b"\r\n\r\n", 1)[1].split(b"\r\n0\r\n\r\n")[0]
        chunks, data = body, b""
        while chunks:
            size, rest = chunks.split(b"\r\n", 1)
            data, chunks = data + rest[: int(size, 16)], rest[int(size, 16) + 2 :]
        assert data == b"d" * 5000
        assert out.endswith(b"\r\n\r\n/next")
    for dst in ((SERVER, port), (LOCAL, port)):  # a pod port: the client's own close
        out = await exchange(mesh, dst, CLOSE_THEN_NEXT, plaintext=False)
        assert out == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + b"d" * 5000


@mesh_test
async def test_a_target_meets_the_policy_of_the_path_the_pod_reads_on_every_path(
    mesh: Mesh,
) -> None:
    port = _pods(mesh)
    deny = {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}
    set_policies(mesh.store, PolicyObject("AuthorizationPolicy", "default", "no-admin", deny))
    requests = [
        b"GET %s HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n" % target
        for target in (b"http://web/admin", b"/public/../admin", b"/%61dmin")
    ]
    for dst, plaintext in (
        ((SERVER, port), True),  # the destination only
        ((SERVER, port), False),  # through HBONE, parsed at node2
        ((VIP, 80), False),  # a Service: the source and node2
        ((LOCAL_VIP, 80), False),  # a same-node pod via a Service
        ((LOCAL, port), False),  # a same-node pod port
    ):
        for request in requests:
            out = await exchange(mesh, dst, request, plaintext=plaintext)
            assert out.startswith(b"HTTP/1.1 403 Forbidden\r\n"), (dst, request, out[:200])
        ok = b"GET http://web/ok HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
        assert (await exchange(mesh, dst, ok, plaintext=plaintext)).endswith(b"\r\n\r\n/ok")


@mesh_test
async def test_a_final_answer_to_a_client_waiting_for_100_ends_its_connection(mesh: Mesh) -> None:
    port = _pods(mesh)
    waiting = b"PUT /417 HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    final = b"HTTP/1.1 417 Expectation Failed\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    for dst in ((VIP, 80), (LOCAL_VIP, 80), (SERVER, port), (LOCAL, port)):
        reader, writer = await mesh.connect(CLIENT, dst)
        writer.write(waiting)
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == final, dst
        writer.write(b"GET /next HTTP/1.1\r\nHost: web\r\n\r\n")  # not the body
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 10) == b"", dst
        writer.close()
