"""The Service's ``connectionPool.idleTimeout`` on HTTP client connections, on loopback.

A TrafficPolicy gives the Service an idle timeout of 200 ms. On its port declared HTTP/1.1 a
keep-alive connection is closed once it has had no request for that long, never while a
request is in flight (the app holds one for three timeouts); on its port declared gRPC the
client is sent GOAWAY (no error) once no stream is open, then the connection is closed. Both
are counted ``idle_timeout``, as the L4 path counts its idle resets.
"""

from __future__ import annotations

import asyncio

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, DataReceived, ResponseReceived, StreamEnded

from agent.state import Endpoint, PolicyObject, Service, ServicePort
from tests.integration.proxy.mesh import (
    CLIENT,
    LOCAL,
    SERVER,
    Mesh,
    free_port,
    mesh_test,
    set_policies,
)
from tests.integration.proxy.test_http_outbound_loopback import VIP, Client, add_services
from tests.integration.proxy.test_http_pending_loopback import Gate, until
from tests.unit.traffic.traffic_helpers import traffic_policy

pytestmark = pytest.mark.root

IDLE = 0.2  # the TrafficPolicy's idleTimeout, seconds
GRPC_VIP = "10.96.7.5"


def policy(service: str) -> PolicyObject:
    return traffic_policy(
        {
            "targetRef": {"kind": "Service", "name": service},
            "connectionPool": {"idleTimeout": f"{int(IDLE * 1000)}ms"},
        }
    )


@mesh_test
async def test_an_http1_connection_is_closed_between_requests_never_during_one(
    mesh: Mesh,
) -> None:
    """The held request outlives three timeouts and is answered; the one after it too; then
    the connection, with no request, is closed cleanly (end of stream, not a reset)."""
    port = free_port(LOCAL)
    add_services(mesh, port, LOCAL)
    set_policies(mesh.store, policy("web"))
    gate = Gate()
    app = await asyncio.start_server(gate.serve, LOCAL, port)
    try:
        client = Client(*await mesh.connect(CLIENT, (VIP, 80)))
        held = asyncio.create_task(client.request("GET", "/hold"))
        await until(lambda: gate.arrived == 1, "the request reached the app")
        await asyncio.sleep(3 * IDLE)  # with the request in flight
        gate.opened.set()
        assert await held == (200, b"ok")
        assert await client.request("GET", "/again") == (200, b"ok")
        assert await asyncio.wait_for(client.reader.read(65536), 10) == b""
        client.writer.close()
    finally:
        app.close()
    assert mesh.node1.core.registry.rejections["idle_timeout"] == 1


@mesh_test
async def test_an_idle_timeout_set_on_an_open_connection_applies_to_its_next_idle_period(
    mesh: Mesh,
) -> None:
    """The timeout is the Service's at the start of each idle period: remembered per state
    snapshot only (``_ClientConnection._idle_timeout``), so a TrafficPolicy applied while the
    connection is open closes it after its next request."""
    port = free_port(LOCAL)
    add_services(mesh, port, LOCAL)
    gate = Gate()
    gate.opened.set()
    app = await asyncio.start_server(gate.serve, LOCAL, port)
    try:
        client = Client(*await mesh.connect(CLIENT, (VIP, 80)))
        assert await client.request("GET", "/first") == (200, b"ok")
        set_policies(mesh.store, policy("web"))
        assert await client.request("GET", "/second") == (200, b"ok")
        assert await asyncio.wait_for(client.reader.read(65536), 10) == b""
        client.writer.close()
    finally:
        app.close()
    assert mesh.node1.core.registry.rejections["idle_timeout"] == 1


async def _slow_grpc_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each call with one empty message and ``grpc-status: 0`` after three timeouts."""
    conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    while data := await reader.read(65536):
        for event in conn.receive_data(data):
            if isinstance(event, DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                await asyncio.sleep(3 * IDLE)
                sid = event.stream_id
                conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
                conn.send_data(sid, b"\0\0\0\0\0")
                conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)
        writer.write(conn.data_to_send())
    writer.close()


@mesh_test
async def test_an_h2_connection_gets_goaway_once_no_stream_is_open(mesh: Mesh) -> None:
    """A call that takes three timeouts is answered in full; then, with no stream open, the
    client gets GOAWAY (NO_ERROR, the last stream it opened) and the connection's end."""
    port = free_port(SERVER)
    with mesh.store.update() as tx:
        grpc = ServicePort(50051, port, name="grpc", app_protocol="grpc")
        endpoints = (Endpoint(SERVER),)
        tx.put_service(Service("slow", "default", (GRPC_VIP,), (grpc,), {"app": "x"}, endpoints))
    set_policies(mesh.store, policy("slow"))
    app = await asyncio.start_server(_slow_grpc_app, SERVER, port)
    try:
        reader, writer = await mesh.connect(CLIENT, (GRPC_VIP, 50051))
        conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        head = [(":method", "POST"), (":scheme", "http"), (":authority", "slow"),
                (":path", "/pkg.Echo/Unary"), ("content-type", "application/grpc"),
                ("te", "trailers")]  # fmt: skip
        conn.send_headers(sid, head)
        conn.send_data(sid, b"\0\0\0\0\0", end_stream=True)
        writer.write(conn.data_to_send())
        events: list[object] = []
        while True:
            data = await asyncio.wait_for(reader.read(65536), 10)
            if not data:
                break
            events += conn.receive_data(data)
            writer.write(conn.data_to_send())
        writer.close()
    finally:
        app.close()
    kinds = [type(e) for e in events]
    assert ResponseReceived in kinds
    assert kinds.index(StreamEnded) < kinds.index(ConnectionTerminated)  # the call, then GOAWAY
    (goaway,) = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert (goaway.error_code, goaway.last_stream_id) == (ErrorCodes.NO_ERROR, sid)
    assert mesh.node1.core.registry.rejections["idle_timeout"] == 1


@mesh_test
async def test_an_h2_connections_idle_timeout_follows_a_policy_set_after_it_fell_idle(
    mesh: Mesh,
) -> None:
    """The session keeps the Service's idle timeout while the snapshot is current: a policy
    set after a first call left the connection idle without one applies from the next idle
    period on (GOAWAY after the second call, none after the first)."""
    port = free_port(SERVER)
    with mesh.store.update() as tx:
        grpc = ServicePort(50051, port, name="grpc", app_protocol="grpc")
        endpoints = (Endpoint(SERVER),)
        tx.put_service(Service("slow", "default", (GRPC_VIP,), (grpc,), {"app": "x"}, endpoints))
    app = await asyncio.start_server(_slow_grpc_app, SERVER, port)
    try:
        reader, writer = await mesh.connect(CLIENT, (GRPC_VIP, 50051))
        conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        head = [(":method", "POST"), (":scheme", "http"), (":authority", "slow"),
                (":path", "/pkg.Echo/Unary"), ("content-type", "application/grpc"),
                ("te", "trailers")]  # fmt: skip
        events: list[object] = []
        sids = []
        for _ in range(2):
            sid = conn.get_next_available_stream_id()
            sids.append(sid)
            conn.send_headers(sid, head)
            conn.send_data(sid, b"\0\0\0\0\0", end_stream=True)
            writer.write(conn.data_to_send())
            while not any(isinstance(e, StreamEnded) and e.stream_id == sid for e in events):
                data = await asyncio.wait_for(reader.read(65536), 10)
                assert data, "the connection closed before the call's answer"
                events += conn.receive_data(data)
                writer.write(conn.data_to_send())
            if len(sids) == 1:
                await asyncio.sleep(2 * IDLE)  # idle, without a timeout: nothing happens
                assert not any(isinstance(e, ConnectionTerminated) for e in events)
                set_policies(mesh.store, policy("slow"))
        while data := await asyncio.wait_for(reader.read(65536), 10):
            events += conn.receive_data(data)
        writer.close()
    finally:
        app.close()
    (goaway,) = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert (goaway.error_code, goaway.last_stream_id) == (ErrorCodes.NO_ERROR, sids[1])
    assert mesh.node1.core.registry.rejections["idle_timeout"] == 1
