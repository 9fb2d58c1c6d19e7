"""Source-side HTTP/2 on loopback: a gRPC call to a Service VIP port declared gRPC whose Service
has no ready endpoint, through the real outbound proxy (``tests.integration.proxy.mesh``).

Like an HTTP/1.1 port, the connection is served per request rather than reset: the port's
routes may send calls elsewhere (GAMMA's frontend Service), and without one each call gets a
trailers-only ``UNAVAILABLE`` with ``no healthy upstream`` (flag ``UH``).
"""

from __future__ import annotations

import asyncio

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ResponseReceived, StreamEnded

from agent.state import Service, ServicePort
from tests.integration.proxy.mesh import CLIENT, Mesh, mesh_test
from tests.integration.proxy.test_http_outbound_loopback import observe, requests_total

pytestmark = pytest.mark.root

VIP = "10.96.7.4"
FRONT = "front.default.svc.cluster.local"


@mesh_test
async def test_a_grpc_port_without_endpoints_answers_each_call_unavailable(mesh: Mesh) -> None:
    with mesh.store.update() as tx:
        port = ServicePort(50051, 50051, name="grpc", app_protocol="grpc")
        tx.put_service(Service("front", "default", (VIP,), (port,), {"app": "none"}, ()))
    source, _ = observe(mesh)
    reader, writer = await mesh.connect(CLIENT, (VIP, 50051))
    conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    answers: dict[int, dict[str, str]] = {}
    ended: set[int] = set()
    for _ in range(2):  # two calls on one connection: it is not closed after the first
        sid = conn.get_next_available_stream_id()
        head = [(":method", "POST"), (":scheme", "http"), (":authority", "front"),
                (":path", "/pkg.Echo/Unary"), ("content-type", "application/grpc"),
                ("te", "trailers")]  # fmt: skip
        conn.send_headers(sid, head)
        conn.send_data(sid, b"\0\0\0\0\0", end_stream=True)
        writer.write(conn.data_to_send())
        while sid not in ended:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "the proxy closed the connection instead of answering the call"
            for event in conn.receive_data(data):
                if isinstance(event, ResponseReceived):
                    answers[event.stream_id] = dict(event.headers)  # type: ignore[arg-type]
                elif isinstance(event, StreamEnded):
                    ended.add(event.stream_id)
            writer.write(conn.data_to_send())
    writer.close()
    assert [(a["grpc-status"], a["grpc-message"]) for a in answers.values()] == [
        ("14", "no healthy upstream")
    ] * 2
    assert requests_total(source)[("source", FRONT, "200", "UH")] == 2
