"""Source-side HTTP/2 on loopback, through the real outbound proxy (``mesh``'s two nodes).

A gRPC call to a Service VIP port declared gRPC whose Service has no ready endpoint: like an
HTTP/1.1 port, the connection is served per request rather than reset: the port's routes may
send calls elsewhere (GAMMA's frontend Service), and without one each call gets a trailers-only
``UNAVAILABLE`` with ``no healthy upstream`` (flag ``UH``).

A Service whose only endpoint is on the source's node, under the pod's L7 AuthorizationPolicy:
no other proxy sees these calls, so node1 authorizes each one (an ALLOW on paths lets the calls
it names through; a DENY on one method refuses exactly those calls, PERMISSION_DENIED, and the
connection keeps serving the others), and reports each with both reporters.

Calls to an endpoint over HBONE: the source shell is driven by callbacks, so once the endpoint's
tunnel is open a call wakes none of the session's tasks (counted by a task factory).

A Service with two endpoints, one of which cannot be reached (nothing listens: node2 answers the
tunnel 503, or the same-node pod refuses the TCP connection; or its connect hangs, its listen
queue full, past the Service's ``perTryTimeout``): the calls that waited for its tunnel go to the
other endpoint, by the Service's TrafficPolicy retries, and every call succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from collections.abc import Callable, Coroutine, Generator
from typing import Any, cast
from unittest import mock

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    DataReceived,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    TrailersReceived,
)
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, HeadersFrame

from agent.policy.traffic.service import ServiceTraffic
from agent.proxy import h2outbound as h2outbound_module
from agent.proxy import http_inbound
from agent.proxy.h2outbound import H2SourceSession
from agent.proxy.tunnel import HboneProtocol
from agent.state import Endpoint, PolicyObject, RouteObject, Service, ServicePort
from agent.telemetry.http import HttpMetrics
from agent.telemetry.records import INBOUND, OUTBOUND
from tests.calls import CallCount
from tests.integration.proxy.mesh import (
    CLIENT,
    LOCAL,
    SERVER,
    Mesh,
    free_port,
    mesh_test,
    set_policies,
)
from tests.integration.proxy.test_hbone_limits_loopback import error_logs
from tests.integration.proxy.test_http_outbound_loopback import (
    Recorded,
    observe,
    requests_total,
    series,
)
from tests.unit.traffic.traffic_helpers import traffic_policy

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


@mesh_test
async def test_a_refused_connection_is_logged_with_its_cause_and_the_limit(mesh: Mesh) -> None:
    """The source side's refusal line names the limit the client broke (17 CONTINUATION
    frames in one header block, the limit is 16), as an HTTP/1.1 refusal's names its cause."""
    logger, seen = logging.getLogger("agent.proxy.records"), _Lines()
    logger.addHandler(seen)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        lines = await _flooded(mesh, seen)
    finally:
        logger.removeHandler(seen)
        logger.setLevel(level)
    assert len(lines) == 1 and lines[0].endswith(
        ": h2 continuation flood: 17 CONTINUATION frames in one header block, over the limit of 16"
    ), lines


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def _flooded(mesh: Mesh, seen: _Lines) -> list[str]:
    """The refusal lines logged for a connection to a gRPC Service port that floods."""
    with mesh.store.update() as tx:
        port = ServicePort(50051, 50051, name="grpc", app_protocol="grpc")
        tx.put_service(Service("front", "default", (VIP,), (port,), {"app": "none"}, ()))
    reader, writer = await mesh.connect(CLIENT, (VIP, 50051))
    conn = H2Connection(H2Configuration(client_side=True))
    conn.initiate_connection()
    block = Encoder().encode([(":method", "POST"), (":path", "/"), (":scheme", "http")])
    flood = b"".join(ContinuationFrame(1, b"").serialize() for _ in range(17))
    writer.write(conn.data_to_send() + HeadersFrame(1, block).serialize() + flood)
    while await asyncio.wait_for(reader.read(65536), 10):
        pass  # until the proxy closes the connection
    writer.close()
    return [line for line in seen.lines if "rejected (h2_" in line]


class _Counted(Coroutine[Any, Any, Any]):
    """A task's coroutine whose steps (its task's wake-ups) are counted."""

    def __init__(self, coro: Coroutine[Any, Any, Any], steps: list[int]) -> None:
        self.coro, self.steps = coro, steps

    def send(self, value: Any) -> Any:
        self.steps[0] += 1
        return self.coro.send(value)

    def throw(self, *args: Any) -> Any:
        self.steps[0] += 1
        return self.coro.throw(*args)

    def close(self) -> None:
        self.coro.close()

    def __await__(self) -> Generator[Any, None, Any]:
        raise TypeError("only run as a task")


async def _h2_pod(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    on_request: Callable[[H2Connection, int], None],
) -> None:
    """An h2c pod: ``on_request(conn, stream_id)`` once each request ended."""
    conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    while data := await reader.read(65536):
        for event in conn.receive_data(data):
            if isinstance(event, DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                on_request(conn, event.stream_id)
        writer.write(conn.data_to_send())
    writer.close()


def _answer_ok(conn: H2Connection, sid: int) -> None:
    conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
    conn.send_data(sid, b"\0\0\0\0\0")
    conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)


async def _grpc_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every call with one empty message and ``grpc-status: 0``."""
    await _h2_pod(reader, writer, _answer_ok)


def _local_front(mesh: Mesh) -> int:
    """Service ``front``, a gRPC port whose one endpoint is the ``local`` pod (node1, the
    client's node); its target port, free on that pod."""
    port = free_port(LOCAL)
    with mesh.store.update() as tx:
        grpc = ServicePort(50051, port, name="grpc", app_protocol="grpc")
        tx.put_service(
            Service("front", "default", (VIP,), (grpc,), {"app": "local"}, (Endpoint(LOCAL),))
        )
    return port


async def _grpc_front(mesh: Mesh) -> asyncio.Server:
    """Service ``front`` (a gRPC port, no TrafficPolicy) whose one endpoint runs ``_grpc_app``."""
    port = free_port(SERVER)
    with mesh.store.update() as tx:
        grpc = ServicePort(50051, port, name="grpc", app_protocol="grpc")
        tx.put_service(
            Service("front", "default", (VIP,), (grpc,), {"app": "server"}, (Endpoint(SERVER),))
        )
    return await asyncio.start_server(_grpc_app, SERVER, port)


@mesh_test
async def test_calls_to_an_open_endpoint_wake_no_task_of_the_session(mesh: Mesh) -> None:
    app = await _grpc_front(mesh)
    steps = [0]
    loop = asyncio.get_running_loop()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        if getattr(coro, "__qualname__", "").startswith(("H2SourceSession.", "Outbox.")):
            coro = _Counted(coro, steps)
        return asyncio.Task(coro, loop=loop, **kw)

    loop.set_task_factory(factory)
    try:
        reader, writer = await mesh.connect(CLIENT, (VIP, 50051))
        conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()

        async def call() -> str:
            sid = conn.get_next_available_stream_id()
            head = [(":method", "POST"), (":scheme", "http"), (":authority", "front"),
                    (":path", "/pkg.Echo/Unary"), ("content-type", "application/grpc"),
                    ("te", "trailers")]  # fmt: skip
            conn.send_headers(sid, head)
            conn.send_data(sid, b"\0\0\0\0\0", end_stream=True)
            writer.write(conn.data_to_send())
            status = ""
            while True:
                data = await asyncio.wait_for(reader.read(65536), 10)
                assert data, "the proxy closed the connection instead of answering the call"
                for event in conn.receive_data(data):
                    if isinstance(event, DataReceived):
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, StreamEnded) and event.stream_id == sid:
                        writer.write(conn.data_to_send())
                        return status
                    elif getattr(event, "headers", None):
                        status = dict(event.headers).get("grpc-status", status)  # type: ignore[attr-defined]
                writer.write(conn.data_to_send())

        assert await call() == "0"  # the endpoint's tunnel opens (its task's steps)
        before, calls = steps[0], 20
        for _ in range(calls):
            assert await call() == "0"
        woken = steps[0] - before
        writer.close()
    finally:
        loop.set_task_factory(None)
        app.close()
    # A task per side woke at least once per call for the request and once for the answer.
    assert woken < calls, f"{woken} task wake-ups of the source session for {calls} calls"


@mesh_test
async def test_a_calls_request_leaves_in_the_clients_read_callback(mesh: Mesh) -> None:
    """One call at a time over a tunnel alone on its HBONE connection: each request is sealed
    and sent to the endpoint's node in the callback that read it from the client, not after
    the rest of that callback and the loop's next ones (a ``flush_soon`` per call before).
    Counted at node1's side of the HBONE connection (its client side); the calls succeed."""
    app = await _grpc_front(mesh)
    deferred: list[int] = []
    real = HboneProtocol.flush_soon

    def counted(self: HboneProtocol) -> None:
        if self.codec.client_side:
            deferred.append(len(self.streams))
        real(self)

    HboneProtocol.flush_soon = counted  # type: ignore[method-assign]
    try:
        conn, reader, writer = await _client(mesh)
        statuses = await _calls(conn, reader, writer, 1)  # the tunnel opens
        deferred.clear()
        for _ in range(20):
            statuses += await _calls(conn, reader, writer, 1)
        writer.close()
    finally:
        HboneProtocol.flush_soon = real  # type: ignore[method-assign]
        app.close()
    assert statuses == ["0"] * 21
    assert deferred == [], f"{len(deferred)} requests of 20 waited for a later flush"


class _CountedTimers:
    """An event loop as the session sees it, counting the timers it arms (``call_later``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, armed: list[float]) -> None:
        self._real, self._armed = loop, armed

    def call_later(self, delay: float, callback: Any, *args: Any, **kw: Any) -> Any:
        self._armed.append(delay)
        return self._real.call_later(delay, callback, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@mesh_test
async def test_calls_with_deadlines_arm_no_timer_each(mesh: Mesh) -> None:
    """gRPC calls one after another, each with a 10 s ``grpc-timeout``: the session keeps the
    timer it armed for the first call's deadline (each later deadline is later; the timer
    finds nothing due and is armed again then) instead of a cancel and a new timer per call.
    The calls are answered, and a deadline still expires (the other tests of timeouts)."""
    app = await _grpc_front(mesh)
    armed: list[float] = []
    real_init = H2SourceSession.__init__

    def counted_init(self: H2SourceSession, *args: Any, **kw: Any) -> None:
        real_init(self, *args, **kw)
        self._loop = cast(asyncio.AbstractEventLoop, _CountedTimers(self._loop, armed))

    H2SourceSession.__init__ = counted_init  # type: ignore[method-assign]
    try:
        conn, reader, writer = await _client(mesh)
        statuses = []
        for _ in range(20):  # one at a time: each call's deadline is later than the last's
            statuses += await _calls(conn, reader, writer, 1, (("grpc-timeout", "10S"),))
        writer.close()
    finally:
        H2SourceSession.__init__ = real_init  # type: ignore[method-assign]
        app.close()
    assert statuses == ["0"] * 20
    assert len(armed) == 1, f"{len(armed)} timers armed for 20 calls"


async def _calls(
    conn: H2Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    n: int,
    extra: tuple[tuple[str, str], ...] = (),
) -> list[str]:
    """``n`` unary calls sent at once on ``conn`` (``extra``: more request headers): the
    ``grpc-status`` of each."""
    status: dict[int, str] = {}
    for _ in range(n):
        sid = conn.get_next_available_stream_id()
        head = [(":method", "POST"), (":scheme", "http"), (":authority", "front"),
                (":path", "/pkg.Echo/Unary"), ("content-type", "application/grpc"),
                ("te", "trailers"), *extra]  # fmt: skip
        conn.send_headers(sid, head)
        conn.send_data(sid, b"\0\0\0\0\0", end_stream=True)
        status[sid] = ""
    writer.write(conn.data_to_send())
    ended: set[int] = set()
    while ended != set(status):
        data = await asyncio.wait_for(reader.read(65536), 10)
        assert data, "the proxy closed the connection instead of answering the calls"
        for event in conn.receive_data(data):
            if isinstance(event, DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                ended.add(event.stream_id)
            elif isinstance(event, ResponseReceived | TrailersReceived):
                headers = dict(event.headers)  # type: ignore[arg-type]
                status[event.stream_id] = headers.get("grpc-status", status[event.stream_id])
        writer.write(conn.data_to_send())
    return list(status.values())


@mesh_test
async def test_calls_to_an_endpoint_whose_tunnel_is_refused_go_to_the_other(mesh: Mesh) -> None:
    await _one_unreachable(mesh, SERVER)  # nothing listens there: node2 answers 503


@mesh_test
async def test_calls_to_a_same_node_endpoint_that_refuses_go_to_the_other(mesh: Mesh) -> None:
    await _one_unreachable(mesh, LOCAL)


@mesh_test
async def test_calls_to_an_endpoint_whose_connect_hangs_go_to_the_other_after_a_try(
    mesh: Mesh,
) -> None:
    port = free_port(LOCAL)
    with socket.socket() as hanging:
        hanging.bind((LOCAL, port))
        hanging.listen(0)
        held = _fill_listen_queue((LOCAL, port))
        try:
            # The try's time, not the whole connect timeout (the mesh's 2 s, which would leave
            # no time for a retry): only perTryTimeout lets the call reach the other endpoint.
            retries = {"perTryTimeout": "300ms"}
            pool = {"connectTimeout": "2s"}
            await _one_unreachable(mesh, LOCAL, port, "connect-failure", retries=retries,
                                   connectionPool=pool)  # fmt: skip
        finally:
            for s in held:
                s.close()


def _fill_listen_queue(address: tuple[str, int]) -> list[socket.socket]:
    """Connect to ``address`` (a socket that never accepts) until its queue is full: a further
    SYN is dropped, so a connect hangs. Returns the connections that filled it."""
    held = []
    for _ in range(64):
        s = socket.socket()
        s.settimeout(0.3)
        try:
            s.connect(address)
        except TimeoutError:
            s.close()
            return held
        held.append(s)
    raise AssertionError(f"{address} accepted 64 connections without accept(): no full queue")


async def _one_unreachable(
    mesh: Mesh,
    down: str,
    port: int | None = None,
    cause: str = "refused",
    **policy: dict[str, object],
) -> None:
    """Twenty calls, five at a time, to ``front`` whose endpoint ``down`` fails (``cause``):
    all OK."""
    up = LOCAL if down == SERVER else SERVER
    port = port or free_port(up)
    with mesh.store.update() as tx:
        grpc = ServicePort(50051, port, name="grpc", app_protocol="grpc")
        endpoints = (Endpoint(SERVER), Endpoint(LOCAL))
        tx.put_service(Service("front", "default", (VIP,), (grpc,), {"app": "server"}, endpoints))
        # Round robin, and no ejection: the unreachable endpoint keeps being chosen.
        spec = {"targetRef": {"kind": "Service", "name": "front"},
                "loadBalancer": {"type": "ROUND_ROBIN"},
                "outlierDetection": {"consecutiveFailures": 1000}, **policy}  # fmt: skip
        tx.put_policy(traffic_policy(spec))
    source, _ = observe(mesh)
    app = await asyncio.start_server(_grpc_app, up, port)
    try:
        reader, writer = await mesh.connect(CLIENT, (VIP, 50051))
        conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        got = [await _calls(conn, reader, writer, 5) for _ in range(4)]
        writer.close()
    finally:
        app.close()
    assert got == [["0"] * 5] * 4
    snap = mesh.store.snapshot()
    front = snap.services[("default", "front")]
    traffic = mesh.node1.outbound.balanced.traffic.service(snap, front)
    assert traffic.counters["retries"] >= 1  # at least the calls that waited for one tunnel
    assert traffic.counters["retries"] == traffic.counters[f"failed_{cause}"]
    assert (traffic.active, traffic.pending) == (0, 0)
    # Served by the same-node pod: node1 is its destination too; never by the one it could
    # not reach (its calls reached no pod there).
    here = {("destination", FRONT, "200", "-"): 20} if up == LOCAL else {}
    assert requests_total(source) == {("source", FRONT, "200", "-"): 20, **here}
    rejections = mesh.node1.core.registry.rejections
    assert "tunnel_refused" not in rejections and "upstream_unreachable" not in rejections


@mesh_test
async def test_same_node_calls_are_reported_by_both_reporters_once(mesh: Mesh) -> None:
    """gRPC calls over one client connection to a Service with an endpoint on each node:
    node1 reports the calls that went to its own pod with ``reporter="destination"`` too (no
    other proxy saw them), node2 those that went to its pod, and none is reported twice."""
    port = free_port(SERVER)
    with mesh.store.update() as tx:
        grpc = ServicePort(50051, port, name="grpc", app_protocol="grpc")
        endpoints = (Endpoint(SERVER), Endpoint(LOCAL))
        tx.put_service(Service("front", "default", (VIP,), (grpc,), {"app": "server"}, endpoints))
    source, destination = observe(mesh)
    apps = [await asyncio.start_server(_grpc_app, ip, port) for ip in (SERVER, LOCAL)]
    try:
        reader, writer = await mesh.connect(CLIENT, (VIP, 50051))
        conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        calls = 30
        statuses = [
            status for _ in range(calls) for status in await _calls(conn, reader, writer, 1)
        ]
        assert statuses == ["0"] * calls
        # ``nodemesh connections``: the client's connection counts every call it carried,
        # whichever endpoint served it.
        (client_conn,) = [r for r in mesh.node1.core.registry if r.protocol == "http/2"]
        assert client_conn.requests == calls
        writer.close()
    finally:
        for app in apps:
            app.close()
    src, dst = requests_total(source), requests_total(destination)
    assert src[("source", FRONT, "200", "-")] == calls
    here, there = src[("destination", FRONT, "200", "-")], dst[("destination", FRONT, "200", "-")]
    assert here, (here, there)  # the faster same-node endpoint served some (29-30 of 30)
    assert here + there == calls
    assert not [k for k in dst if k[0] == "source"]


@mesh_test
async def test_calls_to_a_same_node_pod_port_declared_grpc_are_reported_by_both(mesh: Mesh) -> None:
    """``client`` calls the ``local`` pod (same node) on its pod IP, on the port a Service
    declares gRPC: node1 serves it as the destination would (the HTTP/2 session) and
    reports each call once with each reporter."""
    port = _local_front(mesh)
    source, _ = observe(mesh)
    app = await asyncio.start_server(_grpc_app, LOCAL, port)
    try:
        reader, writer = await mesh.connect(CLIENT, (LOCAL, port))
        conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        calls = 5
        statuses = [
            status for _ in range(calls) for status in await _calls(conn, reader, writer, 1)
        ]
        writer.close()
    finally:
        app.close()
    assert statuses == ["0"] * calls
    counts = requests_total(source)
    assert counts[("source", FRONT, "200", "-")] == calls
    assert counts[("destination", FRONT, "200", "-")] == calls


def _recording_app(
    paths: list[str],
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]:
    """``_grpc_app`` that notes the ``:path`` of every request it receives."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, RequestReceived):
                    paths.append(dict(event.headers)[":path"])  # type: ignore[arg-type]
                elif isinstance(event, DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, StreamEnded):
                    sid = event.stream_id
                    head = [(":status", "200"), ("content-type", "application/grpc")]
                    conn.send_headers(sid, head)
                    conn.send_data(sid, b"\0\0\0\0\0")
                    conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)
            writer.write(conn.data_to_send())
        writer.close()

    return serve


async def _requests(
    conn: H2Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    paths: list[str],
) -> list[str]:
    """One request per path, one after the other on ``conn``: a gRPC call (its ``grpc-status``)
    for a ``/pkg.Service/Method`` path, else a plain HTTP/2 GET (its ``:status``)."""
    answers = []
    for path in paths:
        grpc = path.startswith("/pkg.")
        sid = conn.get_next_available_stream_id()
        head = [(":method", "POST" if grpc else "GET"), (":scheme", "http"),
                (":authority", "front"), (":path", path)]  # fmt: skip
        if grpc:
            head += [("content-type", "application/grpc"), ("te", "trailers")]
        conn.send_headers(sid, head, end_stream=not grpc)
        if grpc:
            conn.send_data(sid, b"\0\0\0\0\0", end_stream=True)
        writer.write(conn.data_to_send())
        answer, ended = "", False
        while not ended:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "the proxy closed the connection instead of answering"
            for event in conn.receive_data(data):
                if isinstance(event, DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, ResponseReceived | TrailersReceived):
                    headers = dict(event.headers)  # type: ignore[arg-type]
                    name = "grpc-status" if grpc else ":status"
                    answer = headers.get(name, answer)
                ended = ended or (isinstance(event, StreamEnded) and event.stream_id == sid)
            writer.write(conn.data_to_send())
        answers.append(answer)
    return answers


async def _same_node_only(
    mesh: Mesh, rules: dict[str, object], paths: list[str], *others: PolicyObject
) -> tuple[list[str], list[str], ServiceTraffic]:
    """``paths`` requested on one connection to ``front``, whose one endpoint is the same-node
    pod ``local`` under the AuthorizationPolicy ``rules`` (and ``others``): the answers, the
    paths the pod received, and the Service's traffic control."""
    port = _local_front(mesh)
    spec = {"selector": {"matchLabels": {"app": "local"}}, **rules}
    set_policies(mesh.store, PolicyObject("AuthorizationPolicy", "default", "calls", spec), *others)
    received: list[str] = []
    app = await asyncio.start_server(_recording_app(received), LOCAL, port)
    try:
        reader, writer = await mesh.connect(CLIENT, (VIP, 50051))
        conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        answers = await _requests(conn, reader, writer, paths)
        writer.close()
    finally:
        app.close()
    snap = mesh.store.snapshot()
    traffic = mesh.node1.outbound.balanced.traffic.service(
        snap, snap.services[("default", "front")]
    )
    return answers, received, traffic


def _settled(traffic: ServiceTraffic) -> None:
    assert (traffic.active, traffic.pending) == (0, 0)  # every call's attempt finished
    assert not [k for k in traffic.counters if k.startswith("failed")]  # none against the pod


def _by_reporter(source: HttpMetrics, **match: str) -> dict[str, float]:
    """The requests node1 reported whose labels include ``match``, by reporter."""
    out: dict[str, float] = {}
    for labels, value in series(source, destination_service=FRONT, **match).items():
        reporter = dict(labels)["reporter"]
        out[reporter] = out.get(reporter, 0) + value
    return out


@mesh_test
async def test_an_allow_on_paths_lets_its_calls_reach_the_same_node_pod(mesh: Mesh) -> None:
    source, _ = observe(mesh)
    allow = {"action": "ALLOW", "rules": [{"to": [{"operation": {"paths": ["/pkg.Echo/*"]}}]}]}
    paths = ["/pkg.Echo/Unary", "/pkg.Other/Do", "/pkg.Echo/Unary"]
    answers, received, traffic = await _same_node_only(mesh, allow, paths)
    assert answers == ["0", "7", "0"]
    assert received == ["/pkg.Echo/Unary"] * 2
    _settled(traffic)
    both = {"source": 2.0, "destination": 2.0}
    assert _by_reporter(source, grpc_response_status="0") == both
    # The refusal's flag is its destination's: the source reports it as a far node's, without.
    assert _by_reporter(source, grpc_response_status="7", response_flags="RBAC") == {
        "destination": 1.0
    }
    assert _by_reporter(source, grpc_response_status="7", response_flags="-") == {"source": 1.0}


@mesh_test
async def test_a_same_node_endpoints_calls_build_no_authorization_request_each(
    mesh: Mesh,
) -> None:
    """The source admits a same-node endpoint's calls through a ``RequestAdmission`` kept per
    endpoint and snapshot (as HTTP/1.1's ``_verdict_here``): ten calls without a policy build
    no authorization (``http_inbound.authorize``, the policed path; before: ten
    ``request_verdict``, each with its ``Request``, log text and ``Decision``); under an ALLOW
    put on the open connection each call is authorized (a path it does not allow refused, one
    it allows served)."""
    port = _local_front(mesh)
    calls = CallCount(http_inbound.authorize.__code__)
    received: list[str] = []
    app = await asyncio.start_server(_recording_app(received), LOCAL, port)
    try:
        reader, writer = await mesh.connect(CLIENT, (VIP, 50051))
        conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        assert await _requests(conn, reader, writer, ["/pkg.Echo/Warm"]) == ["0"]
        with calls:
            answers = await _requests(conn, reader, writer, ["/pkg.Echo/Unary"] * 10)
            assert calls.count == 0
            allow = {
                "selector": {"matchLabels": {"app": "local"}},
                "rules": [{"to": [{"operation": {"paths": ["/pkg.Echo/*"]}}]}],
            }
            set_policies(mesh.store, PolicyObject("AuthorizationPolicy", "default", "a", allow))
            paths = ["/pkg.Other/Do", "/pkg.Echo/Unary", "/pkg.Echo/Unary"]
            answers += await _requests(conn, reader, writer, paths)
        writer.close()
    finally:
        app.close()
    assert answers == ["0"] * 10 + ["7", "0", "0"]
    assert received == ["/pkg.Echo/Warm"] + ["/pkg.Echo/Unary"] * 12
    assert calls.count == 3


@mesh_test
async def test_a_deny_on_one_method_refuses_only_its_calls_to_the_same_node_pod(mesh: Mesh) -> None:
    source, _ = observe(mesh)
    deny = {
        "action": "DENY",
        "rules": [{"to": [{"operation": {"paths": ["/pkg.Echo/Delete", "/admin"]}}]}],
    }
    paths = ["/pkg.Echo/Get", "/pkg.Echo/Delete", "/pkg.Echo/Get", "/admin", "/status",
             "/pkg.Echo/Delete", "/pkg.Echo/Get"]  # fmt: skip
    answers, received, traffic = await _same_node_only(mesh, deny, paths)
    assert answers == ["0", "7", "0", "403", "200", "7", "0"]
    assert received == ["/pkg.Echo/Get", "/pkg.Echo/Get", "/status", "/pkg.Echo/Get"]
    _settled(traffic)
    # The refusals' flag is their destination's: the source reports them as a far node's.
    assert _by_reporter(source, grpc_response_status="7", response_flags="RBAC") == {
        "destination": 2.0
    }
    assert _by_reporter(source, response_code="403", response_flags="RBAC") == {"destination": 1.0}
    assert _by_reporter(source, response_flags="-") == {"source": 7.0, "destination": 4.0}
    (labels,) = (dict(k) for k in series(source, reporter="destination", response_code="403"))
    assert (labels["destination_workload"], labels["source_workload"]) == ("local", "client")


@mesh_test
async def test_a_rate_limit_on_the_same_node_pod_is_applied_after_its_policy(mesh: Mesh) -> None:
    """node1 is the only proxy of these calls, so it applies the pod's RateLimitPolicy, after
    its L7 policy (a denied call spends no token), from node1's buckets: with the clock frozen
    exactly ``burst`` requests pass, calls or not; the rest are answered as the destination
    answers them (gRPC ``RESOURCE_EXHAUSTED``, HTTP/2 429, flag ``RL``), counted in
    ``nodemesh_rate_limited_requests_total``'s counter and by both reporters."""
    source, _ = observe(mesh)
    mesh.node1.core.clock = lambda: 100.0  # frozen: no token comes back
    deny = {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/pkg.Echo/Delete"]}}]}]}
    limit = {"targetRef": {"group": "", "kind": "Service", "name": "front"},
             "requestsPerSecond": 1, "burst": 3, "perIdentity": False}  # fmt: skip
    paths = ["/pkg.Echo/Delete", "/pkg.Echo/Get", "/status", "/pkg.Echo/Get", "/pkg.Echo/Get",
             "/pkg.Echo/Delete", "/status", "/pkg.Echo/Get"]  # fmt: skip
    answers, received, traffic = await _same_node_only(
        mesh, deny, paths, PolicyObject("RateLimitPolicy", "default", "front-limit", limit)
    )
    assert answers == ["7", "0", "200", "0", "8", "7", "429", "8"]
    assert received == ["/pkg.Echo/Get", "/status", "/pkg.Echo/Get"]
    assert mesh.node1.core.registry.rate_limited == {FRONT: 3}
    _settled(traffic)
    # Each refusal's flag is on its destination report only, as a far node's would be.
    assert _by_reporter(source, grpc_response_status="8", response_flags="RL") == {
        "destination": 2.0
    }
    assert _by_reporter(source, grpc_response_status="7", response_flags="RBAC") == {
        "destination": 2.0
    }
    assert _by_reporter(source, response_code="429", response_flags="RL") == {"destination": 1.0}
    assert _by_reporter(source, response_flags="-") == {"source": 8.0, "destination": 3.0}


@mesh_test
async def test_a_same_node_refusal_is_reported_by_the_source_as_a_far_nodes_is(mesh: Mesh) -> None:
    """A DENY on one method and one token per pod (both nodes' clocks frozen): the same
    requests get the same answers whether ``front``'s one endpoint is on node2 or node1, and
    the source reports them the same: a far node's refusal reaches it as a plain response
    (PERMISSION_DENIED, 429), so a same-node one is reported without the ``RBAC``/``RL`` its
    destination report carries."""
    port = free_port(SERVER)
    deny = {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/pkg.Echo/Delete"]}}]}]}
    set_policies(mesh.store, PolicyObject("AuthorizationPolicy", "default", "no-delete", deny))
    mesh.node1.core.clock = mesh.node2.core.clock = lambda: 100.0
    source, destination = observe(mesh)
    paths = ["/pkg.Echo/Delete", "/pkg.Echo/Get", "/status"]
    reported: dict[str, Counter[tuple[str, ...]]] = {}
    apps = [await asyncio.start_server(_recording_app([]), ip, port) for ip in (SERVER, LOCAL)]
    try:
        for pod in (SERVER, LOCAL):
            before = _source_view(source)
            _front(mesh, port, pod)
            with mesh.store.update() as tx:
                tx.put_policy(_limit("front", 1))
            conn, reader, writer = await _client(mesh)
            assert await _requests(conn, reader, writer, paths) == ["7", "0", "429"], pod
            writer.close()
            reported[pod] = _source_view(source) - before
    finally:
        for app in apps:
            app.close()
    assert (
        reported[LOCAL]
        == reported[SERVER]
        == Counter({("200", "7", "-"): 1, ("200", "0", "-"): 1, ("429", "", "-"): 1})
    )
    for metrics in (destination, source):  # the far pod's destination report, and node1's
        assert _by_reporter(metrics, grpc_response_status="7", response_flags="RBAC") == {
            "destination": 1.0
        }
        assert _by_reporter(metrics, response_code="429", response_flags="RL") == {
            "destination": 1.0
        }


def _source_view(metrics: HttpMetrics) -> Counter[tuple[str, ...]]:
    """(response_code, grpc_response_status, response_flags) → requests reported as source."""
    out: Counter[tuple[str, ...]] = Counter()
    for labels, value in series(metrics, reporter="source").items():
        lb = dict(labels)
        out[(lb["response_code"], lb["grpc_response_status"], lb["response_flags"])] += int(value)
    return out


def _answering(
    status: int,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]:
    """A pod answering every plain HTTP/2 request ``status`` with no body."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, StreamEnded):
                    conn.send_headers(event.stream_id, [(":status", str(status))], end_stream=True)
            writer.write(conn.data_to_send())
        writer.close()

    return serve


def _front(mesh: Mesh, port: int, *endpoints: str, **policy: object) -> None:
    """``front`` (gRPC port) with ``endpoints``, round robin (no ejection) and ``policy``."""
    with mesh.store.update() as tx:
        grpc = ServicePort(50051, port, name="grpc", app_protocol="grpc")
        tx.put_service(Service("front", "default", (VIP,), (grpc,), {"app": "server"},
                               tuple(Endpoint(ip) for ip in endpoints)))  # fmt: skip
        spec = {"targetRef": {"kind": "Service", "name": "front"},
                "loadBalancer": {"type": "ROUND_ROBIN"},
                "outlierDetection": {"consecutiveFailures": 1000}, **policy}  # fmt: skip
        tx.put_policy(traffic_policy(spec))


def _retrying(*codes: int) -> RouteObject:
    """An HTTPRoute on ``front`` whose one rule retries once on ``codes``."""
    rule = {"backendRefs": [{"name": "front", "port": 50051}],
            "retry": {"attempts": 1, "codes": list(codes), "backoff": "1ms"}}  # fmt: skip
    spec = {"parentRefs": [{"group": "", "kind": "Service", "name": "front", "port": 50051}],
            "rules": [rule]}  # fmt: skip
    return RouteObject("HTTPRoute", "default", "front-retry", spec, 1, "front-retry")


async def _client(mesh: Mesh) -> tuple[H2Connection, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await mesh.connect(CLIENT, (VIP, 50051))
    conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    return conn, reader, writer


def _front_counters(mesh: Mesh) -> Counter[str]:
    snap = mesh.store.snapshot()
    front = snap.services[("default", "front")]
    return mesh.node1.outbound.balanced.traffic.service(snap, front).counters


@mesh_test
async def test_a_retried_try_of_a_same_node_endpoint_is_reported_by_its_destination(
    mesh: Mesh,
) -> None:
    """A rule retries 503; the same-node pod answers 503, the far one 200: every request is
    answered 200, node2 reports the ones it served, and node1 reports each 503 its pod gave
    (dropped for a retry) as their destination, as a far node reports every try it answered."""
    port = free_port(SERVER)
    _front(mesh, port, SERVER, LOCAL)
    with mesh.store.update() as tx:
        tx.put_route(_retrying(503))
    source, destination = observe(mesh)
    pods = [await asyncio.start_server(_answering(200), SERVER, port),
            await asyncio.start_server(_answering(503), LOCAL, port)]  # fmt: skip
    n = 6
    try:
        conn, reader, writer = await _client(mesh)
        answers = await _requests(conn, reader, writer, ["/flaky"] * n)
        writer.close()
    finally:
        for pod in pods:
            pod.close()
    assert answers == ["200"] * n
    here, there = requests_total(source), requests_total(destination)
    assert here[("source", FRONT, "200", "-")] == there[("destination", FRONT, "200", "-")] == n
    retried = _front_counters(mesh)["http_retry_attempted"]
    assert here[("destination", FRONT, "503", "-")] == retried >= 2
    assert not [k for k in here if k[0] == "destination" and k[2] != "503"]


@mesh_test
async def test_a_delay_injected_at_the_source_is_not_in_the_same_node_destination_report(
    mesh: Mesh,
) -> None:
    """Every call is delayed 200 ms at the source: node1's report as the same-node pod's
    destination starts when the call is sent there, as a far node's would."""
    port = free_port(LOCAL)
    delay = 0.2
    _front(mesh, port, LOCAL, faultInjection={"delay": {"percent": 100, "fixedDelay": "200ms"}})
    recorded = Recorded(mesh)
    app = await asyncio.start_server(_grpc_app, LOCAL, port)
    try:
        conn, reader, writer = await _client(mesh)
        assert await _calls(conn, reader, writer, 1) == ["0"]
        writer.close()
    finally:
        app.close()
    (sent,), (served,) = recorded.by(OUTBOUND), recorded.by(INBOUND)
    slack = 0.01  # the timer's resolution
    assert sent.duration_ms >= (delay - slack) * 1000  # the delay was injected
    assert served.started_at >= sent.started_at + delay - slack
    assert served.duration_ms <= sent.duration_ms - (delay - slack) * 1000


def _limit(service: str, burst: int) -> PolicyObject:
    spec = {"targetRef": {"group": "", "kind": "Service", "name": service},
            "requestsPerSecond": 1, "burst": burst, "perIdentity": False}  # fmt: skip
    return PolicyObject("RateLimitPolicy", "default", f"{service}-limit", spec)


@mesh_test
async def test_a_call_that_cannot_reach_the_same_node_pod_spends_none_of_its_tokens(
    mesh: Mesh,
) -> None:
    """The pod's limit is applied to what arrives there: calls whose connection could not be
    opened (nothing listens: UNAVAILABLE) spend no token. One token, clock frozen: then the
    pod's first call passes and its second is RESOURCE_EXHAUSTED."""
    port = free_port(LOCAL)
    _front(mesh, port, LOCAL)
    with mesh.store.update() as tx:
        tx.put_policy(_limit("front", 1))  # beside the TrafficPolicy
    mesh.node1.core.clock = lambda: 100.0
    conn, reader, writer = await _client(mesh)
    answers = await _calls(conn, reader, writer, 2)
    app = await asyncio.start_server(_grpc_app, LOCAL, port)
    try:
        answers += [s for _ in range(2) for s in await _calls(conn, reader, writer, 1)]
        writer.close()
    finally:
        app.close()
    assert answers == ["14", "14", "0", "8"]
    assert mesh.node1.core.registry.rate_limited == {FRONT: 1}


@mesh_test
async def test_a_call_that_ends_during_its_injected_delay_spends_no_token(mesh: Mesh) -> None:
    """Calls are delayed 300 ms at the source; the first one's own deadline (50 ms) ends it
    during the delay, before it is sent: a far node never sees it, so the same-node pod's one
    token (clock frozen) is still there for the next call."""
    port = free_port(LOCAL)
    _front(mesh, port, LOCAL, faultInjection={"delay": {"percent": 100, "fixedDelay": "300ms"}})
    with mesh.store.update() as tx:
        tx.put_policy(_limit("front", 1))  # beside the TrafficPolicy
    mesh.node1.core.clock = lambda: 100.0
    app = await asyncio.start_server(_grpc_app, LOCAL, port)
    try:
        conn, reader, writer = await _client(mesh)
        sid = conn.get_next_available_stream_id()
        head = [(":method", "POST"), (":scheme", "http"), (":authority", "front"),
                (":path", "/pkg.Echo/Unary"), ("content-type", "application/grpc"),
                ("te", "trailers"), ("grpc-timeout", "50m")]  # fmt: skip
        conn.send_headers(sid, head)
        conn.send_data(sid, b"\0\0\0\0\0", end_stream=True)
        writer.write(conn.data_to_send())
        expired = ""
        while not expired:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data
            for event in conn.receive_data(data):
                if isinstance(event, ResponseReceived | TrailersReceived):
                    expired = dict(event.headers).get("grpc-status", "")  # type: ignore[arg-type]
            writer.write(conn.data_to_send())
        answers = [expired] + [s for _ in range(2) for s in await _calls(conn, reader, writer, 1)]
        writer.close()
    finally:
        app.close()
    assert answers == ["4", "0", "8"]  # DEADLINE_EXCEEDED, OK, RESOURCE_EXHAUSTED


@mesh_test
async def test_a_same_node_429_is_retried_by_a_rule_that_retries_429(mesh: Mesh) -> None:
    """A rule retries 429 and the same-node pod has one token (clock frozen): a far pod's 429
    comes back as a response and is retried, so the same-node pod's is too. Every plain
    HTTP/2 request is answered 200; each 429 is local's destination report and a retry."""
    port = free_port(SERVER)
    _front(mesh, port, SERVER, LOCAL)
    with mesh.store.update() as tx:
        solo = ServicePort(80, port)
        tx.put_service(Service("solo", "default", ("10.96.7.5",), (solo,), {"app": "local"},
                               (Endpoint(LOCAL),)))  # fmt: skip
        tx.put_route(_retrying(429))
        tx.put_policy(_limit("solo", 1))
    mesh.node1.core.clock = lambda: 100.0
    source, _ = observe(mesh)
    pods = [await asyncio.start_server(_answering(200), ip, port) for ip in (SERVER, LOCAL)]
    n = 6
    try:
        conn, reader, writer = await _client(mesh)
        answers = await _requests(conn, reader, writer, [f"/r{i}" for i in range(n)])
        writer.close()
    finally:
        for pod in pods:
            pod.close()
    assert answers == ["200"] * n
    limited = mesh.node1.core.registry.rate_limited["solo.default.svc.cluster.local"]
    assert limited >= 1
    counts = requests_total(source)
    assert counts[("source", FRONT, "200", "-")] == n
    assert counts[("destination", FRONT, "429", "RL")] == limited
    assert _front_counters(mesh)["http_retry_attempted"] == limited


async def _resetting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A pod that resets every stream (INTERNAL_ERROR) once its request ended, unanswered."""
    await _h2_pod(
        reader, writer, lambda conn, sid: conn.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
    )


@pytest.mark.parametrize(
    ("path", "codes", "answer", "retries"),
    [
        ("/plain", (503,), "502", 0),
        ("/plain", (502,), "502", 1),
        ("/pkg.Echo/Get", (500,), "14", 0),
        ("/pkg.Echo/Get", (503,), "14", 1),
    ],
)
def test_a_same_node_pods_reset_is_retried_as_a_far_pods_is(
    path: str, codes: tuple[int, ...], answer: str, retries: int
) -> None:
    """``front``'s one pod resets every stream before answering; a rule retries once on
    ``codes``. A far pod's reset reaches node1 as node2's answer, 502 (a gRPC call's
    trailers-only UNAVAILABLE, 503 to a rule), retried only if the codes have it; a same-node
    pod's own reset is decided the same way (it was retried whatever the codes), and the
    source reports the answer as node2's, without the destination report's ``UR``."""

    @mesh_test
    async def scenario(mesh: Mesh) -> None:
        port = free_port(SERVER)
        source, _ = observe(mesh)
        outcomes: dict[str, tuple[list[str], int, Counter[tuple[str, ...]]]] = {}
        pods = [await asyncio.start_server(_resetting, ip, port) for ip in (SERVER, LOCAL)]
        try:
            for pod in (SERVER, LOCAL):
                _front(mesh, port, pod)
                with mesh.store.update() as tx:
                    tx.put_route(_retrying(*codes))
                before = _front_counters(mesh)["http_retry_attempted"]
                reported = _source_view(source)
                conn, reader, writer = await _client(mesh)
                answers = await _requests(conn, reader, writer, [path])
                writer.close()
                retried = _front_counters(mesh)["http_retry_attempted"] - before
                outcomes[pod] = (answers, retried, _source_view(source) - reported)
        finally:
            for server in pods:
                server.close()
        grpc = path.startswith("/pkg.")
        seen = ("200", "14", "-") if grpc else ("502", "", "-")
        assert outcomes[SERVER] == ([answer], retries, Counter({seen: 1})), outcomes
        assert outcomes[LOCAL] == outcomes[SERVER]

    scenario()


def _failing_outboxes(times: int, failed: list[int]) -> Callable[..., object]:
    """``h2outbound._outbox`` that raises the first ``times`` calls (an endpoint's set-up
    failing after its open), then makes the real one."""
    real = h2outbound_module._outbox

    def outbox(*args: Any, **kw: Any) -> object:
        if len(failed) < times:
            failed.append(1)
            raise RuntimeError("injected")
        return real(*args, **kw)

    return outbox


async def _answered_at_once_then_served(mesh: Mesh) -> None:
    """A gRPC call and an HTTP/2 request, each waiting for a new connection to ``front``'s
    endpoint whose set-up raises: answered at once (not at a timeout: the client gives up
    after 10 s), trailers-only UNAVAILABLE and 503, reported ``UF``, the failure logged once
    each with its cause; the session then serves the next call on a new connection."""
    source, _ = observe(mesh)
    conn, reader, writer = await _client(mesh)
    failed: list[int] = []
    try:
        with (
            error_logs() as errors,
            mock.patch.object(h2outbound_module, "_outbox", _failing_outboxes(2, failed)),
        ):
            answers = await _requests(conn, reader, writer, ["/pkg.Echo/Get", "/plain"])
            assert answers == ["14", "503"]
            assert await _requests(conn, reader, writer, ["/pkg.Echo/Get"]) == ["0"]
    finally:
        writer.close()
    assert failed == [1, 1]
    ours = [e for e in errors if e.name.startswith("agent.")]  # not a far app's lost socket
    assert [str(e.exc_info[1]) for e in ours if e.exc_info] == ["injected"] * 2
    assert len(ours) == 2
    codes = requests_total(source)
    assert codes[("source", FRONT, "503", "UF")] == 1
    assert codes[("source", FRONT, "200", "UF")] == 1  # the gRPC call's trailers-only answer
    assert codes[("source", FRONT, "200", "-")] == 1


@mesh_test
async def test_calls_to_a_same_node_endpoint_whose_setup_raises_are_answered_at_once(
    mesh: Mesh,
) -> None:
    port = _local_front(mesh)
    app = await asyncio.start_server(_recording_app([]), LOCAL, port)
    try:
        await _answered_at_once_then_served(mesh)
    finally:
        app.close()


@mesh_test
async def test_calls_to_a_far_endpoint_whose_setup_raises_are_answered_at_once(
    mesh: Mesh,
) -> None:
    app = await _grpc_front(mesh)
    try:
        await _answered_at_once_then_served(mesh)
    finally:
        app.close()
    # The failed set-ups' streams were reset on the pooled connection, which served on.
    assert len(mesh.node1.pool.connections()) == 1


@mesh_test
async def test_calls_to_an_endpoint_whose_open_raises_unexpectedly_are_answered_at_once(
    mesh: Mesh,
) -> None:
    """Not an OSError nor a refusal (a defect in the open): the call is answered at once,
    UNAVAILABLE ``UF``, logged once with its cause; the next call
    is served."""
    port = _local_front(mesh)
    app = await asyncio.start_server(_recording_app([]), LOCAL, port)
    outbound = mesh.node1.outbound
    real, failed = outbound.open, []

    async def opening(*args: Any, **kw: Any) -> Any:
        if not failed:
            failed.append(1)
            raise RuntimeError("injected")
        return await real(*args, **kw)

    conn, reader, writer = await _client(mesh)
    try:
        with error_logs() as errors, mock.patch.object(outbound, "open", opening):
            assert await _requests(conn, reader, writer, ["/pkg.Echo/Get"]) == ["14"]
            assert await _requests(conn, reader, writer, ["/pkg.Echo/Get"]) == ["0"]
    finally:
        writer.close()
        app.close()
    assert [str(e.exc_info[1]) for e in errors if e.exc_info] == ["injected"]
