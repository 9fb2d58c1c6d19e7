"""Inbound HBONE streams charged to the process's descriptor budget (``agent.base.conncaps``,
``InboundHbone.count_in``), over real TLS on loopback: node2's 15008 behind an accept loop with
its gate, as the agent runs it, under a cap of 5 connections (10 descriptors). Streams past the
budget are answered 503 and counted as ``global_stream_limit`` while the others keep echoing
and their connections keep serving; every way a stream ends gives its descriptor back once."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import h2.connection
import h2.events
import pytest

from agent.acceptor import accept_forever, serve_accepted
from agent.base.conncaps import GLOBAL_LIMIT, STREAM_LIMIT, ConnectionCaps
from agent.base.constants import Listener
from agent.config import AgentConfig
from agent.proxy import h2outbound as h2outbound_module
from agent.proxy import inbound as inbound_module
from agent.proxy import sockets
from agent.state import Endpoint, PolicyObject, Service, ServicePort
from agent.state.protocols import HTTP
from tests.integration.proxy.mesh import (
    CLIENT,
    LOCAL,
    SERVER,
    Mesh,
    free_port,
    listener,
    mesh_test,
    set_policies,
)
from tests.integration.proxy.test_h2_outbound_loopback import (
    _client,
    _front,
    _local_front,
    _recording_app,
    _requests,
)
from tests.integration.proxy.test_hbone_bad_input import h2_session
from tests.integration.proxy.test_hbone_limits_loopback import error_logs

pytestmark = pytest.mark.root

CAP = 5  # connections: 10 descriptors, for the 15008 connections (1 each) and streams (1 each)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):  # a stream reset resets the pod's socket
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


class Client:
    """An HBONE client connection of streams, each a CONNECT to a pod port, read by a task."""

    def __init__(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], h2c: object):
        self.reader, self.writer = conn
        assert isinstance(h2c, h2.connection.H2Connection)
        self.h2c = h2c
        self.sid = 1
        self.status: dict[int, asyncio.Future[int]] = {}
        self.data: dict[int, bytearray] = {}
        self.ended: dict[int, asyncio.Event] = {}
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await self.reader.read(65536):
                for e in self.h2c.receive_data(data):
                    sid = getattr(e, "stream_id", 0)
                    if isinstance(e, h2.events.ResponseReceived):
                        self.status[sid].set_result(int(dict(e.headers)[b":status"]))
                    elif isinstance(e, h2.events.DataReceived):
                        self.data[sid] += e.data
                        self.h2c.acknowledge_received_data(e.flow_controlled_length, sid)
                    elif isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)):
                        self.ended[sid].set()
                        if not self.status[sid].done():
                            self.status[sid].set_result(0)
                self.changed.set()
                self.flush()

    def flush(self) -> None:
        self.writer.write(self.h2c.data_to_send())

    async def open(self, port: int) -> tuple[int, int]:
        """A stream to the server pod's ``port``: its id and the status it was answered."""
        sid, self.sid = self.sid, self.sid + 2
        self.status[sid] = asyncio.get_running_loop().create_future()
        self.data[sid], self.ended[sid] = bytearray(), asyncio.Event()
        self.h2c.send_headers(sid, [(":method", "CONNECT"), (":authority", f"{SERVER}:{port}")])
        self.flush()
        return sid, await asyncio.wait_for(self.status[sid], 10)

    async def echoes(self, sid: int, payload: bytes) -> bool:
        self.data[sid].clear()
        self.h2c.send_data(sid, payload)
        self.flush()
        for _ in range(100):
            if bytes(self.data[sid]) == payload:
                return True
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 0.1)
        return False

    async def end(self, sid: int) -> None:
        """END_STREAM from us; the pod's echo ends its side too."""
        self.h2c.end_stream(sid)
        self.flush()
        await asyncio.wait_for(self.ended[sid].wait(), 10)

    def reset(self, sid: int) -> None:
        self.h2c.reset_stream(sid)
        self.flush()

    async def close(self) -> None:
        self.writer.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def gated_hbone(mesh: Mesh) -> tuple[ConnectionCaps, int]:
    """node2's HBONE handler behind an accept loop with its gate (``Agent._accept_loop``), on
    a port of the server pod's address, its caps as ``wiring`` makes them for a node proxy."""
    config = AgentConfig(node="node2", pin_dir=Path("/nonexistent"), max_connections=CAP)
    from agent.wiring import connection_caps  # raises this process's soft limit, as the agent

    caps = connection_caps(config, passthrough=False)
    caps.reject = mesh.node2.core.registry.reject
    mesh.node2.inbound.count_in(caps)
    sock = listener(SERVER)
    mesh._sockets.append(sock)
    gate = caps.gate(Listener.HBONE)
    held: set[asyncio.Future[None]] = set()

    async def handle(conn: socket.socket, _slot: Listener) -> None:
        sockets.accepted(conn)
        await mesh.node2.inbound.handle(conn)

    def serve(conn: socket.socket) -> None:
        task = asyncio.create_task(serve_accepted(handle, conn, Listener.HBONE, held, gate))
        mesh._tasks.append(task)

    loop = accept_forever(sock, serve, listener="HBONE", gate=gate)
    mesh._tasks.append(asyncio.create_task(loop))
    return caps, int(sock.getsockname()[1])


async def connect(mesh: Mesh, port: int) -> Client:
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((CLIENT, 0))
    await asyncio.get_running_loop().sock_connect(sock, (SERVER, port))
    return Client(*await h2_session(mesh, sock=sock))


async def until(check: Callable[[], bool]) -> bool:
    for _ in range(500):
        if check():
            return True
        await asyncio.sleep(0.02)
    return check()


@mesh_test
async def test_streams_past_the_budget_get_503_and_are_served_again_once_others_end(
    mesh: Mesh,
) -> None:
    caps, hbone = await gated_hbone(mesh)
    app = mesh.app(SERVER, _echo)
    rejections = mesh.node2.core.registry.rejections
    with error_logs() as errors:
        a, b, c = [await connect(mesh, hbone) for _ in range(3)]  # 3 descriptors
        streams = {a: [], b: [], c: []}
        for client, n in ((a, 3), (b, 3), (c, 1)):  # 7 descriptors
            for _ in range(n):
                sid, status = await client.open(app)
                assert status == 200
                streams[client].append(sid)
        assert (caps.used, caps.held, caps.streams) == (10, 3, 7)
        # The budget is full: the next stream on any connection is refused, and counted.
        assert (await c.open(app))[1] == 503
        assert (await a.open(app))[1] == 503
        assert rejections[STREAM_LIMIT] == 2
        # The connections keep serving: every earlier stream still echoes.
        for client, sids in streams.items():
            for sid in sids:
                assert await client.echoes(sid, b"still here %d" % sid)
        # A new connection is refused at accept (its own descriptor has no room either).
        with pytest.raises(OSError):
            extra = await connect(mesh, hbone)
            await asyncio.wait_for(extra.open(app), 5)
        assert rejections[GLOBAL_LIMIT] == 1
        # Two streams end cleanly: two new ones are served, on the connection that was refused.
        for sid in streams[a][:2]:
            await a.end(sid)
        assert await until(lambda: caps.streams == 5)
        for _ in range(2):
            sid, status = await c.open(app)
            assert status == 200 and await c.echoes(sid, b"again")
        assert (await b.open(app))[1] == 503
        assert rejections[STREAM_LIMIT] == 3
        for client in (a, b, c):
            await client.close()
        # Every stream and connection gave its descriptors back, once.
        assert await until(lambda: (caps.used, caps.held, caps.streams) == (0, 0, 0))
    assert errors == []


@mesh_test
async def test_every_way_a_stream_ends_gives_its_descriptor_back(mesh: Mesh) -> None:
    caps, hbone = await gated_hbone(mesh)
    app = mesh.app(SERVER, _echo)
    stuck = listener(SERVER)  # backlog filled below: further SYNs are dropped, connects hang
    stuck.listen(0)
    filler = socket.create_connection(stuck.getsockname())
    with error_logs() as errors:
        try:
            client = await connect(mesh, hbone)
            # The connect fails: 503, the pod unreachable.
            assert (await client.open(9))[1] == 503
            assert mesh.node2.core.registry.rejections["upstream_unreachable"] == 1
            assert caps.streams == 0
            # The client resets the stream while the pod is being dialled (its task cancelled).
            sid = client.sid
            opening = asyncio.create_task(client.open(stuck.getsockname()[1]))
            assert await until(lambda: caps.streams == 1)
            client.reset(sid)
            assert await until(lambda: caps.streams == 0)
            opening.cancel()
            # The client resets a relayed stream; a relayed stream ends cleanly.
            for end in ("reset", "end"):
                sid, status = await client.open(app)
                assert status == 200 and await client.echoes(sid, b"x")
                assert caps.streams == 1
                if end == "reset":
                    client.reset(sid)
                else:
                    await client.end(sid)
                assert await until(lambda: caps.streams == 0)
            # Policy closes relayed streams.
            sids = [(await client.open(app))[0] for _ in range(3)]
            assert caps.streams == 3
            deny = {"action": "DENY", "rules": [{}]}
            set_policies(mesh.store, PolicyObject("AuthorizationPolicy", "default", "p", deny))
            assert await until(lambda: all(client.ended[s].is_set() for s in sids))
            assert await until(lambda: caps.streams == 0)
            # Policy changes while the pod is dialled: the stream is answered 401, its socket
            # closed unused (``InboundHbone._still_allowed``).
            set_policies(mesh.store)
            dial = sockets.connect

            async def deny_while_dialling(address: tuple[str, int], **kw: Any) -> socket.socket:
                set_policies(mesh.store, PolicyObject("AuthorizationPolicy", "default", "p", deny))
                return await dial(address, **kw)

            sockets.connect = deny_while_dialling  # type: ignore[assignment]
            try:
                assert (await client.open(app))[1] == 401
            finally:
                sockets.connect = dial  # type: ignore[assignment]
            assert caps.streams == 0
            set_policies(mesh.store)
            # The drain: the connection cut with its streams open.
            sids = [(await client.open(app))[0] for _ in range(3)]
            assert caps.streams == 3 and caps.used == 4
            mesh.node2.begin_drain()
            mesh.node2.close()
            assert await until(lambda: (caps.used, caps.held, caps.streams) == (0, 0, 0))
            await client.close()
        finally:
            filler.close()
            stuck.close()
    assert errors == []


@mesh_test
async def test_an_h2_source_sessions_same_node_socket_is_charged_and_refused_when_full(
    mesh: Mesh,
) -> None:
    """A gRPC client connection to a Service whose endpoint is on its own node: the session's
    socket to the pod takes a descriptor (a tunnel would not: it is a pooled connection's
    stream). With none left its calls are answered UNAVAILABLE (503 ``UO``) and counted, the
    connection serves on, and once there is room the next call opens the socket; it is given
    back when the connection ends."""
    caps = ConnectionCaps(1, {})  # 2 descriptors
    caps.reject = mesh.node1.core.registry.reject
    mesh.node1.count_in(caps)
    gate = caps.gate(Listener.OUTBOUND)
    assert gate.admit("10.0.0.9")  # another connection holds both
    port = _local_front(mesh)
    received: list[str] = []
    app = await asyncio.start_server(_recording_app(received), LOCAL, port)
    try:
        conn, reader, writer = await _client(mesh)
        assert await _requests(conn, reader, writer, ["/pkg.Echo/Get"] * 2) == ["14", "14"]
        assert mesh.node1.core.registry.rejections[STREAM_LIMIT] == 2
        assert received == [] and caps.streams == 0
        gate.release("10.0.0.9")
        assert await _requests(conn, reader, writer, ["/pkg.Echo/Get"] * 3) == ["0"] * 3
        assert received == ["/pkg.Echo/Get"] * 3
        assert (caps.streams, caps.used) == (1, 1)  # one socket for the three calls
        writer.close()
        assert await until(lambda: caps.used == 0)
    finally:
        app.close()


async def _http_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):  # EOF: done
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
    writer.close()


@mesh_test
async def test_a_stream_to_a_port_declared_http_gives_its_descriptor_back_when_it_ends(
    mesh: Mesh,
) -> None:
    """A port declared HTTP is served by the inbound HTTP session, not the TCP relay: its
    stream's pod socket is given back when the session ends."""
    caps, hbone = await gated_hbone(mesh)
    port = mesh.app(SERVER, _http_ok)
    with mesh.store.update() as tx:
        http = ServicePort(80, port, name="http", app_protocol="http")
        web = Service(
            "web", "default", ("10.96.7.5",), (http,), {"app": "server"}, (Endpoint(SERVER),)
        )
        tx.put_service(web)
    assert mesh.node2.core.protocol(mesh.store.snapshot(), SERVER, port) == HTTP
    with error_logs() as errors:
        client = await connect(mesh, hbone)
        for _ in range(2):
            sid, status = await client.open(port)
            assert status == 200 and caps.streams == 1
            client.h2c.send_data(sid, b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
            client.flush()
            assert await until(lambda sid=sid: client.data[sid].endswith(b"\r\n\r\nok"))
            await client.end(sid)
            assert await until(lambda: caps.streams == 0)
        await client.close()
        assert await until(lambda: caps.used == 0)
    assert errors == []


def _injected(*_args: object, **_kw: object) -> None:
    raise RuntimeError("injected")


@mesh_test
async def test_a_stream_that_fails_before_its_relay_owns_the_pod_socket_gives_it_back_once(
    mesh: Mesh,
) -> None:
    """Whatever raises after the pod was dialled and before the relay owns its socket (the
    registry's note of what was authorized, the relay's start), the socket is aborted and its
    descriptor given back exactly once (a second give-back raises and would be logged), the
    stream is reset, and the connection serves its next stream."""
    caps, hbone = await gated_hbone(mesh)
    app = mesh.app(SERVER, _echo)
    registry = mesh.node2.core.registry
    dial, dialled = sockets.connect, []

    async def noting(address: tuple[str, int], **kw: Any) -> socket.socket:
        dialled.append(sock := await dial(address, **kw))
        return sock

    client = await connect(mesh, hbone)
    sockets.connect = noting  # type: ignore[assignment]
    try:
        for owner, name in ((registry, "authorized"), (inbound_module, "start_tunnel")):
            with error_logs() as errors, mock.patch.object(owner, name, _injected):
                sid, _ = await client.open(app)
                await asyncio.wait_for(client.ended[sid].wait(), 10)
                assert await until(lambda: caps.streams == 0)
            assert dialled[-1].fileno() == -1  # closed
            assert (caps.used, caps.held, caps.streams) == (1, 1, 0)
            assert len(registry) == 0
            # The handler's failure is logged (the injected error), no double give-back.
            assert [str(e.exc_info[1]) for e in errors if e.exc_info] == ["injected"]
            sid, status = await client.open(app)
            assert status == 200 and await client.echoes(sid, b"served on")
            await client.end(sid)
            assert await until(lambda: caps.streams == 0)
    finally:
        sockets.connect = dial  # type: ignore[assignment]
    await client.close()
    assert await until(lambda: (caps.used, caps.held, caps.streams) == (0, 0, 0))


@mesh_test
async def test_an_h2_source_socket_whose_setup_fails_after_the_connect_is_given_back_at_once(
    mesh: Mesh,
) -> None:
    """A same-node endpoint's socket, connected, whose session set-up then raises: closed and
    its descriptor given back then, not held until the client connection ends."""
    caps = ConnectionCaps(2, {})
    caps.reject = mesh.node1.core.registry.reject
    mesh.node1.count_in(caps)
    port = _local_front(mesh)
    app = await asyncio.start_server(_recording_app([]), LOCAL, port)
    try:
        conn, reader, writer = await _client(mesh)
        failed = []

        def failing(*_args: object, **_kw: object) -> None:
            failed.append(caps.streams)
            raise RuntimeError("injected")

        with mock.patch.object(h2outbound_module, "_outbox", failing):
            call = asyncio.create_task(_requests(conn, reader, writer, ["/pkg.Echo/Get"]))
            assert await until(lambda: bool(failed))
            assert failed == [1]  # the socket was charged
            assert await until(lambda: caps.streams == 0)
            # Its call answered at once (UNAVAILABLE), the client's connection still open.
            assert await asyncio.wait_for(call, 10) == ["14"]
            assert not reader.at_eof()
        writer.close()
        assert caps.used == 0
    finally:
        app.close()


@mesh_test
async def test_h2_calls_go_to_endpoints_that_need_no_new_socket_while_the_budget_is_full(
    mesh: Mesh,
) -> None:
    """``front``: a far endpoint and a same-node one, round robin. With room the calls
    alternate between them (the balancer's choice, unchanged). With the budget full, a session
    whose same-node socket is open keeps using both (that socket costs nothing more), and a
    new session sends every call to the far endpoint (a stream of a pooled HBONE connection)
    instead of answering the same-node ones 503 ``UO``."""
    port = free_port(SERVER)
    _front(mesh, port, SERVER, LOCAL)
    caps = ConnectionCaps(2, {})  # 4 descriptors
    caps.reject = mesh.node1.core.registry.reject
    mesh.node1.count_in(caps)
    gate = caps.gate(Listener.OUTBOUND)
    assert gate.admit("10.0.0.9")  # another connection holds 2
    far: list[str] = []
    near: list[str] = []
    apps = [await asyncio.start_server(_recording_app(far), SERVER, port),
            await asyncio.start_server(_recording_app(near), LOCAL, port)]  # fmt: skip
    calls = ["/pkg.Echo/Get"] * 4
    try:
        first = await _client(mesh)
        assert await _requests(*first, calls) == ["0"] * 4
        assert (len(far), len(near), caps.streams) == (2, 2, 1)  # alternating; 3 used
        assert caps.take_stream("test")  # the last descriptor: the budget is full
        assert await _requests(*first, calls) == ["0"] * 4
        assert (len(far), len(near)) == (4, 4)  # its open socket still serves
        second = await _client(mesh)
        assert await _requests(*second, calls) == ["0"] * 4
        assert (len(far), len(near)) == (8, 4)  # no new socket: all far
        assert mesh.node1.core.registry.rejections[STREAM_LIMIT] == 0
        caps.release_stream()
        for _, _, writer in (first, second):
            writer.close()
        gate.release("10.0.0.9")
        assert await until(lambda: caps.used == 0)
    finally:
        for app in apps:
            app.close()
