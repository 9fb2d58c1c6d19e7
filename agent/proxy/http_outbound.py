"""The asyncio shell of the source node's HTTP/1.1 path: a Service VIP port declared HTTP.

The client's connection is terminated here (``http_outbound_codec.SourceHttp1``) and each
request is routed on its own (``http_router.HttpRouter``): the endpoint is chosen per request,
so the requests of one keep-alive connection spread over the Service's endpoints. A request
travels on an *upstream session*: an HBONE stream to the endpoint (mTLS with the source pod's
certificate, ``nodemesh-service`` naming the dialled Service for the far node's labels)
carrying HTTP/1.1, or, for an endpoint on this node, a plain TCP connection made with the
client pod's IP as source (as the L4 same-node path does); an endpoint that is not meshed gets a
plain connection. Sessions are pooled (``http_sessions``: the key, the bounds and the idle
timeout are described there).

One task per client connection stands for it, but a keep-alive request wakes it not at all:
the client socket's reader callback (registered once and kept across requests; it stops
watching only when bytes come that the codec does not want yet, so a slow endpoint still stops
the client's reads) feeds the codec and, when a head is complete, routes it and attaches it to
an idle pooled session right there (``_dispatch_now``). The task is woken only for what has to
wait: a retry's backoff, an injected delay, the ``maxPendingRequests`` queue, a connect, a
pipelined head behind a response, the client's end. An attached HBONE session's response is
handled where it arrives, in the HBONE connection's callback (``deliver_directly``): parsed,
written to the client, the session released, with no task woken per response. Why: once the
codec was llhttp, the event loop's own work (task steps, awaits, a reader registered and
removed per request) was a visible share of the source agent's profile
(docs/performance/http1-cost.md). A reader task for the session is started only when that cannot be
done: a write to either side still waits (then the bytes stay queued in the stream, read in order
with awaited writes, so a slow client stops the endpoint's stream), the stream ended or was reset,
or the session is a socket. Writes go out at once unless an earlier one waits; what a side does not
take waits behind its lock (backpressure both ways), and the client is not read meanwhile.

A connect failure is retried on another endpoint while traffic control allows
(``Attempts``); when none is left the client gets 503 ``UF`` (``UH`` when the Service has no
endpoint), with the connect bounded by the Service's connect timeout, so a request never hangs
on a dead endpoint. After a ``101`` the client connection is pinned to its
upstream session and relayed as opaque bytes.

A route rule (``HttpRouter.admit``) may edit the heads, answer locally (404 ``NR``, 500, a
redirect), time the request (one timer per attached try, the sooner of ``timeouts.request``
and ``backendRequest``; connects and backoffs are cut to the request's deadline) and retry it
(the codec's retry hook asks ``RoutePlan.retry_after``; the request then waits in ``pending``
and ``_dispatch`` sends it again, after the backoff, on a session to another endpoint).

A route's ``RequestMirror`` copies a request, once the client sent all of it, to an endpoint of
the mirror Service (``Host`` suffixed ``-shadow``, as Envoy does) on a session of its own that
is never pooled: the copy is a task of its own (``agent.proxy.http_mirror``: at most
``MAX_MIRRORS`` at a time per node, each ended after ``MIRROR_TIMEOUT``), its response read and
dropped, its failures only counted (``nodemesh_http_mirrored_total``) — the primary request
never waits for it. A request whose
body is larger than the codec's replay limit is not copied (counted ``too_large``).

For a same-node endpoint this node is the only proxy on the path, so it admits each try as
the endpoint's destination would (``http_inbound.RequestAdmission``, kept per endpoint and
snapshot): its L7 policies (403
``RBAC``), then the pod port's RateLimitPolicies from the node's buckets (429 ``RL``
``local_rate_limited``, counted in ``nodemesh_rate_limited_requests_total``), the connection
serving on after either; the far node does that for HBONE sessions. It does so where the far
node would, once the try has its session (pooled, or connected: a try whose connect failed
never met the pod's policy nor spent its token), and a refusal is that try's answer
(``SourceHttp1.answer_try``): a rule that retries its status sends the request again, as it
would a far node's 403 or 429. Requests are reported with ``reporter="source"``
(``Registry.request_done``), labelled with the endpoint that served them, with the source's own
flags only (a same-node refusal's ``RBAC``/``RL``, or the ``UC`` of the 502 answered for a pod
lost before its head, is its destination's, as a far node's 403, 429 or 502 comes to the
source as a plain response); each try a same-node endpoint answered is
reported with ``reporter="destination"`` too, as that pod's proxy would have
(``same_node_destination``), since no other proxy sees it: the last one with the request, one
dropped for a retry when it is (``_report_try``), each from when the try reached the pod (not
a delay injected here). The client connection's ``ConnectionRecord`` keeps the byte
counts for the TCP metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

from agent.policy.authz import Request as AuthzRequest
from agent.policy.routes import HttpRequest
from agent.proxy import sockets
from agent.proxy.balanced import classify
from agent.proxy.http1 import (
    DOWNSTREAM_CLOSED,
    NO_FLAGS,
    UPSTREAM_CLOSED,
    Exchange,
    RequestHead,
    Verdict,
    request_record,
)
from agent.proxy.http_inbound import RequestAdmission
from agent.proxy.http_mirror import MirrorCopies, MirrorTry, service_name
from agent.proxy.http_outbound_codec import (
    DroppedResponse,
    Mirrored,
    SourceHttp1,
    mirror_request,
)
from agent.proxy.http_router import (
    BODIES,
    NO_HEALTHY_UPSTREAM,
    UPSTREAM_CONNECT_FAILURE,
    UPSTREAM_TIMEOUT,
    HttpRouter,
    LocalResponse,
    RoutePlan,
    TextHeaders,
)
from agent.proxy.http_sessions import SessionKey, SessionPool, UpstreamSession
from agent.proxy.httpidle import IdleTimer, ServiceIdleTimeout, closed
from agent.proxy.httpshell import HEADER_TIMEOUT, READ_SIZE, HeadTimer, try_send
from agent.proxy.linger import linger_socket
from agent.proxy.records import cancel_current_task
from agent.proxy.relay import relay_sockets, relay_tunnel
from agent.proxy.resolve import Route, ServiceTarget
from agent.proxy.tunnel import TunnelError, TunnelStream
from agent.state import Snapshot, Workload
from agent.telemetry.records import (
    OUTBOUND,
    SECURITY_MTLS,
    SECURITY_NONE,
    ConnectionRecord,
    RequestRecord,
    same_node_destination,
)

if TYPE_CHECKING:
    from agent.proxy.outbound import Outbound

log = logging.getLogger(__name__)

# A mirror copy to a same-node proxy port is refused as a policy denial is (``_verdict_here``)
_PROXY_PORT = Verdict(False, "proxy_port")


@dataclass(slots=True)
class _Request:
    """The shell's facts of one request, handed back with its finished exchange."""

    plan: RoutePlan | None = None
    route: Route | None = None
    first_byte: float = 0.0
    deadline: float | None = None  # the route's request timeout, as a monotonic time
    backoff: float | None = None  # set when the request waits to be sent again
    # The route of the try that reached its endpoint (attached, or answered by a same-node
    # endpoint's policy): a same-node one makes this node the request's destination too.
    reached: Route | None = None
    sent: float = 0.0  # when that try reached it: its destination's report starts there
    refused: str = ""  # that try's flags when a same-node endpoint refused it (RBAC, RL)
    # That same-node endpoint's admission of the try (``_verdict_here``): the policy that
    # refused it and the dry-run ones that would have, for its destination report.
    verdict: Verdict | None = None
    try_expired: bool = False  # that try ended by its per-try timeout (``backendRequest``)


@dataclass(frozen=True, slots=True)
class _Opening:
    """An endpoint chosen for a request with no idle session to it: one is to be opened."""

    ip: str
    route: Route
    key: SessionKey


@dataclass(frozen=True, slots=True)
class _Endpoint:
    """One endpoint of a backend as this client connection reaches it, in one snapshot: its
    route, the session key, and what ``Outbound.describe_route`` writes into a record for it
    (``path``, ``upstream``, ``identity``). Why: a keep-alive connection's requests go to the
    same few endpoints, and working these out again per request (the endpoint's port, the
    route, the SPIFFE ID, two ``ip:port`` strings) was about 2 % of a Service request."""

    backend: ServiceTarget
    route: Route
    key: SessionKey
    path: str
    upstream: str
    identity: str | None


# Endpoints remembered per client connection and snapshot (``_ClientConnection._endpoint``):
# past it a Service's endpoints are worked out per request, as before (it is a shortcut only).
MAX_CACHED_ENDPOINTS = 64


class _Direct:
    """``Sink`` of the attached HBONE session: hands its bytes to ``_ClientConnection._take``."""

    __slots__ = ("owner", "request", "session")

    def __init__(
        self, owner: _ClientConnection, session: UpstreamSession, request: _Request
    ) -> None:
        self.owner, self.session, self.request = owner, session, request

    def send(self, data: bytes, /) -> int:
        return self.owner._take(self.session, self.request, data)


def _detach(session: UpstreamSession) -> None:
    """No more bytes or ends to the callbacks ``_attach`` set (released, or read by a task)."""
    conn = session.conn
    if isinstance(conn, TunnelStream):
        conn.deliver_directly(None)
        conn.on_end = conn.on_drop = None


class HttpOutbound(MirrorCopies):
    """Serves client connections to Service VIP ports declared HTTP/1.1 (``Outbound.handle``),
    and the copies of ``RequestMirror`` for both HTTP/1.1 and HTTP/2 (``h2outbound``), as
    ``http_mirror.MirrorCopies`` starts them."""

    def __init__(self, outbound: Outbound) -> None:
        self.outbound = outbound
        self.router = HttpRouter(outbound.balanced.traffic)
        self.sessions = SessionPool()
        self.mirroring: set[asyncio.Task[None]] = set()  # copies in flight (RequestMirror)

    async def handle(
        self,
        client: socket.socket,
        source: Workload | None,
        target: ServiceTarget,
        src: str,
    ) -> None:
        core = self.outbound.core
        snap = core.snapshot()
        record = ConnectionRecord(OUTBOUND, src, f"{target.vip}:{target.port.port}")
        if source is not None:
            record.source_identity = core.identity(source, snap)
        record.path = "http"
        record.protocol = "http/1.1"
        conn_id = core.registry.add(record, cancel_current_task())
        conn = _ClientConnection(self, client, source, target, record, conn_id)
        clean = False
        try:
            await conn.serve()
            clean = True
        except (OSError, TunnelError) as e:
            log.debug("outbound HTTP %s -> %s ended: %s", src, record.destination, e)
        finally:
            core.registry.remove(conn_id)
            if clean:
                if conn.refused:  # discard what the client still sends, so the answer arrives
                    await linger_socket(client)
                client.close()
            else:
                sockets.abort(client)


class _ClientConnection:
    def __init__(
        self,
        owner: HttpOutbound,
        client: socket.socket,
        source: Workload | None,
        target: ServiceTarget,
        record: ConnectionRecord,
        conn_id: int,
    ) -> None:
        self.owner = owner
        self.core = owner.outbound.core
        self._store = self.core.store  # its ``snapshot()``: ``Core.snapshot`` is one frame more
        self.client = client
        self.source = source
        self.target = target
        self.record = record
        self.conn_id = conn_id
        self.src_ip = record.source.rsplit(":", 1)[0]
        self.service = service_name(target)
        self.codec: SourceHttp1[_Request] = SourceHttp1(
            max_fields=self.core.settings.max_header_fields
        )
        self.session: UpstreamSession | None = None  # attached to the current request
        self.reader: asyncio.Task[None] | None = None  # reads ``session``
        self.reading = False  # the reader waits in ``session.read`` (safe to cancel there)
        # The client side's park (``_client_bytes``): resolved with the client's bytes, or
        # None when there is something else to do; the client socket's reader is registered
        # (``watching``) only while the codec wants its bytes.
        self._waiter: asyncio.Future[bytes | None] | None = None
        self._loop = asyncio.get_running_loop()  # (each get_running_loop() costs a getpid())
        self._watching = False
        self._head = HeadTimer(self._loop, HEADER_TIMEOUT, self._head_late)
        self._idle = IdleTimer(self._loop, self._idle_expired)  # the Service's idleTimeout
        # A request the reader's callback routed but could not send without waiting: the
        # task resumes it (``_dispatch``): its admission (delay, queue) when ``opening`` is
        # None, else the connect to the endpoint it chose.
        self._resume: tuple[_Request, _Opening | None] | None = None
        # The request ``_attach`` attached whose reader and timer wait for its head's write.
        self._attaching: _Request | None = None
        self.client_gone = False  # a send to the client failed
        self.refused = False  # the codec refused bad input: the close lingers (``linger``)
        self._up_lock = asyncio.Lock()
        self._down_lock = asyncio.Lock()
        # Each lock held (``Lock.locked()``, as plain attributes: asked several times per
        # request, and ``locked`` is a Python frame each time)
        self._up_held = self._down_held = False
        self.timer: asyncio.TimerHandle | None = None  # the attached try's timeout
        self.timed: _Request | None = None  # the request ``timer`` is for
        self._up_backlog = b""  # for ``session``, behind a write still waiting
        self._down_backlog = b""  # for the client, behind a write still waiting
        # flushes a callback (``_take``, a timer) could not finish
        self._later: set[asyncio.Task[None]] = set()
        # Per snapshot: the endpoints this connection's requests went to (``_endpoint``), by
        # (backend, ip) and by their route; the Service's idle timeout (``_idle_timeout``).
        self._snap: Snapshot | None = None
        self._endpoints: dict[tuple[int, str], _Endpoint] = {}
        self._by_route: dict[int, _Endpoint] = {}
        self._labelled: dict[int, tuple[Route, ConnectionRecord]] = {}  # ``_labels``, by route
        self._admissions: dict[int, tuple[Route, RequestAdmission]] = {}  # ``_verdict_here``
        self._service_idle: ServiceIdleTimeout | None = None  # made when first asked

    async def serve(self) -> None:
        """Serve requests until the client or the codec ends it; raises ``OSError`` when the
        client went away mid-response (its socket is then reset, not closed)."""
        try:
            await self._client_side()
            if self.codec.tunnel and self.session is not None:
                await self._relay_upgraded(self.session)
            if self.client_gone:
                raise ConnectionResetError("the client went away")
        finally:
            self._disarm()
            self._idle.cancel()
            reader, session = self.reader, self.session
            for task in [*self._later, *([reader] if reader is not None else [])]:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if session is not None:
                _detach(session)
                if session.reusable is None:
                    session.close()  # cut mid-exchange, or pinned by an upgrade
            for exchange, request in self.codec.take_completed():
                self._report(exchange, request)

    # -- client side -------------------------------------------------------------------------
    async def _client_side(self) -> None:
        codec = self.codec
        while not (codec.closing or codec.tunnel):
            if codec.pending is not None:
                await self._dispatch(codec.pending)
                continue
            try:
                data = await self._client_bytes()
            except TimeoutError:
                codec.header_timeout()
                await self._flush()
                return
            if data is None:
                continue
            self.record.bytes_sent += len(data)
            self._idle.busy()
            codec.receive_client(data)
            await self._flush()

    async def _client_bytes(self) -> bytes | None:
        """The client's end of stream (``b""``), or None when woken for something else (a
        head the reader's callback could not dispatch without waiting, the codec ends);
        raises ``TimeoutError`` when a started head is not complete within
        ``HEADER_TIMEOUT``, and the client's read errors.

        Why the task parks here instead of reading: while it is parked, the client socket's
        reader callback (``_readable``) feeds the codec and dispatches each request head
        itself (``_dispatch_now``) when nothing on the way has to wait, so a keep-alive
        request wakes no task; the reader stays registered across requests."""
        self._waiter = self._loop.create_future()
        try:
            self._changed()
            return await self._waiter
        finally:
            self._waiter = None
            self._unwatch()

    def _changed(self) -> None:
        """The codec's state may have changed: wake the client side when it has something to
        do, watch the client socket while the codec wants its bytes, else keep waiting (the
        reader stays registered: a keep-alive client sends nothing while its response is in
        flight, and ``_readable`` stops watching if it does)."""
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        codec = self.codec
        if codec.closing or codec.tunnel or codec.pending is not None:
            self._unwatch()
            waiter.set_result(None)
        elif codec.wants_client_data():
            self._watch()
            if self._idle.since is None and codec.between_requests:
                self._idle.idle(self._idle_timeout())
        elif self._head.started is not None:  # (``HeadTimer.time`` only when it changes)
            self._head.time(None)

    def _watch(self) -> None:
        if not self._watching:
            self._loop.add_reader(self.client.fileno(), self._readable)
            self._watching = True
        started = self.codec.head_started
        if started != self._head.started:
            self._head.time(started)

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self._loop.remove_reader(self.client.fileno())
        if self._head.started is not None:
            self._head.time(None)

    def _readable(self) -> None:
        """The client's bytes while the task is parked: fed to the codec and flushed here,
        and a complete head dispatched here when it can be without waiting."""
        waiter = self._waiter
        codec = self.codec
        if waiter is None or waiter.done() or self._writing() or not codec.wants_client_data():
            # Bytes the codec does not want yet wait in the kernel, and so do those that come
            # while a write waits (a client that does not read its responses is not read).
            self._unwatch()
            return
        try:
            data = self.client.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._unwatch()
            waiter.set_exception(e)
            return
        if not data:  # the client's end: the task handles it
            self._unwatch()
            waiter.set_result(data)
            return
        self.record.bytes_sent += len(data)
        self._idle.busy()
        try:
            codec.receive_client(data)
            if codec.pending is not None and not (codec.closing or codec.tunnel):
                if self._dispatch_now():
                    return
                self._changed()  # the task routes it
                return
            self._flush_soon()
        except Exception:  # this connection's failure, not the loop's
            log.exception("%s: HTTP client bytes could not be handled", self.record.source)
            codec.closing = True
            self._changed()

    def _idle_timeout(self) -> float | None:
        """The dialled Service's ``connectionPool.idleTimeout`` (its TrafficPolicy, now)."""
        if self._service_idle is None:
            self._service_idle = ServiceIdleTimeout(
                self.owner.router.traffic, self.target.service.key
            )
        return self._service_idle.get(self._store.snapshot())

    def _idle_expired(self) -> None:
        """No request for the Service's idle timeout: close the keep-alive connection (the
        task ends it, cleanly), unless a write to the client still waits."""
        codec = self.codec
        if not codec.between_requests:
            return  # a request began: ``_changed`` times the next idle period
        if self._writing():
            self._idle.again()
            return
        closed(self.core.registry, self._idle.timeout, f"{self.record.source} -> {self.service}")
        codec.closing = True
        self._changed()

    def _head_late(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._unwatch()
            waiter.set_exception(TimeoutError("no complete request head in time"))

    def _writing(self) -> bool:
        """A write to either side waits (its backlog, or a task holding its lock)."""
        return bool(self._up_backlog or self._down_backlog or self._up_held or self._down_held)

    def _flush_now(self) -> bool:
        """Write what the codec produced, settle released sessions, report exchanges, without
        waiting: True when all of it went out. False when a side's bytes wait behind an
        earlier write or for the side to take them (that side's backlog); ``_flush`` then
        writes them awaiting the side's backpressure, and settles the sessions released
        meanwhile only after that, so a session is never pooled with a write in flight."""
        codec = self.codec
        done = True
        data = codec.take_to_upstream()
        if data and self.session is not None:
            done = self._send_upstream_now(self.session, data)
        elif self._up_held or self._up_backlog:
            done = False
        if self._attaching is not None:
            self._watch_session()
        settle = done
        data = codec.take_to_client()
        if data and not self.client_gone:
            done = self._send_client_now(data) and done
        # (each list looked at first: most flushes have none of some, all of others)
        if settle and codec.released:  # after the client's bytes: pooling does not hold them
            for _, reusable in codec.take_released():
                self._release(reusable)
        if codec.completed:
            for exchange, request in codec.take_completed():
                self._report(exchange, request)
        if codec.mirrors:
            for copy in codec.take_mirrors():
                self._mirror(copy)
        if codec.lingers:  # the client may still send a body it was told to wait for
            self.refused = True
        if codec.rejections:
            for cause in codec.take_rejections():
                self.refused = True
                where = f"{self.record.source} -> {self.service}"
                detail = where if codec.refusal is None else f"{where}: {codec.refusal}"
                self.core.registry.http_rejected(cause, detail)
        if done:
            self._changed()
        return done

    def _send_upstream_now(self, session: UpstreamSession, data: bytes) -> bool:
        if self._up_held or self._up_backlog:
            self._up_backlog += data
            return False
        sent = session.try_write(data)
        if sent < len(data):
            self._up_backlog = data[sent:]
            return False
        return True

    def _send_client_now(self, data: bytes) -> bool:
        if self._down_held or self._down_backlog:
            self._down_backlog += data
            return False
        sent = try_send(self.client, data)
        self.record.bytes_received += sent
        if sent < len(data):
            self._down_backlog = data[sent:]
            return False
        return True

    async def _flush(self) -> None:
        """``_flush_now``, then what it left: each side's backlog written under the side's
        lock (awaiting its backpressure; the lock keeps writes in order), the sessions
        released meanwhile settled, and again until nothing is left."""
        codec = self.codec
        while not self._flush_now():
            async with self._up_lock:
                self._up_held = True
                try:
                    data, self._up_backlog = self._up_backlog, b""
                    if data and self.session is not None:
                        try:
                            await self.session.write(data)
                        except (OSError, TunnelError) as e:
                            log.debug("%s: upstream send failed: %r", self.record.source, e)
                            codec.upstream_failed()
                    for _, reusable in codec.take_released():
                        self._release(reusable)
                finally:
                    self._up_held = False
            async with self._down_lock:
                self._down_held = True
                try:
                    data, self._down_backlog = self._down_backlog, b""
                    if data and not self.client_gone:
                        try:
                            await asyncio.get_running_loop().sock_sendall(self.client, data)
                        except OSError as e:  # the client went away: stop serving it
                            log.debug("%s: client send failed: %r", self.record.source, e)
                            self.client_gone = True
                            codec.closing = True
                        else:
                            self.record.bytes_received += len(data)
                finally:
                    self._down_held = False

    def _flush_later(self) -> None:
        """Finish, in a task, a flush a callback began (``_take``, ``_expired``)."""
        task = asyncio.create_task(self._flush(), name=f"http-flush {self.record.source}")
        self._later.add(task)
        task.add_done_callback(self._later_done)

    def _later_done(self, task: asyncio.Task[None]) -> None:
        self._later.discard(task)
        self._reader_done(task)

    def _release(self, reusable: bool) -> None:
        """The current session's exchange ended: pool it (or close it) once its reader stops."""
        session, reader = self.session, self.reader
        if session is None:
            return
        session.reusable = reusable
        self.session, self.reader = None, None
        _detach(session)
        if reader is None or reader.done():
            self._settle(session)
            return
        # A reader waiting for bytes is cancelled; one inside a flush (writing to the client)
        # finishes it and then sees the session is no longer attached.
        if self.reading and reader is not asyncio.current_task():
            reader.cancel()
        reader.add_done_callback(lambda _t: self._settle(session))

    def _settle(self, session: UpstreamSession) -> None:
        if session.reusable:
            self.owner.sessions.put(session)
        else:
            session.close()

    # -- routing -----------------------------------------------------------------------------
    def _dispatch_now(self) -> bool:
        """Route the pending request and attach it to an idle pooled session (or answer it
        here) without waiting, from the client reader's callback; False when something on
        the way has to wait (a retry's backoff, an injected delay, the pending queue, a
        connect): the task does the rest (``_dispatch``, from ``_resume``)."""
        codec = self.codec
        head = codec.pending
        assert head is not None
        request = codec.current_tag
        if request is not None and request.backoff is not None:
            return False
        request = _Request()
        if not self._route(head, request):
            self._flush_soon()
            return True
        plan = request.plan
        assert plan is not None
        if plan.injected_delay or plan.attempts.queued:
            self._resume = (request, None)
            return False
        self._start_clock(request)
        step = self._next_try(head, request, plan)
        if isinstance(step, _Opening):
            self._resume = (request, step)
            return False
        if step is None:
            self._no_endpoint(request, None)
        self._flush_soon()
        return True

    async def _dispatch(self, head: RequestHead) -> None:
        """Route the pending request and attach it to a session, or answer it here; a request
        put back by a retry keeps its plan and waits its backoff first; one the reader's
        callback began goes on where it stopped (``_resume``)."""
        resume, self._resume = self._resume, None
        opening: _Opening | None = None
        if resume is not None:
            request, opening = resume
            if opening is None and not await self._admission(request):
                return
        elif (retried := self.codec.current_tag) is not None and retried.backoff is not None:
            request = retried
            await self._flush()  # settle the session of the try that ended
            if not await self._wait_backoff(request):
                return
        else:
            request = _Request()
            if not self._route(head, request):
                await self._flush()
                return
            if not await self._admission(request):
                return
        assert request.plan is not None
        await self._connect(head, request, request.plan, opening)

    def _flush_soon(self) -> None:
        """A callback's flush: at once, else finished by a task (``_flush_later``)."""
        if not self._flush_now():
            self._flush_later()

    def _route(self, head: RequestHead, request: _Request) -> bool:
        """Route the request (``HttpRouter.admit``) and apply its rule to the codec; False
        when it was answered here (to be flushed)."""
        snap = self._store.snapshot()
        self.record.upstream, self.record.destination_identity = "", None
        source = self.source
        try:
            plan = self.owner.router.admit(
                snap,
                self.target,
                self._http_request,
                self.src_ip,
                source.labels if source is not None else None,
                (self.core.node, None),
                client_namespace=source.namespace if source is not None else "",
                may_queue=True,
            )
        except LocalResponse as e:
            log.debug("%s %s %s: %s", self.record.source, head.method, head.path, e)
            self.codec.respond_locally(e.status, e.flags, e.body, request, e.headers)
            return False
        request.plan = plan
        if plan.edit_request is not None:
            self.codec.edit_pending(plan.edit_request)
        if plan.edit_response is not None:
            self.codec.edit_response(plan.edit_response)
        if plan.retry is not None:
            self.codec.retry_with(lambda status, ok: self._may_retry(request, status, ok))
        if plan.mirrors:
            self.codec.mirror_with()
        return True

    def _http_request(self) -> HttpRequest:
        """The pending request as routes read it: made only when a route may (``admit``)."""
        codec = self.codec
        head = codec.pending
        assert head is not None
        return HttpRequest.from_target(
            head.method, codec.pending_target, TextHeaders(head.headers), authority=head.host
        )

    async def _admission(self, request: _Request) -> bool:
        """What may make a routed request wait before its first try: the injected delay, then
        (queued by ``maxPendingRequests``) a slot; False when it was answered meanwhile."""
        plan = request.plan
        assert plan is not None
        if plan.injected_delay:
            await asyncio.sleep(plan.injected_delay)
        self._start_clock(request)
        return not plan.attempts.queued or await self._admitted(request)

    @staticmethod
    def _start_clock(request: _Request) -> None:
        """The route's request timeout runs from here: an injected delay is not counted."""
        assert request.plan is not None
        if request.plan.request_timeout is not None:
            request.deadline = time.monotonic() + request.plan.request_timeout

    async def _admitted(self, request: _Request) -> bool:
        """The request waits for a slot of its backend's ``maxConnections`` (it was queued:
        ``maxPendingRequests``), at most until its deadline (then 504 ``UT``: False)."""
        assert request.plan is not None
        attempts = request.plan.attempts
        slot = asyncio.get_running_loop().create_future()

        def admitted() -> None:
            if not slot.done():
                slot.set_result(None)

        attempts.on_admitted = admitted
        left = None if request.deadline is None else request.deadline - time.monotonic()
        try:
            await asyncio.wait_for(slot, None if left is None else max(0.0, left))
        except TimeoutError:
            attempts.finish()  # leaves the queue
            return not await self._timed_out(request)
        except asyncio.CancelledError:
            attempts.finish()
            raise
        return True

    def _may_retry(self, request: _Request, status: int | None, replayable: bool) -> bool:
        """The codec's retry hook: the try ended with ``status``; send the request again? A
        same-node pod that closed or reset before its response head (``None``, not the try's
        own timeout) is what its destination proxy, a far node, answers the source for it,
        502: retried only if the rule's codes have it, as that answer would be."""
        assert request.plan is not None
        reached, seen = request.reached, status
        if status is None and not request.try_expired and reached is not None:
            seen = 502 if reached.kind == "local" else None
        backoff = request.plan.retry_after(seen, request.first_byte, replayable=replayable)
        if backoff is None:
            return False
        self._disarm()
        self._report_try(request, status)
        request.backoff, request.first_byte, request.reached = backoff, 0.0, None
        request.refused, request.try_expired, request.verdict = "", False, None
        return True

    def _report_try(self, request: _Request, status: int | None) -> None:
        """A try that reached a same-node endpoint is dropped, to be sent again: reported as
        its destination, which no other proxy is, reports the try it answered (a far node
        reports it there; the source reports the request once, at its end). Its response is
        not read on (its size is not known: 0); a pod that closed or reset before its
        response head is what a destination proxy answers for it (502 ``UC``), a try ended
        by its per-try timeout a client gone (``DC``)."""
        reached, exchange = request.reached, self.codec.current_exchange
        if reached is None or reached.kind != "local" or exchange is None:
            return
        flags = request.refused or NO_FLAGS
        if status is None:
            status, flags = (
                (0, DOWNSTREAM_CLOSED) if request.try_expired else (502, UPSTREAM_CLOSED)
            )
        verdict = request.verdict
        tried = Exchange(
            exchange.head,
            request.sent or exchange.started,
            status,
            exchange.request_bytes,
            flags=flags,
            denied_by=(verdict.reason or None) if verdict is not None else None,
            ended=time.monotonic(),
            dry_run=verdict.dry_run if verdict is not None else "",
        )
        record = request_record(tried, upstream=f"{reached.ip}:{reached.port}")
        self._report_destination(self._labels(reached), reached, record)

    async def _wait_backoff(self, request: _Request) -> bool:
        """Sleep before a retry, within the request's deadline; False when it expired."""
        backoff, request.backoff = request.backoff or 0.0, None
        if request.deadline is not None:
            backoff = min(backoff, max(0.0, request.deadline - time.monotonic()))
        await asyncio.sleep(backoff)
        return not await self._timed_out(request)

    async def _timed_out(self, request: _Request) -> bool:
        """Answer 504 ``UT`` if the request's deadline passed before it was attached."""
        if request.deadline is None or time.monotonic() < request.deadline:
            return False
        self.codec.respond_locally(504, UPSTREAM_TIMEOUT, BODIES[UPSTREAM_TIMEOUT], request)
        await self._flush()
        return True

    def _next_try(
        self, head: RequestHead, request: _Request, plan: RoutePlan
    ) -> _Opening | bool | None:
        """The next endpoint for the request, without waiting: True when it was attached to
        an idle pooled session or answered here (a same-node endpoint's refusal), an
        ``_Opening`` when a session must be opened, None when no endpoint is left."""
        snap = self._store.snapshot()
        attempts = plan.attempts
        ip = attempts.next_endpoint()
        if ip is None:
            return None
        endpoint = self._endpoint(snap, plan.backend, ip)
        route, record = endpoint.route, self.record
        record.path, record.upstream = endpoint.path, endpoint.upstream
        record.destination_identity = endpoint.identity
        request.route, request.reached = route, None
        if route.kind == "local" and route.port in self.core.settings.proxy_ports:
            # Refused before any connection, as the far node refuses a CONNECT to it (400: not
            # the endpoint's failure, so no other endpoint is tried) and counted as it counts
            # it; the far node's refusal is answered 503 ``UF`` (``_no_endpoint``), so is this.
            where = f"{self.record.source} -> {route.ip}:{route.port}"
            self.core.registry.reject(
                "proxy_port", f"{where}: port {route.port} is the proxy's own"
            )
            flags = UPSTREAM_CONNECT_FAILURE
            self.codec.respond_locally(503, flags, BODIES[flags], request)
            return True
        # The CONNECT names the backend Service (the route's choice, or the dialled one), so
        # sessions are keyed by it too (``_Endpoint.key``).
        key = endpoint.key
        session = self.owner.sessions.take(key)
        if session is None:
            return _Opening(ip, route, key)
        attempts.connected(ip, reused=True)
        self._send_try(session, request, head)
        return True

    def _endpoint(self, snap: Snapshot, backend: ServiceTarget, ip: str) -> _Endpoint:
        """Endpoint ``ip`` of ``backend`` as ``_next_try`` needs it: worked out once per
        snapshot (the route, the session key and the record's fields for it)."""
        if snap is not self._snap:
            self._snap = snap
            self._endpoints.clear()
            self._by_route.clear()
            self._labelled.clear()
            self._admissions.clear()
        found = self._endpoints.get((id(backend), ip))
        if found is not None and found.backend is backend:
            return found
        out = self.owner.outbound
        route = out.resolver.endpoint_route(snap, self.source, backend, ip)
        described = ConnectionRecord(OUTBOUND, self.record.source, self.record.destination)
        out.describe_route(snap, route, described)
        key = SessionKey(route.kind, self.src_ip, route.ip, route.port, service_name(backend))
        found = _Endpoint(
            backend, route, key, described.path, described.upstream, described.destination_identity
        )
        if len(self._endpoints) < MAX_CACHED_ENDPOINTS:
            self._endpoints[(id(backend), ip)] = found
            self._by_route[id(route)] = found
        return found

    async def _connect(
        self,
        head: RequestHead,
        request: _Request,
        plan: RoutePlan,
        opening: _Opening | None = None,
    ) -> None:
        """Attach the request to a session with one of the backend's endpoints (starting with
        ``opening`` when the reader's callback chose it), retrying a failed connect on another
        while traffic control allows; else answer 503."""
        attempts = plan.attempts
        failure: tuple[BaseException, Route] | None = None
        while True:
            step = opening if opening is not None else self._next_try(head, request, plan)
            opening = None
            if not isinstance(step, _Opening):
                if step is None:
                    break
                await self._flush()
                return
            timeout = attempts.try_timeout()
            if request.deadline is not None:
                timeout = min(timeout, max(0.0, request.deadline - time.monotonic()))
            try:
                session = await asyncio.wait_for(self._open(step.key, step.route), timeout)
            except (OSError, TunnelError) as e:
                failure = (e, step.route)
                cause = classify(e)
                if cause is not None:
                    attempts.failed(step.ip, cause)
                    if await self._timed_out(request):
                        return
                    if attempts.may_retry(cause):
                        continue
                break
            attempts.connected(step.ip)
            self._send_try(session, request, head)
            await self._flush()
            return
        self._no_endpoint(request, failure)
        await self._flush()

    def _no_endpoint(self, request: _Request, failure: tuple[BaseException, Route] | None) -> None:
        """No endpoint left: 503 ``UH`` when none was tried, else ``UF`` (to be flushed)."""
        if failure is None:
            flags = NO_HEALTHY_UPSTREAM
        else:
            flags = UPSTREAM_CONNECT_FAILURE
            self.owner.outbound.count_failure(failure[0], failure[1], self.record)
        self.codec.respond_locally(503, flags, BODIES[flags], request)

    def _send_try(self, session: UpstreamSession, request: _Request, head: RequestHead) -> None:
        """Send the request's try on ``session``. A same-node endpoint admits it first, where
        its destination node would on receiving it (L7 policy, then rate limits: so a try
        that never reached the pod, its connect failed, spends no token): a refusal is the
        try's answer (the retry hook sees its status, as it sees a far node's refusal), and
        the session, unused, goes back to the pool."""
        route = request.route
        assert route is not None
        if route.kind == "local":
            verdict = self._verdict_here(route, head)
            request.verdict = verdict
            if not verdict.allowed:
                self.owner.sessions.put(session)
                request.reached, request.refused = route, verdict.flag
                request.sent = request.first_byte = time.monotonic()
                self.codec.answer_try(verdict.status, verdict.flag, verdict.body, request)
                return
        self._attach(session, request)

    def _verdict_here(self, route: Route, head: RequestHead) -> Verdict:
        """A same-node endpoint's admission of the request as its destination's (L7 policy,
        then rate limits): no other proxy sees it."""
        assert route.target is not None
        if route.port in self.core.settings.proxy_ports:
            return _PROXY_PORT
        kept = self._admissions.get(id(route))
        if kept is None or kept[0] is not route:
            # Once per endpoint and snapshot, as its destination's session makes one per
            # connection (``RequestAdmission``: whether any policy bears, per state version)
            request = AuthzRequest(self.src_ip, route.ip, route.port, self.record.source_identity)
            where = f"{self.record.source} -> {route.ip}:{route.port}"
            kept = (route, RequestAdmission(self.core, request, route.target, where))
            known = self._by_route.get(id(route))
            if known is not None and known.route is route:  # an endpoint's, not a mirror's
                self._admissions[id(route)] = kept
        return kept[1].verdict(head)

    async def _open(
        self, key: SessionKey, route: Route, record: ConnectionRecord | None = None
    ) -> UpstreamSession:
        out = self.owner.outbound
        if route.kind == "hbone":
            conn: TunnelStream | socket.socket = await out.open(
                route, record or self.record, self.src_ip, self.conn_id
            )
        else:
            s = self.core.settings
            conn = await sockets.connect(
                (route.ip, route.port),
                mark=s.mark,
                timeout=s.connect_timeout,
                source_ip=self.src_ip if route.kind == "local" else None,
            )
        self.owner.sessions.opened += 1
        return UpstreamSession(key, conn, self.core.settings.max_header_fields)

    def _attach(self, session: UpstreamSession, request: _Request) -> None:
        """Serve the pending request with ``session``: its head goes out at the next flush
        (``_flush_now``, which every caller runs next), and what only its response needs —
        who reads the session, the try's timer — is set up there just after that write
        (``_watch_session``): none of it can matter before the request has left."""
        self.session = session
        request.reached, request.sent = request.route, time.monotonic()
        self.codec.attach(session.codec, request)
        self._attaching = request

    def _watch_session(self) -> None:
        """The attached try's second half (``_attach``), after its head was written: its
        response's reader (the HBONE connection's callback, else a task) and its timer."""
        request, self._attaching = self._attaching, None
        session = self.session
        if request is None or session is None:
            return
        conn = session.conn
        if isinstance(conn, TunnelStream):
            self.record.security = SECURITY_MTLS
        if isinstance(conn, TunnelStream) and not conn.unread:
            # Its bytes come to ``_take`` from the HBONE connection's callback; its end or
            # reset starts a reader task, as do bytes that cannot be taken at once.
            conn.deliver_directly(_Direct(self, session, request))
            conn.on_end = conn.on_drop = lambda: self._start_reader(session, request)
        else:
            self._start_reader(session, request)
        self._arm(request)

    # -- mirrors -----------------------------------------------------------------------------
    def _mirror(self, copy: Mirrored[_Request]) -> None:
        """Start the copies of a complete request (``HttpOutbound.mirror``)."""
        request = copy.tag
        if request is None or request.plan is None:
            return
        whole, send = copy.body is not None, partial(self._send_copy, copy)
        self.owner.mirror(
            request.plan.mirrors, whole, self.source, self.record, self.record.source, send
        )

    async def _send_copy(self, copy: Mirrored[_Request], attempt: MirrorTry) -> None:
        """One copy's HTTP/1.1 (``MirrorSend``): a fresh session, the request with ``Host:
        <host>-shadow`` (a same-node endpoint's policy asked first), the response read and
        dropped."""
        assert copy.body is not None
        route = attempt.route
        key = SessionKey(
            route.kind, self.src_ip, route.ip, route.port, service_name(attempt.target)
        )
        session = await self._open(key, route, attempt.record)
        try:
            attempt.attempts.connected(attempt.ip)
            head, data = mirror_request(session.codec, copy, copy.body)
            if route.kind == "local" and not self._verdict_here(route, head).allowed:
                attempt.outcome = "denied"
                return
            await session.write(data)
            response = DroppedResponse(session.codec)
            try:
                while not response.receive(await session.read()):
                    pass
            finally:
                attempt.status = response.status
            attempt.outcome = "sent"
        finally:
            session.close()

    # -- timeouts ----------------------------------------------------------------------------
    def _arm(self, request: _Request) -> None:
        """Time the attached try: the sooner of the request's deadline and its per-try
        timeout (``backendRequest``); neither (the usual request): no clock read."""
        plan = request.plan
        if request.deadline is None and (plan is None or plan.try_timeout is None):
            if self.timer is not None:
                self._disarm()
            return
        now = time.monotonic()
        delays = [request.deadline - now] if request.deadline is not None else []
        if plan is not None and plan.try_timeout is not None:
            delays.append(plan.try_timeout)
        self._disarm()
        if delays:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(max(0.0, min(delays)), self._expired, request)
            self.timed = request

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer, self.timed = None, None

    def _expired(self, request: _Request) -> None:
        """A try's time ran out: the whole request's (504 ``UT``), or only this try's (sent
        again if the rule retries, else 504 ``UT``)."""
        self.timer, self.timed = None, None
        codec = self.codec
        if codec.current_tag is not request or not codec.attached:
            return
        if request.deadline is not None and time.monotonic() >= request.deadline:
            codec.expire(BODIES[UPSTREAM_TIMEOUT])
        else:
            request.try_expired = True
            codec.try_expired(BODIES[UPSTREAM_TIMEOUT])
        self._flush_soon()

    # -- upstream side -----------------------------------------------------------------------
    def _take(self, session: UpstreamSession, request: _Request, data: bytes) -> int:
        """The attached HBONE session's bytes, from the connection's callback: handled and
        written at once, no task woken. Left in the stream, for a reader task to handle in
        order with awaited writes, while a write to either side waits; left alone once the
        connection is ending or upgraded (the relay reads them then)."""
        codec = self.codec
        if self.session is not session or codec.closing or codec.tunnel:
            return 0
        if self._writing():
            self._start_reader(session, request)
            return 0
        if not request.first_byte:
            request.first_byte = time.monotonic()
        try:
            codec.receive_upstream(data)
            self._flush_soon()
        except Exception:  # this connection's failure, not the HBONE connection's
            log.exception("%s: HTTP upstream bytes could not be handled", self.record.source)
            codec.closing = True
            self._changed()
        return len(data)

    def _start_reader(self, session: UpstreamSession, request: _Request) -> None:
        """Read the attached ``session`` with a task (a socket always; an HBONE stream once a
        callback could not take its bytes, or it ended)."""
        if self.reader is not None or self.session is not session:
            return
        _detach(session)
        self.reader = asyncio.create_task(self._upstream_side(session, request))
        self.reader.add_done_callback(self._reader_done)

    async def _upstream_side(self, session: UpstreamSession, request: _Request) -> None:
        codec = self.codec
        while self.session is session and not (codec.closing or codec.tunnel):
            self.reading = True
            try:
                data = await session.read()
            except (OSError, TunnelError) as e:
                self.reading = False
                log.debug("%s: upstream failed: %r", self.record.source, e)
                codec.upstream_failed()
                await self._flush()
                return
            self.reading = False
            if data and not request.first_byte:
                request.first_byte = time.monotonic()
            codec.receive_upstream(data)
            await self._flush()
            if not data:
                return

    def _reader_done(self, task: asyncio.Task[None]) -> None:
        """Supervision: a reader that failed unexpectedly ends the client connection (logged)
        instead of leaving the client side waiting for a response that will not come."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("%s: HTTP upstream reader failed", self.record.source, exc_info=task.exception())
        self.codec.closing = True
        self._changed()

    async def _relay_upgraded(self, session: UpstreamSession) -> None:
        """After a 101: the client and its session exchange opaque bytes until both end."""
        self.session = None  # pinned: never pooled
        _detach(session)
        if isinstance(session.conn, TunnelStream):
            await relay_tunnel(self.client, session.conn, self.record, outbound=True)
        else:
            try:
                await relay_sockets(self.client, session.conn, self.record)
            finally:
                session.conn.close()

    # -- telemetry ---------------------------------------------------------------------------
    def _report(self, exchange: Exchange, request: _Request | None) -> None:
        if request is None:
            request = _Request()
        if self.timed is request:
            self._disarm()
        # A same-node endpoint's refusal carries its destination's flag (RBAC, RL), and so
        # does the 502 ``UC`` answered for its pod lost before the head; a far node's reach
        # the source as plain responses, so the source's report has none.
        reached = request.reached
        lost = exchange.status == 502 and exchange.flags == UPSTREAM_CLOSED
        there = request.refused or (lost and reached is not None and reached.kind == "local")
        flags = NO_FLAGS if there else exchange.flags
        if request.plan is not None:
            reset = exchange.status == 503 and exchange.flags == UPSTREAM_CLOSED
            request.plan.finish(exchange.status, request.first_byte, reset_before_response=reset)
            flags = request.plan.flags(flags)
            request.plan = None
        route = request.route
        labels = self._labels(route)
        # ``ip:port`` of the endpoint: the labels' (``describe_route``'s, the same text)
        record = request_record(exchange, flags=flags, upstream=labels.upstream if route else "")
        self.core.registry.request_done(labels, record, carried_by=self.record)
        if reached is not None and reached.kind == "local":
            # No other proxy saw it: reported as its destination too, as that one would: from
            # when the try reached it (not a delay injected here, nor earlier tries), and
            # without the source's own flags (DI).
            sent = request.sent or exchange.started
            verdict = request.verdict
            record = replace(
                record,
                response_flags=exchange.flags,
                duration_ms=max(0.0, (exchange.ended - sent) * 1000),
                started_at=record.started_at + (sent - exchange.started),
                policy=verdict.reason if verdict is not None else "",
                dry_run_policy=verdict.dry_run if verdict is not None else "",
            )
            self._report_destination(labels, reached, record)

    def _labels(self, route: Route | None) -> ConnectionRecord:
        """The client connection's record as a request to ``route`` saw it: made once per
        endpoint and snapshot (``_labelled``), like the endpoint's other facts (``_endpoint``).
        Why it can be shared by the requests of one snapshot: what request telemetry reads of
        it (the label fields, the id, the addresses) is the connection's and the endpoint's,
        never the counts and failure that change on ``self.record``; nothing changes it once
        it is reported."""
        if route is None:
            labels = self.record.copy()
            labels.upstream, labels.destination_identity = "", None
            labels.security = SECURITY_NONE
            return labels
        snap = self._store.snapshot()
        current = snap is self._snap
        if current:
            kept = self._labelled.get(id(route))
            if kept is not None and kept[0] is route:
                return kept[1]
        labels = self.record.copy()
        known = self._by_route.get(id(route)) if current else None
        if known is not None and known.route is route:
            labels.path, labels.upstream = known.path, known.upstream
            labels.destination_identity = known.identity
        else:
            labels.destination_identity = None
            self.owner.outbound.describe_route(snap, route, labels)
        labels.security = SECURITY_MTLS if route.kind == "hbone" else SECURITY_NONE
        if current and len(self._labelled) < MAX_CACHED_ENDPOINTS:
            self._labelled[id(route)] = (route, labels)
        return labels

    def _report_destination(
        self, labels: ConnectionRecord, reached: Route, record: RequestRecord
    ) -> None:
        """``record`` reported as the same-node endpoint ``reached`` (``labels``: the request's
        source record) reports it: no other proxy saw it."""
        service = reached.service.hostname() if reached.service is not None else ""
        self.core.registry.request_done(same_node_destination(labels, service), record)
