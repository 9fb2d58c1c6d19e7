"""RequestMirror through the real source shells on loopback (``tests.integration.proxy.mesh``):
each request of a rule that mirrors is answered by its backend, and a copy of it reaches the
mirror Service, marked ``-shadow`` (HTTP/1.1 ``Host``, HTTP/2 ``:authority``); the copies go
through ``HttpOutbound.mirror`` and ``copy``, which both source shells share. The pod behind
both Services records what it is asked, by authority."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    DataReceived,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    TrailersReceived,
)

from agent.state import Endpoint, PolicyObject, RouteObject, Service, ServicePort
from tests.integration.proxy.mesh import (
    CLIENT,
    LOCAL,
    SERVER,
    Mesh,
    free_port,
    mesh_test,
    set_policies,
)

pytestmark = pytest.mark.root

WEB_VIP, WEB_SHADOW_VIP = "10.96.8.2", "10.96.8.3"
GRPC_VIP, GRPC_SHADOW_VIP = "10.96.8.4", "10.96.8.5"
ANSWER = [(":status", "200"), ("content-type", "application/grpc")]


def _services(
    mesh: Mesh,
    name: str,
    vips: tuple[str, str],
    port: int,
    protocol: str,
    shadow_at: str = SERVER,
    at: str = SERVER,
) -> None:
    """``name`` on pod ``at``'s ``port`` (the server pod's) and ``name-shadow`` on
    ``shadow_at``'s, and a route on ``name`` whose one rule sends to ``name`` and mirrors to
    ``name-shadow``."""
    kind = "GRPCRoute" if protocol == "grpc" else "HTTPRoute"
    shadow = {"name": f"{name}-shadow", "port": 80}
    mirror = {"type": "RequestMirror", "requestMirror": {"backendRef": shadow}}
    rule = {"backendRefs": [{"name": name, "port": 80}], "filters": [mirror]}
    spec = {
        "parentRefs": [{"group": "", "kind": "Service", "name": name, "port": 80}],
        "rules": [rule],
    }
    with mesh.store.update() as tx:
        for service, vip, pod in zip((name, f"{name}-shadow"), vips, (at, shadow_at), strict=True):
            ports = (ServicePort(80, port, name=protocol, app_protocol=protocol),)
            selector = {"app": "server" if pod == SERVER else "local"}
            tx.put_service(Service(service, "default", (vip,), ports, selector, (Endpoint(pod),)))
        tx.put_route(RouteObject(kind, "default", name, spec, 1, name))


async def _mirrored(
    mesh: Mesh,
    name: str,
    vips: tuple[str, str],
    protocol: str,
    app: Callable[[Counter[str]], asyncio.Protocol],
    shadow_at: str = SERVER,
) -> tuple[Counter[str], list[asyncio.Server], asyncio.StreamReader, asyncio.StreamWriter]:
    """The pods' ``app`` (what they were asked, by authority), the Services and the route,
    and a client connection to ``name``."""
    port, seen = free_port(SERVER), Counter[str]()
    loop = asyncio.get_running_loop()
    pods = sorted({SERVER, shadow_at})
    servers = [await loop.create_server(lambda: app(seen), ip, port) for ip in pods]
    _services(mesh, name, vips, port, protocol, shadow_at)
    return seen, servers, *await mesh.connect(CLIENT, (vips[0], 80))


async def _until(seen: Counter[str], want: dict[str, int]) -> None:
    """Wait for the copies (tasks of their own: they may arrive after the answers)."""
    for _ in range(200):
        if dict(seen) == want:
            return
        await asyncio.sleep(0.05)
    assert dict(seen) == want


class _Http(asyncio.Protocol):
    """Keep-alive HTTP/1.1: counts each request by its Host, answers ``ok``."""

    def __init__(self, seen: Counter[str]) -> None:
        self.seen, self.buf = seen, b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            host = next(line for line in head.split(b"\r\n") if line.lower().startswith(b"host:"))
            self.seen[host.split(b":", 1)[1].strip().decode()] += 1
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")  # type: ignore[attr-defined]


class _Grpc(asyncio.Protocol):
    """Answers every call with one empty message; counts each by its ``:authority``."""

    def __init__(self, seen: Counter[str]) -> None:
        self.seen = seen
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, RequestReceived):
                self.seen[dict(event.headers)[":authority"]] += 1
            elif isinstance(event, DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                sid = event.stream_id
                self.conn.send_headers(sid, ANSWER)
                self.conn.send_data(sid, b"\0\0\0\0\0")
                self.conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)
        self.transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]


@mesh_test
async def test_each_http1_request_is_answered_and_copied_to_the_mirror(mesh: Mesh) -> None:
    seen, servers, reader, writer = await _mirrored(
        mesh, "web", (WEB_VIP, WEB_SHADOW_VIP), "http", _Http
    )
    for i in range(5):
        writer.write(b"GET /r%d HTTP/1.1\r\nHost: web\r\n\r\n" % i)
        answer = b""
        while not answer.endswith(b"ok"):
            answer += await asyncio.wait_for(reader.read(65536), 10)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
    writer.close()
    await _until(seen, {"web": 5, "web-shadow": 5})
    for server in servers:
        server.close()


@mesh_test
async def test_each_grpc_call_is_answered_and_copied_to_the_mirror(mesh: Mesh) -> None:
    seen, servers, reader, writer = await _mirrored(
        mesh, "grpc", (GRPC_VIP, GRPC_SHADOW_VIP), "grpc", _Grpc
    )
    await _grpc_calls(reader, writer, ["/pkg.Echo/Unary"] * 3)
    await _until(seen, {"grpc": 3, "grpc-shadow": 3})
    for server in servers:
        server.close()


@mesh_test
async def test_a_copy_to_a_same_node_pod_is_authorized_as_a_request_there(mesh: Mesh) -> None:
    """The mirror Service's endpoint is on node1, under an ALLOW on one path: the copies of
    calls to that path reach it (a connection-level check, which matches no L7 rule, refused
    them all), the others' copies are denied; every call itself is answered."""
    allow = {"selector": {"matchLabels": {"app": "local"}}, "action": "ALLOW",
             "rules": [{"to": [{"operation": {"paths": ["/pkg.Echo/Unary"]}}]}]}  # fmt: skip
    set_policies(mesh.store, PolicyObject("AuthorizationPolicy", "default", "unary", allow))
    seen, servers, reader, writer = await _mirrored(
        mesh, "grpc", (GRPC_VIP, GRPC_SHADOW_VIP), "grpc", _Grpc, shadow_at=LOCAL
    )
    await _grpc_calls(reader, writer, ["/pkg.Echo/Unary", "/pkg.Echo/Other"] * 2)
    await _until(seen, {"grpc": 4, "grpc-shadow": 2})
    snap = mesh.store.snapshot()
    shadow = snap.services[("default", "grpc-shadow")]
    counters = mesh.node1.outbound.balanced.traffic.service(snap, shadow).counters
    for _ in range(200):  # the denied copies are counted by their own tasks
        if counters["http_mirror_denied"] == 2:
            break
        await asyncio.sleep(0.05)
    assert (counters["http_mirror_sent"], counters["http_mirror_denied"]) == (2, 2)
    for server in servers:
        server.close()


@mesh_test
async def test_a_call_its_same_node_backend_refuses_is_copied_as_a_far_refusal_is(
    mesh: Mesh,
) -> None:
    """The backend pod's DENY refuses every call (PERMISSION_DENIED): a far pod's node refuses
    it after the call was sent there, so its copy goes to the mirror; a same-node pod's
    refusal, answered where the call is sent (node1 admits it for its destination), is the
    same: the copy goes too. Backend and mirror on either node, the outcome is the same."""
    port, seen = free_port(SERVER), Counter[str]()
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(lambda: _Grpc(seen), ip, port) for ip in (SERVER, LOCAL)]
    outcomes: dict[str, tuple[list[str], dict[str, int]]] = {}
    try:
        for at, shadow_at in ((SERVER, LOCAL), (LOCAL, SERVER)):
            app = "server" if at == SERVER else "local"
            deny = {"selector": {"matchLabels": {"app": app}}, "action": "DENY",
                    "rules": [{"to": [{"operation": {"paths": ["/pkg.Echo/Unary"]}}]}]}  # fmt: skip
            set_policies(mesh.store, PolicyObject("AuthorizationPolicy", "default", "deny", deny))
            _services(mesh, "grpc", (GRPC_VIP, GRPC_SHADOW_VIP), port, "grpc", shadow_at, at)
            seen.clear()
            reader, writer = await mesh.connect(CLIENT, (GRPC_VIP, 80))
            statuses = await _grpc_calls(reader, writer, ["/pkg.Echo/Unary"] * 2, expect="7")
            await _until(seen, {"grpc-shadow": 2})
            outcomes[at] = (statuses, dict(seen))
    finally:
        for server in servers:
            server.close()
    assert outcomes[LOCAL] == outcomes[SERVER] == (["7", "7"], {"grpc-shadow": 2})


async def _grpc_calls(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    paths: list[str],
    expect: str = "0",
) -> list[str]:
    """One call per path, one after the other on a new h2 connection, each answered
    ``expect`` (OK); their statuses."""
    conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    statuses = []
    for path in paths:
        head = [(":method", "POST"), (":scheme", "http"), (":authority", "grpc"),
                (":path", path), ("content-type", "application/grpc"),
                ("te", "trailers")]  # fmt: skip
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, head)
        conn.send_data(sid, b"\0\0\0\0\0", end_stream=True)
        writer.write(conn.data_to_send())
        ended = False
        while not ended:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "the proxy closed the connection instead of answering the call"
            for event in conn.receive_data(data):
                if isinstance(event, DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, ResponseReceived | TrailersReceived):
                    status = dict(event.headers).get("grpc-status")  # type: ignore[arg-type]
                    if status is not None:
                        assert status == expect, status
                        statuses.append(status)
                ended = ended or (isinstance(event, StreamEnded) and event.stream_id == sid)
            writer.write(conn.data_to_send())
    writer.close()
    return statuses
