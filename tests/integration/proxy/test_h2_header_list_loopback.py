"""HTTP/2 header list sizes across both nodes, on loopback (``mesh``'s two nodes).

Both nodes bound a header block by its header list size (16 KiB, HPACK's count: each field's
name and value and 32). The bound is the client's, checked where its block enters the mesh:
a gRPC call whose head is exactly at it, without ``x-request-id``, passes the source, which
adds one, and the destination node reads it with what the source may add on top
(``h2limits.PEER_HEADER_LIST``), with its frame relay and with ``H2Proxy``. A byte more is
refused at the source; a plaintext client of the destination gets the plain bound.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    TrailersReceived,
)

from agent.proxy.h2limits import H2Limits
from agent.state import Endpoint, Service, ServicePort
from tests.integration.proxy.mesh import CLIENT, OUTSIDER, SERVER, Mesh, mesh_test
from tests.integration.proxy.test_h2_outbound_loopback import _grpc_app

pytestmark = pytest.mark.root

VIP = "10.96.7.5"
LIMIT = H2Limits().max_header_list_size


def _head(size: int) -> list[tuple[str, str]]:
    """A gRPC call's head of exactly ``size`` by HPACK's count, without ``x-request-id``."""
    head = [(":method", "POST"), (":scheme", "http"), (":authority", "front"),
            (":path", "/pkg.Echo/Unary"), ("content-type", "application/grpc"),
            ("te", "trailers")]  # fmt: skip
    used = sum(32 + len(n) + len(v) for n, v in head) + 32 + len("x-pad")
    return [*head, ("x-pad", "p" * (size - used))]


async def _call(mesh: Mesh, dst: tuple[str, int], size: int, *, plaintext: bool = False) -> str:
    """The call's ``grpc-status``, or how its connection ended (``closed <error code>``)."""
    src, kw = (OUTSIDER, {"via": "inbound", "proxy": mesh.node2}) if plaintext else (CLIENT, {})
    reader, writer = await mesh.connect(src, dst, **kw)  # type: ignore[arg-type]
    conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.send_headers(1, _head(size))
    conn.send_data(1, b"\0\0\0\0\0", end_stream=True)
    writer.write(conn.data_to_send())
    status = ""
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), 10)
            if not data:
                return "closed"
            for event in conn.receive_data(data):
                if isinstance(event, DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, ResponseReceived | TrailersReceived):
                    status = dict(event.headers).get("grpc-status", status)  # type: ignore[arg-type]
                elif isinstance(event, StreamEnded):
                    return status
                elif isinstance(event, ConnectionTerminated):
                    return f"closed {event.error_code!r}"
            writer.write(conn.data_to_send())
    finally:
        writer.close()


def _front(mesh: Mesh, *, relay: bool) -> int:
    """Service ``front``: a gRPC port whose one endpoint, on node2, answers every call."""
    port = mesh.app(SERVER, _grpc_app)
    with mesh.store.update() as tx:
        grpc = ServicePort(50051, port, name="grpc", app_protocol="grpc")
        tx.put_service(
            Service("front", "default", (VIP,), (grpc,), {"app": "server"}, (Endpoint(SERVER),))
        )
    node = mesh.node2.core
    node.settings = dataclasses.replace(node.settings, h2_relay=relay)
    return port


async def _both_nodes(mesh: Mesh, *, relay: bool) -> None:
    port = _front(mesh, relay=relay)
    assert await _call(mesh, (VIP, 50051), LIMIT) == "0"
    refused = await _call(mesh, (VIP, 50051), LIMIT + 1)
    assert refused.startswith("closed"), refused
    assert await _call(mesh, (SERVER, port), LIMIT, plaintext=True) == "0"
    refused = await _call(mesh, (SERVER, port), LIMIT + 1, plaintext=True)
    assert refused.startswith("closed"), refused


@mesh_test
async def test_a_call_at_the_header_list_size_passes_both_nodes_through_the_relay(
    mesh: Mesh,
) -> None:
    """A head of exactly 16 KiB reaches the pod with the ``x-request-id`` the source added,
    through the destination's frame relay; a byte more is refused at the source; from a
    plaintext client the destination passes 16 KiB and refuses a byte more."""
    await _both_nodes(mesh, relay=True)


@mesh_test
async def test_a_call_at_the_header_list_size_passes_both_nodes_through_h2proxy(
    mesh: Mesh,
) -> None:
    """The same with ``--no-h2-relay``: the destination's ``H2Proxy`` reads the peer's head."""
    await _both_nodes(mesh, relay=False)
