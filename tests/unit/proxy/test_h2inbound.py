"""The destination's h2c/gRPC shell with real grpcio peers on loopback (no root, no lab).

A grpcio client's channel goes to a loopback listener whose connections are served by
``H2Session`` (the plaintext path's ``SocketDownstream``), forwarding to a grpcio server of
the lab's echo service: unary and streaming calls, an error status, an L7 DENY on one method
path, what the registry is told, and a server that dies. Each test runs twice: with
``H2Proxy``, and with the frame relay ``H2Relay`` (``--h2-relay``; the loopback client stands for
an HBONE stream, which the relay serves).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections import deque
from collections.abc import Iterator

import grpc
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, HeadersFrame

import agent.proxy.h2inbound as h2inbound
from agent.lab import grpcecho
from agent.policy.authz import Request
from agent.proxy.core import Core, ProxySettings
from agent.proxy.h2inbound import H2Session
from agent.proxy.h2proxy import H2Proxy
from agent.proxy.h2relay import H2Relay
from agent.proxy.http_inbound import SocketDownstream
from agent.proxy.tunnel import Sink
from agent.state import Endpoint, PolicyObject, Service, ServicePort, StateStore
from agent.telemetry.records import INBOUND, ConnectionRecord, RequestRecord
from tests.workloads import workload

SERVER = workload("server", "node1", "10.244.1.3", app="server")
DENY_ADMIN = PolicyObject(
    "AuthorizationPolicy",
    "default",
    "deny-admin",
    {"action": "DENY", "rules": [{"to": [{"operation": {"paths": [grpcecho.ADMIN]}}]}]},
)


TRY_NO_STREAM = PolicyObject(
    "AuthorizationPolicy",
    "default",
    "try-no-stream",
    {"action": "DENY", "rules": [{"to": [{"operation": {"paths": [grpcecho.STREAM]}}]}]},
    dry_run=True,
)


class Seen:
    def __init__(self) -> None:
        self.requests: list[RequestRecord] = []
        self.rejections: list[str] = []
        self.connections: list[ConnectionRecord] = []

    def requested(self, connection: ConnectionRecord, request: RequestRecord) -> None:
        self.requests.append(request)
        self.connections.append(connection)

    def rejected(self, cause: str) -> None:
        self.rejections.append(cause)

    def would_deny(self, policy: str) -> None:
        pass


RELAY = [False]  # the current test's mode (``relay``)


@pytest.fixture(autouse=True, params=[False, True], ids=["proxy", "relay"])
def relay(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    """Serve with ``H2Relay`` (the loopback sockets taken for HBONE streams), or not."""
    if request.param:
        monkeypatch.setattr(h2inbound, "StreamDownstream", SocketDownstream)
    RELAY[0] = request.param
    yield request.param
    RELAY[0] = False


@pytest.fixture
def pod() -> Iterator[tuple[int, grpc.Server]]:
    server, port = grpcecho.serve(0, "pod", workers=4, host="127.0.0.1")
    try:
        yield port, server
    finally:
        server.stop(None).wait()


class HandingDownstream(SocketDownstream):
    """A client socket that hands its bytes to the session as they arrive, as the HBONE
    stream does (``TunnelStream.deliver_directly``): a reader callback offers them to the
    sink, and what it does not take waits for ``read``, in order."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.sink: Sink | None = None
        self.handed = 0  # bytes the sink took from the callback
        self.left: deque[bytes] = deque()
        self.eof = False
        self.readable = asyncio.Event()
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        if not data:
            self.eof = True
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        elif self.sink is not None and not self.left:
            taken = self.sink.send(data)
            self.handed += taken
            data = data[taken:]
        if data:
            self.left.append(data)
        self.readable.set()

    def deliver_to(self, sink: Sink | None) -> None:
        self.sink = sink

    async def read(self) -> bytes | None:
        while not self.left:
            if self.eof:
                return None
            self.readable.clear()
            await self.readable.wait()
        return self.left.popleft()

    def close(self) -> None:
        if not self.eof:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())


async def _proxy(
    core: Core,
    pod_port: int,
    seen: Seen,
    header_timeout: float = 10.0,
    downstreams: list[HandingDownstream] | None = None,
) -> tuple[asyncio.Server, int]:
    """A loopback listener serving each connection with ``H2Session`` to the pod."""
    core.registry.request_observers.append(seen)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client: socket.socket = writer.get_extra_info("socket").dup()
        client.setblocking(False)
        writer.transport.pause_reading()
        try:
            upstream = socket.create_connection(("127.0.0.1", pod_port))
        except OSError:  # the pod is gone: refuse, as the inbound paths do
            client.close()
            writer.close()
            return
        upstream.setblocking(False)
        record = ConnectionRecord(INBOUND, "10.244.2.2:40000", "10.244.1.3:50051")
        request = Request("10.244.2.2", "10.244.1.3", 50051, None)
        down: SocketDownstream = SocketDownstream(client)
        if downstreams is not None:
            down = HandingDownstream(client)
            downstreams.append(down)
        session = H2Session(
            core,
            down,
            upstream,
            record,
            request,
            SERVER,
            header_timeout=header_timeout,
        )
        assert isinstance(session.proxy, H2Relay if RELAY[0] else H2Proxy)
        try:
            await session.serve()
        finally:
            if isinstance(down, HandingDownstream):
                down.close()
            upstream.close()
            client.close()
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _core(*policies: PolicyObject) -> Core:
    store = StateStore()
    with store.update() as txn:
        txn.put_workload(SERVER)
        for p in policies:
            txn.put_policy(p)
    settings = ProxySettings(h2_relay=RELAY[0])
    return Core(node="node1", store=store, identities=None, settings=settings)  # type: ignore[arg-type]


def _calls(port: int) -> list[tuple[str, str]]:
    """On ONE channel: unary, streaming, an error on purpose, the denied method, unary again."""
    out: list[tuple[str, str]] = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        unary = grpcecho.unary_call(channel)
        out.append(("unary", unary(b"hi", timeout=10).decode()))
        stream = grpcecho.stream_call(channel)(b"3", timeout=10)
        out.append(("stream", ",".join(m.decode() for m in stream)))
        for method, payload in ((grpcecho.UNARY, b"fail:x"), (grpcecho.ADMIN, b"a")):
            try:
                grpcecho.unary_call(channel, method)(payload, timeout=10)
            except grpc.RpcError as e:
                out.append((method, f"{e.code().name} {e.details()}"))
        out.append(("unary", unary(b"again", timeout=10).decode()))
    return out


def test_grpc_calls_through_the_proxy_with_a_deny_on_one_method(
    pod: tuple[int, grpc.Server],
) -> None:
    async def main() -> None:
        seen = Seen()
        server, port = await _proxy(_core(DENY_ADMIN, TRY_NO_STREAM), pod[0], seen)
        async with server:
            result = await asyncio.to_thread(_calls, port)
        assert result == [
            ("unary", "pod:hi"),
            ("stream", "pod:0,pod:1,pod:2"),
            (grpcecho.UNARY, "NOT_FOUND asked to fail"),
            (grpcecho.ADMIN, "PERMISSION_DENIED RBAC: access denied"),
            ("unary", "pod:again"),
        ]
        got = [
            (r.path, r.status, r.protocol, r.grpc_status, r.response_flags) for r in seen.requests
        ]
        assert got == [
            (grpcecho.UNARY, 200, "grpc", "0", "-"),
            (grpcecho.STREAM, 200, "grpc", "0", "-"),
            (grpcecho.UNARY, 200, "grpc", "5", "-"),
            (grpcecho.ADMIN, 200, "grpc", "7", "RBAC"),
            (grpcecho.UNARY, 200, "grpc", "0", "-"),
        ]
        # The refusal names its policy; the dry-run DENY's would-deny is on the call it matched
        # (which went through), and no other record carries either.
        why = [(r.policy, r.dry_run_policy) for r in seen.requests]
        assert why == [
            ("", ""),
            ("", "default/try-no-stream:rules[0]"),
            ("", ""),
            ("default/deny-admin:rules[0]", ""),
            ("", ""),
        ]
        assert seen.rejections == []
        # The connection as /connections shows it: HTTP/2 with its five requests, not TCP.
        (connection,) = {id(c): c for c in seen.connections}.values()
        assert (connection.protocol, connection.requests) == ("http/2", 5)

    asyncio.run(main())


def test_bytes_handed_over_as_they_arrive_are_served_like_read_ones(
    pod: tuple[int, grpc.Server],
) -> None:
    """The HBONE stream's way: the client's bytes reach the session from the transport's
    callback (``H2Session.send``), not from a read; the same calls get the same answers, and a
    1 MiB message (beyond the windows the proxy advertises, so the session stops taking bytes
    while the pod's side is busy) arrives whole."""
    big = b"x" * (1 << 20)

    def calls(port: int) -> list[tuple[str, str]]:
        out = _calls(port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = grpcecho.unary_call(channel)(big, timeout=20)
        out.append(("big", f"{len(answer)} {answer.endswith(big)}"))
        return out

    async def main() -> None:
        seen = Seen()
        handing: list[HandingDownstream] = []
        server, port = await _proxy(_core(DENY_ADMIN), pod[0], seen, downstreams=handing)
        async with server:
            result = await asyncio.to_thread(calls, port)
        assert result == [
            ("unary", "pod:hi"),
            ("stream", "pod:0,pod:1,pod:2"),
            (grpcecho.UNARY, "NOT_FOUND asked to fail"),
            (grpcecho.ADMIN, "PERMISSION_DENIED RBAC: access denied"),
            ("unary", "pod:again"),
            ("big", f"{len(big) + 4} True"),
        ]
        assert [(r.grpc_status, r.response_flags) for r in seen.requests] == [
            ("0", "-"),
            ("0", "-"),
            ("5", "-"),
            ("7", "RBAC"),
            ("0", "-"),
            ("0", "-"),
        ]
        assert sum(d.handed for d in handing) > len(big) // 2  # most of it came that way

    asyncio.run(main())


def test_a_pod_that_dies_mid_call_gets_the_call_unavailable_from_the_proxy() -> None:
    async def pod_that_dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Takes the request (preface, SETTINGS, HEADERS, DATA), then drops the connection."""
        got = b""
        while len(got) < 100:  # preface and SETTINGS are 24 + 9..45: a request came too
            got += await reader.read(65536)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()

    def call(port: int) -> str:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                grpcecho.unary_call(channel)(b"x", timeout=10, wait_for_ready=True)
            except grpc.RpcError as e:
                return f"{e.code().name} {e.details()}"
            return "OK"

    async def main() -> None:
        seen = Seen()
        pod = await asyncio.start_server(pod_that_dies, "127.0.0.1", 0)
        server, port = await _proxy(_core(), pod.sockets[0].getsockname()[1], seen)
        async with pod, server:
            result = await asyncio.to_thread(call, port)
        assert result == "UNAVAILABLE upstream connect error or disconnect/reset"
        got = [(r.path, r.status, r.grpc_status, r.response_flags) for r in seen.requests]
        assert got == [(grpcecho.UNARY, 200, "14", "UC")]

    asyncio.run(main())


def test_a_header_block_left_open_is_timed_out(pod: tuple[int, grpc.Server]) -> None:
    async def main() -> None:
        seen = Seen()
        server, port = await _proxy(_core(), pod[0], seen, header_timeout=0.3)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            client = H2Connection(H2Configuration(client_side=True))
            client.initiate_connection()
            block = Encoder().encode([(":method", "GET"), (":path", "/"), (":scheme", "http")])
            frame = HeadersFrame(1, block)  # no END_HEADERS: the block stays open
            writer.write(client.data_to_send() + frame.serialize())
            got = b""
            while chunk := await asyncio.wait_for(reader.read(65536), 5):
                got += chunk  # until the proxy closes the connection
            writer.close()
        events = H2Connection(H2Configuration(client_side=True))
        events.initiate_connection()
        goaway = [e for e in events.receive_data(got) if isinstance(e, ConnectionTerminated)]
        assert [e.error_code for e in goaway] == [ErrorCodes.ENHANCE_YOUR_CALM]
        assert seen.rejections == ["h2_header_timeout"]

    asyncio.run(main())


def test_a_refused_connection_is_logged_with_its_cause_and_the_limit(
    pod: tuple[int, grpc.Server], caplog: pytest.LogCaptureFixture
) -> None:
    """As an HTTP/1.1 refusal's line names what was wrong, an HTTP/2 one names the limit the
    client broke: here 17 CONTINUATION frames in one header block (the limit is 16)."""

    async def main() -> None:
        seen = Seen()
        server, port = await _proxy(_core(), pod[0], seen)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            client = H2Connection(H2Configuration(client_side=True))
            client.initiate_connection()
            block = Encoder().encode([(":method", "GET"), (":path", "/"), (":scheme", "http")])
            flood = b"".join(ContinuationFrame(1, b"").serialize() for _ in range(17))
            writer.write(client.data_to_send() + HeadersFrame(1, block).serialize() + flood)
            while await asyncio.wait_for(reader.read(65536), 5):
                pass  # until the proxy closes the connection
            writer.close()
        assert seen.rejections == ["h2_continuation_flood"]

    with caplog.at_level(logging.INFO, logger="agent.proxy.records"):
        asyncio.run(main())
    (line,) = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert line.startswith("HTTP request rejected (h2_continuation_flood): ")
    assert line.endswith(
        ": h2 continuation flood: 17 CONTINUATION frames in one header block, over the limit of 16"
    )


def test_grpc_calls_over_a_rate_limit_get_resource_exhausted_and_the_channel_goes_on(
    pod: tuple[int, grpc.Server],
) -> None:
    limit = PolicyObject(
        "RateLimitPolicy",
        "default",
        "grpc-limit",
        {
            "targetRef": {"group": "", "kind": "Service", "name": "grpc"},
            "requestsPerSecond": 1,
            "burst": 2,
            "perIdentity": False,
        },
    )
    service = Service(
        "grpc",
        "default",
        ("10.96.0.12",),
        (ServicePort(50051, 50051, "grpc", app_protocol="grpc"),),
        endpoints=(Endpoint("10.244.1.3"),),
    )

    def calls(port: int) -> list[str]:
        out = []
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = grpcecho.unary_call(channel)
            for i in range(4):
                try:
                    out.append(unary(b"%d" % i, timeout=10).decode())
                except grpc.RpcError as e:
                    out.append(f"{e.code().name} {e.details()}")
        return out

    async def main() -> None:
        core = _core(limit)
        with core.store.update() as txn:
            txn.put_service(service)
        core.clock = lambda: 50.0  # no refill during the test
        seen = Seen()
        server, port = await _proxy(core, pod[0], seen)
        async with server:
            result = await asyncio.to_thread(calls, port)
        exhausted = "RESOURCE_EXHAUSTED local_rate_limited"
        assert result == ["pod:0", "pod:1", exhausted, exhausted]
        got = [(r.grpc_status, r.response_flags) for r in seen.requests]
        assert got == [("0", "-"), ("0", "-"), ("8", "RL"), ("8", "RL")]
        assert core.registry.rate_limited == {"grpc.default.svc.cluster.local": 2}

    asyncio.run(main())
