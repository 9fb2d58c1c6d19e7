"""maxPendingRequests on loopback: HTTP/1.1 requests over a Service's maxConnections wait in a
bounded queue at the source proxy, and beyond it are answered 503 ``UO`` at once.

Service ``web`` (``test_http_outbound_loopback``'s, one endpoint: the ``server`` pod on node2)
gets a TrafficPolicy with ``maxConnections: 1`` and ``maxPendingRequests: 1``; its app holds
``/hold`` requests until the test opens a gate. Three client connections: the first request is
in flight, the second waits, the third finds the queue full.
"""

from __future__ import annotations

import asyncio
import contextlib

import h11
import pytest

from tests.integration.proxy.mesh import CLIENT, SERVER, Mesh, free_port, mesh_test, set_policies
from tests.integration.proxy.test_http_outbound_loopback import (
    VIP,
    WEB,
    Client,
    add_services,
    observe,
    requests_total,
)
from tests.unit.traffic.traffic_helpers import traffic_policy

pytestmark = pytest.mark.root


class Gate:
    """An HTTP/1.1 app whose ``/hold`` requests wait for ``opened``; ``arrived`` counts them."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.arrived = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        target = b""
        with contextlib.suppress(OSError, h11.ProtocolError):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Request):
                    target = event.target
                elif isinstance(event, h11.EndOfMessage):
                    if target.startswith(b"/hold"):
                        self.arrived += 1
                        await self.opened.wait()
                    response = h11.Response(status_code=200, headers=[("content-length", "2")])
                    writer.write(conn.send(response) + conn.send(h11.Data(data=b"ok")))
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                    conn.start_next_cycle()
                else:
                    break
        writer.close()


async def until(check: object, what: str) -> None:
    for _ in range(500):
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within 5 s: {what}")


@mesh_test
async def test_requests_over_max_connections_wait_and_a_full_queue_answers_503_uo(
    mesh: Mesh,
) -> None:
    port = free_port(SERVER)
    add_services(mesh, port, SERVER)
    spec = {"targetRef": {"kind": "Service", "name": "web"},
            "connectionPool": {"maxConnections": 1, "maxPendingRequests": 1}}  # fmt: skip
    set_policies(mesh.store, traffic_policy(spec))
    source, _ = observe(mesh)
    gate = Gate()
    server = await asyncio.start_server(gate.serve, SERVER, port)
    try:
        first, second, third = [Client(*await mesh.connect(CLIENT, (VIP, 80))) for _ in range(3)]
        held = asyncio.create_task(first.request("GET", "/hold/1"))
        await until(lambda: gate.arrived == 1, "the first request reached the app")
        waiting = asyncio.create_task(second.request("GET", "/hold/2"))
        router = mesh.node1.outbound.http.router
        snap = mesh.store.snapshot()
        web = router.traffic.service(snap, snap.services[("default", "web")])
        await until(lambda: len(web.queue) == 1, "the second request waits")
        status, body = await third.request("GET", "/now")
        assert (status, body) == (503, b"upstream overflow: over the Service's request limit\n")
        assert gate.arrived == 1 and not waiting.done()  # still waiting, never sent
        gate.opened.set()
        assert await held == (200, b"ok")
        assert await waiting == (200, b"ok")  # admitted when the first ended
        assert gate.arrived == 2
        assert await third.request("GET", "/now") == (200, b"ok")  # the queue is empty again
        for client in (first, second, third):
            client.writer.close()
    finally:
        server.close()
    counts = requests_total(source)
    assert counts[("source", WEB, "503", "UO")] == 1 and counts[("source", WEB, "200", "-")] == 3
    assert (web.counters["queued"], web.counters["rejected_max_pending_requests"]) == (1, 1)
    assert (web.active, len(web.queue)) == (0, 0)
