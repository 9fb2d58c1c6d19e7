"""The asyncio shell around ``Http1Proxy`` for a declared HTTP/1.1 port at the destination.

Used by both inbound paths once the connection is admitted and the pod's socket is connected:
the HBONE stream (``inbound.py``) and the plaintext listener under PERMISSIVE (``plaintext.py``);
``Downstream`` hides which.

Why a callback for the pod's side and a task only for the client's: the bench measured the
shell, not the parser, as most of the HTTP path's cost once the parser was llhttp, and a task's
wake-up with its awaits (``sock_recv``, the write, the locks) per response was a large part of
it. The pod's socket is watched with ``add_reader`` and its bytes go through ``Http1Proxy``
and on to the client from the callback; the client's side stays a task (its reads are awaits
on the HBONE stream). Each side's writes go through an ``Outbox``: written at once when that
side takes them (``try_write``), else queued in order and written by a task that awaits the
side's backpressure. While the client's outbox holds bytes the pod's socket is not read, and
while the pod's holds bytes the client's stream is not read, so a slow reader stops its
writer (as in the L4 relay). A pipelined request the layer has parsed but cannot act on yet
(``client_paused``) stops the client's reads until the exchange before it has ended, so a
pipelining client cannot queue without bound. All of this but the client's side is
``PodShell``, which the HTTP/2 destination (``h2inbound.H2Session``) shares.

Authorization here is per request (``authorize``: the policies' decision and
``Core.request_decided``'s reports, the log text built only for a decision that reports
anything): on a declared HTTP port the
connection itself was admitted without the L7 conditions, which only a request can satisfy. An
authorized request then meets the RateLimitPolicies of the pod port (``Core.rate_limit``): over
the limit it is answered ``429`` with flag ``RL`` and the connection keeps serving. Whether any
policy bears on the connection's requests at all is worked out once per state version
(``RequestAdmission``, both protocols): the usual pod has none, and its requests then meet
their rate limits alone, with nothing of the request's authorization built.
The connection's ``ConnectionRecord`` keeps counting bytes for the TCP metrics; each request is
reported to ``Registry.request_done`` (Istio request metrics, access log). After an upgrade
(``101``) the connection is relayed as opaque bytes, like an L4 one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from abc import abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from agent.policy.authz import HttpAttributes, Request
from agent.policy.paths import policy_target
from agent.policy.peerauth import STRICT
from agent.proxy.core import Core, Policies
from agent.proxy.http1 import (
    GRPC_RESOURCE_EXHAUSTED,
    PEER_REQUEST,
    RATE_LIMITED,
    RATE_LIMITED_BODY,
    RBAC_DENIED,
    Exchange,
    Http1Proxy,
    RequestHead,
    Verdict,
    request_record,
)
from agent.proxy.http1_codec import NO_ALLOWANCE
from agent.proxy.httpshell import (
    HEADER_TIMEOUT,
    READ_SIZE,
    CallbackShell,
    Outbox,
    require_non_blocking,
    try_send,
)
from agent.proxy.linger import linger
from agent.proxy.relay import relay_sockets, relay_tunnel
from agent.proxy.tunnel import Sink, TunnelStream
from agent.state import Snapshot, Workload
from agent.telemetry.records import ConnectionRecord, RequestRecord

if TYPE_CHECKING:
    from agent.policy.ratelimit import RateLimit

log = logging.getLogger(__name__)

ALLOWED = Verdict(True)
E = TypeVar("E")  # the proxy's finished exchange


class Downstream(Protocol):
    """The client side of an inbound connection: an HBONE stream or a plaintext socket."""

    # The client is a source node (HBONE), whose heads carry what it added to its client's
    # (``http1.PEER_REQUEST``), not a plaintext client
    from_peer: bool

    async def read(self) -> bytes | None: ...

    def deliver_to(self, sink: Sink | None) -> None:
        """Hand received bytes to ``sink`` as they arrive, when the transport can (else they
        wait for ``read``); ``None`` stops it."""
        ...

    def try_write(self, data: bytes) -> int:
        """Write what can be written without waiting; how many bytes were."""
        ...

    async def write(self, data: bytes) -> None: ...

    def flushed(self) -> bool:
        """What ``try_write`` took in this pass of the loop is at the transport already (False:
        it goes at the pass's end, with other streams' writes)."""
        ...

    def write_eof(self) -> None: ...

    async def relay(self, upstream: socket.socket, record: ConnectionRecord) -> None: ...


class StreamDownstream:
    from_peer = True

    def __init__(self, stream: TunnelStream) -> None:
        self.stream = stream

    async def read(self) -> bytes | None:
        chunk = await self.stream.read()
        if chunk is not None:
            self.stream.consumed(len(chunk))
        return chunk

    def deliver_to(self, sink: Sink | None) -> None:
        self.stream.deliver_directly(sink)

    def try_write(self, data: bytes) -> int:
        """Write now, and on a connection whose only stream this is, hand the bytes to the TLS
        transport now too (``TunnelStream.write_now``), not in the loop's next pass
        (``flush_soon``). Why: the shell writes a response from the pod's reader callback and
        then reports the finished exchange (the Istio metrics and the access log line, tens
        of µs), so a deferred flush held every response behind its own telemetry. The shell
        writes once per input, so nothing else of this stream could have joined the record;
        with other streams on the connection the flush still waits for the pass's end, so
        their writes share it (``flushed`` is then False, and the shell reports after it).
        At most what the queue budget lets one write add (``TunnelStream.write_some``): the
        outbox's task writes the rest, and the pod's socket is not read meanwhile."""
        return self.stream.write_some(data)

    def flushed(self) -> bool:
        return len(self.stream.proto.streams) == 1  # as ``write_now`` decides

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)

    def write_eof(self) -> None:
        self.stream.write_eof()

    async def relay(self, upstream: socket.socket, record: ConnectionRecord) -> None:
        await relay_tunnel(upstream, self.stream, record, outbound=False)


class SocketDownstream:
    from_peer = False

    def __init__(self, sock: socket.socket) -> None:
        require_non_blocking(sock)
        self.sock = sock

    async def read(self) -> bytes | None:
        data = await asyncio.get_running_loop().sock_recv(self.sock, READ_SIZE)
        return data or None

    def deliver_to(self, sink: Sink | None) -> None:
        """The plaintext listener's socket is read by the session's task only."""

    def try_write(self, data: bytes) -> int:
        return try_send(self.sock, data)

    def flushed(self) -> bool:
        return True  # sent by ``try_write`` itself

    async def write(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    def write_eof(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    async def relay(self, upstream: socket.socket, record: ConnectionRecord) -> None:
        await relay_sockets(self.sock, upstream, record)


class ShellProxy(Protocol[E]):
    """What ``PodShell`` drives: ``Http1Proxy`` or ``h2proxy.H2Proxy`` (one pod connection)."""

    closing: bool
    head_started: float | None

    def receive_upstream(self, data: bytes) -> None: ...

    def upstream_failed(self) -> None: ...

    def header_timeout(self) -> None: ...

    def take_to_client(self) -> bytes: ...

    def take_to_upstream(self) -> bytes: ...

    def take_completed(self) -> list[E]: ...

    def take_rejections(self) -> list[str]: ...


class PodShell(CallbackShell, Generic[E]):
    """The destination's callback shell, one client connection relayed to one pod connection
    through a sans-IO proxy: ``HttpSession`` (HTTP/1.1) and ``h2inbound.H2Session`` (HTTP/2).

    What both do alike is here (and in ``httpshell.CallbackShell``, which the HTTP/2 source
    shares): the pod's socket read by a reader callback, each side's writes through an
    ``Outbox`` (a side whose writes wait stops the other's reads), after each input the proxy's
    output written, its finished exchanges reported, its refusals counted and its head timed
    (``HeadTimer``), and how the session ends. What differs stays with each: the proxy
    (``_start``), the client's side (``send``, ``_client_side``: HTTP/1.1 holds a pipelining
    client's bytes and stops at an upgrade, HTTP/2 takes them until it closes), ``serve`` (an
    upgraded HTTP/1.1 connection is relayed after it), the exchange's telemetry record
    (``_record_of``), and when the session is over (``_after_input``). The hooks replace code
    that ran inline at the same places, so the shared shell costs no more calls per request
    than the two did."""

    proxy: ShellProxy[E]
    _record_of: Callable[[E], RequestRecord]  # a finished exchange as telemetry reports it

    def __init__(
        self,
        core: Core,
        down: Downstream,
        upstream: socket.socket,
        record: ConnectionRecord,
        request: Request,
        workload: Workload,
        *,
        header_timeout: float = HEADER_TIMEOUT,
    ) -> None:
        super().__init__(upstream, header_timeout)  # the pod's socket is read by a callback
        self.core, self.down, self.upstream = core, down, upstream
        self.record, self.request, self.workload = record, request, workload
        self.where = f"{record.source} -> {record.destination}"
        # Where a finished request goes (a same-node pod port's reports it twice: ``samenode``)
        self.report: Callable[[ConnectionRecord, RequestRecord], None] = core.registry.request_done
        self._upstream_eof = False
        self.refused = False  # the proxy refused bad input: the close lingers (``close``)
        self._to_client = Outbox(
            down.try_write, down.write, self._resume_upstream, self._client_write_failed
        )
        self._to_pod = Outbox(
            lambda data: try_send(upstream, data),
            lambda data: self._loop.sock_sendall(upstream, data),
            lambda: None,
            self._pod_write_failed,
        )
        # Each request's L7 policy and rate limits (``RequestAdmission``)
        self._admission = RequestAdmission(core, request, workload, self.where)
        self._start()

    @abstractmethod
    def _start(self) -> None:
        """The protocol's own state: its proxy (``self.proxy``) and what its client side keeps."""

    def _authorize(self, head: RequestHead) -> Verdict:
        return self._admission.verdict(head)

    def _client_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())  # type: ignore[arg-type]

    # -- the pod's side: a reader callback -------------------------------------------------
    def _readable(self) -> None:
        record = self.record
        try:
            data = self.upstream.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.debug("%s: upstream failed: %r", self.where, e)
            self._upstream_eof = True
            self._reader.stop()
            self.proxy.upstream_failed()
            self._moved()
            return
        if data and not record.bytes_received:
            record.first_byte = time.monotonic()
        record.bytes_received += len(data)
        if not data:
            self._upstream_eof = True
            self._reader.stop()
        try:
            self.proxy.receive_upstream(data)
            self._moved()
        except Exception as e:  # the session's failure, not the event loop's
            self._fail(e)

    def _resume_upstream(self) -> None:
        if not (self._upstream_eof or self._ended.done()):
            self._reader.start()

    # -- both ------------------------------------------------------------------------------
    def _moved(self) -> None:
        """After input: write what it produced, report finished exchanges, time the head, and
        see whether the session is over."""
        proxy = self.proxy
        data = proxy.take_to_upstream()
        if data:
            self._to_pod.send(data)
        data = proxy.take_to_client()
        flushing = False  # the client's bytes go to the transport at the end of this pass
        if data:
            self._to_client.send(data)
            if self._to_client.busy:
                self._reader.stop()  # the client is not reading: neither do we the pod
            else:
                flushing = not self.down.flushed()
        completed = proxy.take_completed()
        if completed:
            # After the response: its telemetry (metrics, access log line: tens of µs) must
            # not hold it back, so when it waits for the pass's flush, so does the report.
            if flushing:
                self._loop.call_soon(self._report, completed)
            else:
                self._report(completed)
        for cause in proxy.take_rejections():
            self.refused = True
            self.core.registry.http_rejected(cause, self._rejected_detail())
        started = proxy.head_started
        if started != self._head.started and not proxy.closing:
            self._head.time(started)
        if self._after_input():
            # Read the pod no more (after a 101 its bytes are the relay's, not to be dropped).
            self._end(None)

    def _report(self, completed: list[E]) -> None:
        report, record_of = self.report, self._record_of
        for exchange in completed:
            report(self.record, record_of(exchange))

    def _rejected_detail(self) -> str:
        """What the log line of a refusal names: the connection (and what HTTP/1.1 answered)."""
        return self.where

    async def close(self) -> None:
        """End the client's side once the answers are written: FIN; after a refusal, discard
        what the client still sends for a bounded while (``agent.proxy.linger``) so that
        closing with its bytes unread does not reset the answer away."""
        self.down.write_eof()
        if self.refused:
            await linger(self.down.read)

    @abstractmethod
    def _after_input(self) -> bool:
        """The protocol's own step after an input (``_moved``); True when the session is over."""

    def _fail(self, error: BaseException) -> None:
        """The session failed (a write to the client, its task, an exception in a callback)."""
        self._end(error)

    def _pod_write_failed(self, error: Exception) -> None:
        log.debug("%s: upstream send failed: %r", self.where, error)
        self.proxy.upstream_failed()
        self._moved()

    def _client_write_failed(self, error: Exception) -> None:
        self._fail(error)


class HttpSession(PodShell[Exchange]):
    """One client connection on a declared HTTP/1.1 port, relayed to one pod connection."""

    proxy: Http1Proxy
    _record_of = staticmethod(request_record)

    def _start(self) -> None:
        self.record.protocol = "http/1.1"
        self.proxy = Http1Proxy(
            authorize=self._authorize,
            max_fields=self.core.settings.max_header_fields,
            allowance=PEER_REQUEST if self.down.from_peer else NO_ALLOWANCE,
        )
        self._resume = asyncio.Event()  # set when the exchange before a pipelined one ended
        self._paused = False  # the client side waits for ``_resume``

    def _rejected_detail(self) -> str:
        refusal = self.proxy.refusal
        return self.where if refusal is None else f"{self.where}: {refusal}"

    async def serve(self) -> None:
        """Serve requests until either side closes; then relay raw bytes if upgraded."""
        self._resume_upstream()
        client = asyncio.create_task(self._client_side(), name="http-client")
        client.add_done_callback(self._client_done)
        try:
            await self._ended
            await self._to_pod.idle.wait()
            await self._to_client.idle.wait()
        finally:
            if not self.proxy.tunnel:
                # Ended by a failure (the client reset its stream, say after a 503 head it
                # retries elsewhere): the request in flight is still reported, flagged DC.
                self.proxy.client_failed()
                for exchange in self.proxy.take_completed():
                    self.report(self.record, request_record(exchange))
            self._reader.stop()
            self._head.cancel()
            client.cancel()
            await asyncio.gather(client, return_exceptions=True)
            self._to_client.cancel()
            self._to_pod.cancel()
        if self.proxy.tunnel:
            await self.down.relay(self.upstream, self.record)
        else:
            await self.close()

    # -- the client's side: a task ---------------------------------------------------------
    async def _client_side(self) -> None:
        """Read what the stream did not hand to ``send`` (it was busy, or cannot), and its end."""
        proxy, down = self.proxy, self.down
        down.deliver_to(self)
        try:
            while not (proxy.closing or proxy.tunnel):
                if proxy.client_paused:  # a pipelined request waits its turn: read no more yet
                    self._resume.clear()
                    self._paused = True
                    await self._resume.wait()
                    continue
                if self._to_pod.busy:  # the pod is not reading: neither do we
                    await self._to_pod.idle.wait()
                    continue
                data = await down.read()
                if data is not None:
                    self.record.bytes_sent += len(data)
                proxy.receive_client(data or b"")
                self._moved()
                if data is None:
                    return
        finally:
            down.deliver_to(None)

    def send(self, data: bytes) -> int:
        """``Sink``: the stream's bytes as they arrive (no task wakes up for them), unless they
        must wait (a pipelined request, a pod not reading) or are not HTTP any more."""
        proxy = self.proxy
        if proxy.closing or proxy.tunnel or proxy.client_paused or self._to_pod.busy:
            return 0
        try:
            self.record.bytes_sent += len(data)
            proxy.receive_client(data)
            self._moved()
        except Exception as e:  # the session's failure, not the HBONE connection's
            self._fail(e)
        return len(data)

    def _after_input(self) -> bool:
        proxy = self.proxy
        if self._paused and not proxy.client_paused:  # asked only while the client side waits
            self._paused = False
            self._resume.set()
        if proxy.lingers:  # the client may still send a body it was told to wait for
            self.refused = True
        return proxy.closing or proxy.tunnel

    def _fail(self, error: BaseException) -> None:
        """The session ends with ``error``; the pod's reader is removed by ``serve``'s cleanup
        (HTTP/2 removes it at once: a difference kept as it was)."""
        if not self._ended.done():
            self._ended.set_exception(error)


# The flags of ``authorize``'s refusals: a destination's. Where the source admits a try
# for a same-node pod they are reported only as that pod's destination, not on the source's
# report, which for a far node's refusal sees a plain 403 or 429.
REFUSAL_FLAGS = frozenset({RBAC_DENIED, RATE_LIMITED})


def authorize(
    core: Core,
    connection: Request,
    workload: Workload,
    head: RequestHead,
    where: str,
    policies: Policies,
    snap: Snapshot,
    limited: bool,
) -> Verdict:
    """Admit one request on an admitted connection: L7 authorization first, then the
    RateLimitPolicies of the pod port, so a denied request spends no token; with the state
    version's ``policies`` and whether a RateLimitPolicy applies to the pod port
    (``limited``) already known (``RequestAdmission``): the request's ``Request`` evaluated,
    the decision's reports made (``Core.request_decided``, with the log text built only
    for a decision that reports anything: a denial, a dry-run or AUDIT outcome; the usual
    allowed request has none), then the port's rate limits."""
    # Built field by field: ``dataclasses.replace`` was a visible share of a request's time.
    path, host = policy_target(head.path, head.host)
    request = Request(
        connection.source_ip,
        connection.destination_ip,
        connection.destination_port,
        connection.principal,
        HttpAttributes(head.method, path, host, head.headers),
    )
    decision = policies.live(request, workload)
    if decision.would or decision.audited or not decision.allowed:
        core.request_decided(decision, f"{where} {head.method} {head.path}")
    # The dry-run policies that would have denied it go on the request's record (allowed or
    # not); the usual request has none, and is answered by the shared ``ALLOWED``.
    would = ",".join(decision.would_deny_rules) if decision.would_deny_rules else ""
    if not decision.allowed:
        return Verdict(False, decision.refused_by(), dry_run=would)
    if limited:
        limit = core.rate_limit(request, snap)
        if limit is not None:
            return rate_limited(limit, would)
    return Verdict(True, dry_run=would) if would else ALLOWED


def rate_limited(limit: RateLimit, would: str) -> Verdict:
    """A request ``limit`` refused: 429 (gRPC ``RESOURCE_EXHAUSTED``), with the dry-run
    policies that ``would`` have denied it."""
    return Verdict(
        False,
        limit.policy,
        status=429,
        flag=RATE_LIMITED,
        body=RATE_LIMITED_BODY,
        grpc_status=GRPC_RESOURCE_EXHAUSTED,
        dry_run=would,
    )


class RequestAdmission:
    """Each request of one admitted connection to a pod port admitted (``authorize``: L7
    authorization, then the port's rate limits), with what does not depend on
    the request worked out once per state version: whether any policy bears on the
    connection's requests (``Policies.live``'s STRICT PeerAuthentication for a plaintext
    client, an AuthorizationPolicy selecting the pod). The usual pod has none, and then each
    request's verdict is its rate limits alone: ``authorize``'s answer (``ALLOWED``, or
    429), without building the request's ``Request``, its log text and its ``Decision`` per
    request or stream (the policies that select the pod are a cached look-up in the
    ``Authorizer`` itself). Where a policy does bear (the usual production pod), a request
    still builds its ``Request``, but its log text only for a denial or a dry-run/AUDIT
    outcome (the decisions that report anything), and an allowed one shares its ALLOW's
    ``Decision``. Whether a RateLimitPolicy applies to the pod port is kept per state version
    too: while none does, no request asks ``Core.rate_limit``. Every ``PodShell`` admits its
    requests through one: HTTP/1.1's
    (``HttpSession``) and HTTP/2's (``h2inbound.H2Session``); so does the HTTP/1.1 source for
    a same-node endpoint, whose destination it stands for (``http_outbound``)."""

    __slots__ = ("_free", "_limited", "_policies", "core", "request", "where", "workload")

    def __init__(self, core: Core, request: Request, workload: Workload, where: str) -> None:
        self.core, self.request, self.workload, self.where = core, request, workload, where
        self._policies: Policies | None = None  # the version ``_free`` and ``_limited`` are of
        self._free = False  # no policy bears on this connection's requests
        self._limited = True  # a RateLimitPolicy applies to the connection's pod port

    def verdict(self, head: RequestHead) -> Verdict:
        core = self.core
        snap = core.snapshot()
        policies = core.policies(snap)
        if policies is not self._policies:  # a new state version (``Core.policies``'s cache)
            request = self.request
            self._policies, self._free = policies, not self._policed(policies)
            self._limited = core.rate_limited_port(
                request.destination_ip, request.destination_port, snap
            )
        if not self._free:
            return authorize(
                core, self.request, self.workload, head, self.where, policies, snap, self._limited
            )
        if not self._limited:
            return ALLOWED
        limit = core.rate_limit(self.request, snap)  # the connection's: ip, port, principal
        return ALLOWED if limit is None else rate_limited(limit, "")

    def _policed(self, policies: Policies) -> bool:
        request, workload = self.request, self.workload
        if request.principal is None and (
            policies.peerauth.mode(workload, request.destination_port) == STRICT
        ):
            return True
        return policies.authz.applies_to(workload)
