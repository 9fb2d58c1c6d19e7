"""The asyncio shell of the destination's HTTP/1.1 layer over socket pairs (plaintext path)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest

from agent.policy.authz import Request
from agent.proxy import http_inbound
from agent.proxy.core import Core
from agent.proxy.http1 import RequestHead, Verdict
from agent.proxy.http_inbound import HttpSession, SocketDownstream, StreamDownstream
from agent.proxy.tunnel import Sink
from agent.state import Endpoint, PolicyObject, Service, ServicePort, StateStore
from agent.telemetry.records import INBOUND, ConnectionRecord, RequestRecord
from tests.unit.proxy.test_tunnel_direct import tunnel
from tests.workloads import workload

SERVER = workload("server", "node1", "10.244.1.3", app="server")


class Seen:
    def __init__(self) -> None:
        self.requests: list[RequestRecord] = []
        self.rejections: list[str] = []
        self.would_deny_policies: list[str] = []
        self.sockets: list[socket.socket] = []  # the proxy's ends, closed by the test

    def requested(self, connection: ConnectionRecord, request: RequestRecord) -> None:
        self.requests.append(request)

    def rejected(self, cause: str) -> None:
        self.rejections.append(cause)

    def would_deny(self, policy: str) -> None:
        self.would_deny_policies.append(policy)


def _core(*policies: PolicyObject) -> Core:
    store = StateStore()
    with store.update() as txn:
        txn.put_workload(SERVER)
        for p in policies:
            txn.put_policy(p)
    return Core(node="node1", store=store, identities=None)  # type: ignore[arg-type]


DENY_ADMIN_POSTS = PolicyObject(
    "AuthorizationPolicy",
    "default",
    "deny-admin-posts",
    {
        "action": "DENY",
        "rules": [{"to": [{"operation": {"methods": ["POST"], "paths": ["/admin*"]}}]}],
    },
)


async def _session(
    core: Core, header_timeout: float = 5.0
) -> tuple[socket.socket, socket.socket, asyncio.Task[None], Seen]:
    """(client end, pod end, the serving task, what the registry was told)."""
    client, down = socket.socketpair()
    up, pod = socket.socketpair()
    for s in (client, down, up, pod):
        s.setblocking(False)
    seen = Seen()
    seen.sockets = [down, up]
    core.registry.request_observers.append(seen)
    record = ConnectionRecord(INBOUND, "10.244.2.2:40000", "10.244.1.3:8080")
    request = Request("10.244.2.2", "10.244.1.3", 8080, None)
    session = HttpSession(
        core, SocketDownstream(down), up, record, request, SERVER, header_timeout=header_timeout
    )
    return client, pod, asyncio.create_task(session.serve()), seen


async def _read_until(sock: socket.socket, done: Callable[[bytes], bool]) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while not done(data):
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
        if not chunk:
            break
        data += chunk
    return data


def _run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())  # type: ignore[arg-type]


def test_keep_alive_with_a_denied_request_in_the_middle() -> None:
    async def main() -> None:
        client, pod, task, seen = await _session(_core(DENY_ADMIN_POSTS))
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"GET /a HTTP/1.1\r\nHost: s\r\n\r\n")
        head = await _read_until(pod, lambda d: d.endswith(b"\r\n\r\n"))
        assert head.startswith(b"GET /a HTTP/1.1\r\nhost: s\r\nx-request-id: ")
        await loop.sock_sendall(pod, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
        assert await _read_until(client, lambda d: d.endswith(b"a")) == (
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"
        )
        await loop.sock_sendall(
            client, b"POST /admin/x HTTP/1.1\r\nHost: s\r\nContent-Length: 2\r\n\r\nhi"
        )
        denied = await _read_until(client, lambda d: d.endswith(b"RBAC: access denied"))
        assert denied.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        await loop.sock_sendall(client, b"GET /b HTTP/1.1\r\nHost: s\r\n\r\n")
        head = await _read_until(pod, lambda d: d.endswith(b"\r\n\r\n"))
        assert head.startswith(b"GET /b HTTP/1.1\r\n")  # the POST never reached the pod
        await loop.sock_sendall(pod, b"HTTP/1.1 204 No Content\r\n\r\n")
        await _read_until(client, lambda d: d.endswith(b"\r\n\r\n"))
        client.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(task, 5)
        assert [(r.method, r.path, r.status, r.response_flags) for r in seen.requests] == [
            ("GET", "/a", 200, "-"),
            ("POST", "/admin/x", 403, "RBAC"),
            ("GET", "/b", 204, "-"),
        ]
        for s in (client, pod, *seen.sockets):
            s.close()

    _run(main)


def test_a_head_that_trickles_past_the_header_timeout_gets_408() -> None:
    async def main() -> None:
        client, pod, task, seen = await _session(_core(), header_timeout=0.3)
        loop = asyncio.get_running_loop()
        for piece in (b"GET / HT", b"TP/1.1\r\n", b"Host: s\r\n"):
            await loop.sock_sendall(client, piece)  # each byte is in time; the head is not
            await asyncio.sleep(0.15)
        out = await _read_until(client, lambda d: False)
        assert out.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        await asyncio.wait_for(task, 5)
        assert seen.rejections == ["header_timeout"]
        pod.setblocking(False)
        with pytest.raises(BlockingIOError):
            pod.recv(1)  # nothing reached the pod
        for s in (client, pod, *seen.sockets):
            s.close()

    _run(main)


def test_an_upgrade_becomes_an_opaque_relay() -> None:
    async def main() -> None:
        client, pod, task, seen = await _session(_core())
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(
            client,
            b"GET /ws HTTP/1.1\r\nHost: s\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        await _read_until(pod, lambda d: d.endswith(b"\r\n\r\n"))
        await loop.sock_sendall(
            pod,
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n",
        )
        await _read_until(client, lambda d: d.endswith(b"\r\n\r\n"))
        await loop.sock_sendall(client, b"\x81\x02hi not http")
        assert await _read_until(pod, lambda d: d.endswith(b"not http")) == b"\x81\x02hi not http"
        await loop.sock_sendall(pod, b"\x81\x03yes")
        assert await _read_until(client, lambda d: d.endswith(b"yes")) == b"\x81\x03yes"
        client.shutdown(socket.SHUT_WR)
        pod.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(task, 5)
        for s in (client, pod, *seen.sockets):
            s.close()

    _run(main)


DRY_RUN_TOKEN_DENY = PolicyObject(
    "AuthorizationPolicy",
    "default",
    "deny-tokens",
    {
        "action": "DENY",
        "rules": [{"when": [{"key": "request.headers[x-token]", "values": ["*"]}]}],
    },
    dry_run=True,
)
TOKEN_DENY = replace(DRY_RUN_TOKEN_DENY, name="deny-tokens-now", dry_run=False)


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_header_condition_per_request_enforced_or_dry_run(dry_run: bool) -> None:
    """On one keep-alive connection only the request with the header is denied; as a dry-run
    policy it passes and is reported as what the policy would have denied."""

    async def main() -> None:
        policy = DRY_RUN_TOKEN_DENY if dry_run else TOKEN_DENY
        client, pod, task, seen = await _session(_core(policy))
        loop = asyncio.get_running_loop()
        for head in (
            b"GET /a HTTP/1.1\r\nHost: s\r\n",
            b"GET /t HTTP/1.1\r\nHost: s\r\nX-Token: 1\r\n",
        ):
            await loop.sock_sendall(client, head + b"\r\n")
            if dry_run or b"X-Token" not in head:
                await _read_until(pod, lambda d: d.endswith(b"\r\n\r\n"))
                await loop.sock_sendall(pod, b"HTTP/1.1 204 No Content\r\n\r\n")
                await _read_until(client, lambda d: d.endswith(b"\r\n\r\n"))
            else:
                await _read_until(client, lambda d: d.endswith(b"RBAC: access denied"))
        client.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(task, 5)
        statuses = [(r.path, r.status) for r in seen.requests]
        if dry_run:
            assert statuses == [("/a", 204), ("/t", 204)]
            assert seen.would_deny_policies == ["default/deny-tokens"]
        else:
            assert statuses == [("/a", 204), ("/t", 403)]
            assert seen.would_deny_policies == []
        for s in (client, pod, *seen.sockets):
            s.close()

    _run(main)


def test_pipelined_requests_are_forwarded_in_turn_and_reading_resumes() -> None:
    async def main() -> None:
        client, pod, task, seen = await _session(_core())
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(
            client, b"GET /1 HTTP/1.1\r\nHost: s\r\n\r\nGET /2 HTTP/1.1\r\nHost: s\r\n\r\n"
        )
        first = await _read_until(pod, lambda d: d.endswith(b"\r\n\r\n"))
        assert first.startswith(b"GET /1 ") and b"GET /2" not in first  # /2 waits its turn
        await loop.sock_sendall(pod, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
        second = await _read_until(pod, lambda d: d.endswith(b"\r\n\r\n"))
        assert second.startswith(b"GET /2 ")
        await loop.sock_sendall(pod, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
        # The client's reads, paused while /2 waited, resumed: a third request gets through.
        await loop.sock_sendall(client, b"GET /3 HTTP/1.1\r\nHost: s\r\n\r\n")
        third = await _read_until(pod, lambda d: d.endswith(b"\r\n\r\n"))
        assert third.startswith(b"GET /3 ")
        await loop.sock_sendall(pod, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n3")
        out = await _read_until(client, lambda d: d.endswith(b"3"))
        assert out.count(b"HTTP/1.1 200 OK") == 3
        client.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(task, 5)
        assert [r.path for r in seen.requests] == ["/1", "/2", "/3"]
        for s in (client, pod, *seen.sockets):
            s.close()

    _run(main)


def test_a_client_that_does_not_read_stops_the_reads_from_the_pod_and_loses_nothing() -> None:
    async def main() -> None:
        client, pod, task, seen = await _session(_core())
        loop = asyncio.get_running_loop()
        for s in (client, pod):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        await loop.sock_sendall(client, b"GET /big HTTP/1.1\r\nHost: s\r\n\r\n")
        await _read_until(pod, lambda d: d.endswith(b"\r\n\r\n"))
        size = 8 * 1024 * 1024
        body = bytes(range(256)) * (size // 256)
        pod.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        sent = 0
        while sent < size:  # the client reads nothing: the pod's writes must come to block
            try:
                sent += pod.send(body[sent : sent + 65536])
            except BlockingIOError:
                break
            await asyncio.sleep(0)
        assert sent < size
        rest = loop.create_task(loop.sock_sendall(pod, body[sent:]))
        out = await _read_until(client, lambda d: len(d) >= size and d.endswith(body[-16:]))
        await rest
        assert out.split(b"\r\n\r\n", 1)[1] == body
        client.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(task, 5)
        assert [(r.path, r.response_bytes) for r in seen.requests] == [("/big", size)]
        for s in (client, pod, *seen.sockets):
            s.close()

    _run(main)


class DirectDownstream:
    """A downstream that hands bytes to the session's ``Sink`` as an HBONE stream does."""

    from_peer = True

    def __init__(self) -> None:
        self.sink: Sink | None = None
        self.queued: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.written = bytearray()
        self.ended = False
        self.relayed = False

    def arrive(self, data: bytes) -> None:
        taken = self.sink.send(data) if self.sink is not None else 0
        if taken < len(data):
            self.queued.put_nowait(data[taken:])

    async def read(self) -> bytes | None:
        return await self.queued.get()

    def deliver_to(self, sink: Sink | None) -> None:
        self.sink = sink

    def try_write(self, data: bytes) -> int:
        self.written += data
        return len(data)

    def flushed(self) -> bool:
        return True

    async def write(self, data: bytes) -> None:
        self.written += data

    def write_eof(self) -> None:
        self.ended = True

    async def relay(self, upstream: socket.socket, record: ConnectionRecord) -> None:
        self.relayed = True


async def _direct_session(
    core: Core,
) -> tuple[DirectDownstream, socket.socket, socket.socket, asyncio.Task[None], Seen]:
    """(the downstream, the session's pod socket, the pod's end, the serving task, Seen)."""
    seen = Seen()
    core.registry.request_observers.append(seen)
    up, pod = socket.socketpair()
    for s in (up, pod):
        s.setblocking(False)
    down = DirectDownstream()
    record = ConnectionRecord(INBOUND, "10.244.2.2:40000", "10.244.1.3:8080")
    request = Request("10.244.2.2", "10.244.1.3", 8080, None)
    session = HttpSession(core, down, up, record, request, SERVER)
    task = asyncio.create_task(session.serve())
    while down.sink is None:
        await asyncio.sleep(0)
    return down, up, pod, task, seen


def test_bytes_handed_over_as_they_arrive_are_served_and_wait_behind_a_pending_exchange() -> None:
    async def main() -> None:
        down, up, pod, task, seen = await _direct_session(_core())
        loop = asyncio.get_running_loop()
        down.arrive(b"GET /1 HTTP/1.1\r\nHost: s\r\n\r\nGET /2 HTTP/1.1\r\nHost: s\r\n\r\n")
        assert down.queued.empty()  # the session took both at once
        first = await _read_until(pod, lambda d: d.endswith(b"\r\n\r\n"))
        assert first.startswith(b"GET /1 ") and b"/2" not in first
        down.arrive(b"GET /3 HTTP/1.1\r\nHost: s\r\n\r\n")
        assert not down.queued.empty()  # /2 waits its turn: /3 is left to the session's reads
        await loop.sock_sendall(pod, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
        assert (await _read_until(pod, lambda d: d.endswith(b"\r\n\r\n"))).startswith(b"GET /2 ")
        await loop.sock_sendall(pod, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
        assert (await _read_until(pod, lambda d: d.endswith(b"\r\n\r\n"))).startswith(b"GET /3 ")
        await loop.sock_sendall(pod, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n3")
        down.queued.put_nowait(None)  # the client's end of stream
        await asyncio.wait_for(task, 5)
        assert bytes(down.written).count(b"HTTP/1.1 200 OK") == 3 and down.ended
        assert down.sink is None  # handed back when the session ended
        assert [r.path for r in seen.requests] == ["/1", "/2", "/3"]
        for s in (up, pod):
            s.close()

    _run(main)


def test_a_blocking_socket_is_refused_with_the_fix_named() -> None:
    a, b = socket.socketpair()
    try:
        with pytest.raises(ValueError, match="setblocking"):
            SocketDownstream(a)
    finally:
        a.close()
        b.close()


def test_after_a_101_handed_over_bytes_are_left_for_the_relay_in_order() -> None:
    async def main() -> None:
        down, up, pod, task, _ = await _direct_session(_core())
        loop = asyncio.get_running_loop()
        down.arrive(
            b"GET /ws HTTP/1.1\r\nHost: s\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\nearly"
        )
        await _read_until(pod, lambda d: d.endswith(b"\r\n\r\n"))
        await loop.sock_sendall(
            pod, b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n"
        )
        while not down.written.endswith(b"\r\n\r\n"):
            await asyncio.sleep(0)
        assert down.written.startswith(b"HTTP/1.1 101 ")
        down.arrive(b"later")  # not HTTP any more: the session does not take it
        assert down.queued.get_nowait() == b"later"
        await asyncio.wait_for(task, 5)
        assert down.relayed and not down.ended
        assert await _read_until(pod, lambda d: d.endswith(b"early")) == b"early"
        for s in (up, pod):
            s.close()

    _run(main)


def test_a_rate_limit_policy_answers_429_counts_it_and_keeps_the_connection() -> None:
    limit = PolicyObject(
        "RateLimitPolicy",
        "default",
        "web-limit",
        {
            "targetRef": {"group": "", "kind": "Service", "name": "web"},
            "requestsPerSecond": 1,
            "burst": 2,
            "perIdentity": False,
        },
    )
    web = Service(
        "web",
        "default",
        ("10.96.0.11",),
        (ServicePort(80, 8080),),
        endpoints=(Endpoint("10.244.1.3"),),
    )

    async def main() -> None:
        core = _core(limit)
        with core.store.update() as txn:
            txn.put_service(web)
        now = [100.0]
        core.clock = lambda: now[0]
        client, pod, task, seen = await _session(core)
        loop = asyncio.get_running_loop()
        for i in range(3):
            await loop.sock_sendall(client, b"GET /a HTTP/1.1\r\nHost: s\r\n\r\n")
            if i < 2:  # the burst
                await _read_until(pod, lambda d: d.endswith(b"\r\n\r\n"))
                await loop.sock_sendall(pod, b"HTTP/1.1 204 No Content\r\n\r\n")
                await _read_until(client, lambda d: d.endswith(b"\r\n\r\n"))
            else:
                out = await _read_until(client, lambda d: d.endswith(b"local_rate_limited"))
                assert out.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
        now[0] += 1.0  # one token back
        await loop.sock_sendall(client, b"GET /b HTTP/1.1\r\nHost: s\r\n\r\n")
        head = await _read_until(pod, lambda d: d.endswith(b"\r\n\r\n"))
        assert head.startswith(b"GET /b HTTP/1.1\r\n")
        await loop.sock_sendall(pod, b"HTTP/1.1 204 No Content\r\n\r\n")
        await _read_until(client, lambda d: d.endswith(b"\r\n\r\n"))
        client.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(task, 5)
        assert [(r.path, r.status, r.response_flags) for r in seen.requests] == [
            ("/a", 204, "-"),
            ("/a", 204, "-"),
            ("/a", 429, "RL"),
            ("/b", 204, "-"),
        ]
        assert core.registry.rate_limited == {"web.default.svc.cluster.local": 1}
        for s in (client, pod, *seen.sockets):
            s.close()

    _run(main)


@pytest.mark.parametrize("streams", [1, 2])
def test_a_response_leaves_on_the_hbone_connection_before_its_request_is_reported(
    streams: int,
) -> None:
    """Over an HBONE stream the pod's response goes to the TLS transport before the exchange's
    telemetry runs: in the callback that read it when the stream is the connection's only one,
    else at the end of that pass of the loop, with the reports after it. Before: the stream's
    write scheduled its flush for the loop's next pass (``flush_soon``) and the report ran at
    once, so every response waited for its own request's metrics and access log line."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        client, server = await tunnel()
        if streams == 2:  # another client connection on the same HBONE connection
            await asyncio.wait_for(client.proto.open("10.0.0.2:81", None), 5)
        order: list[str] = []
        proto = server.proto
        assert proto.transport is not None
        real_write = proto.transport.write

        def write(data: bytes | bytearray | memoryview) -> None:
            if b"HTTP/1.1 200 OK" in bytes(data):
                order.append("response written")
            real_write(data)

        proto.transport.write = write  # type: ignore[method-assign]
        core = _core()
        seen = Seen()
        core.registry.request_observers.append(seen)
        reported = seen.requested
        seen.requested = lambda c, r: (order.append("reported"), reported(c, r))  # type: ignore[method-assign]
        up, pod = socket.socketpair()
        for s in (up, pod):
            s.setblocking(False)
        record = ConnectionRecord(INBOUND, "10.244.2.2:40000", "10.244.1.3:8080")
        request = Request("10.244.2.2", "10.244.1.3", 8080, None)
        session = HttpSession(core, StreamDownstream(server), up, record, request, SERVER)
        task = asyncio.create_task(session.serve())
        await client.write(b"GET /a HTTP/1.1\r\nHost: s\r\n\r\n")
        await _read_until(pod, lambda d: d.endswith(b"\r\n\r\n"))
        await loop.sock_sendall(pod, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
        answer = await asyncio.wait_for(client.read(), 5)
        assert answer == b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"
        assert order == ["response written", "reported"]
        assert len(server.proto.streams) == streams
        client.write_eof()
        await asyncio.wait_for(task, 5)
        for s in (up, pod):
            s.close()

    _run(main)


def test_a_pod_no_policy_bears_on_builds_no_authorization_request_per_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Keep-alive requests to a pod no AuthorizationPolicy selects (a plaintext client, not
    STRICT) are admitted without ``request_verdict``'s per-request ``Request``, log text and
    ``Decision`` (``RequestAdmission``, once per state version); a DENY put while the connection
    is open reaches its next request, which is then authorized as before. Before, every request
    went through ``request_verdict`` (now ``http_inbound.authorize``, the policed path)."""
    walked: list[str] = []
    real = http_inbound.authorize

    def counted(
        core: Core, connection: Request, workload: Any, head: RequestHead, *args: Any
    ) -> Verdict:
        walked.append(head.path)
        return real(core, connection, workload, head, *args)

    monkeypatch.setattr(http_inbound, "authorize", counted)

    async def main() -> None:
        core = _core()
        down, up, pod, task, seen = await _direct_session(core)
        loop = asyncio.get_running_loop()

        async def exchange(request: bytes, answered: bool) -> None:
            down.arrive(request)
            if answered:
                await _read_until(pod, lambda d: d.endswith(b"\r\n\r\n"))
                await loop.sock_sendall(pod, b"HTTP/1.1 204 No Content\r\n\r\n")
            while len(seen.requests) < count[0] + 1:
                await asyncio.sleep(0.001)
            count[0] += 1

        count = [0]
        for i in range(5):
            await exchange(b"GET /%d HTTP/1.1\r\nHost: s\r\n\r\n" % i, True)
        assert walked == []
        with core.store.update() as txn:
            txn.put_policy(DENY_ADMIN_POSTS)
        await exchange(b"POST /admin/x HTTP/1.1\r\nHost: s\r\nContent-Length: 0\r\n\r\n", False)
        await exchange(b"GET /5 HTTP/1.1\r\nHost: s\r\n\r\n", True)
        assert walked == ["/admin/x", "/5"]
        assert [(r.path, r.status, r.response_flags) for r in seen.requests] == [
            *((f"/{i}", 204, "-") for i in range(5)),
            ("/admin/x", 403, "RBAC"),
            ("/5", 204, "-"),
        ]
        down.queued.put_nowait(None)
        await asyncio.wait_for(task, 5)
        for s in (up, pod):
            s.close()

    _run(main)
