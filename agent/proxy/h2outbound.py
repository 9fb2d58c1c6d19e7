"""Source side of a Service port declared HTTP/2 or gRPC: each request to its own endpoint.

Why: a gRPC client keeps one HTTP/2 connection to a Service for as long as it runs, so
per-connection balancing sends every call it makes to one replica. On a Service VIP port whose
``appProtocol`` (or name) declares ``http2``/``kubernetes.io/h2c``/``grpc``, the outbound proxy
terminates the client's h2c instead of relaying it (``H2Proxy`` with a ``pick``), and routes
each request (``h2route``: the GRPCRoutes and HTTPRoutes attached to the port choose a weighted
backend Service, edit the headers, time the request, or answer it here) to the endpoint the
backend Service's traffic control picks for it (``agent.policy.traffic``: the latency-aware
balancer, outlier ejection, connection limits counted per request), over one h2c connection per
endpoint of a backend Service per client connection, inside an HBONE tunnel opened exactly as
for a connection (``Outbound.open``: the source pod's certificate, the endpoint's identity
checked).
The destination node's inbound HTTP/2 layer then authorizes and reports each request as usual.
A same-node or unmeshed endpoint's upstream is a socket of its own, charged to the process's
descriptor budget (``agent.base.conncaps``); while the budget is full each pick prefers, within
the backend the route chose, an endpoint that needs no new socket (``_sparing``).

A same-node endpoint's request is seen by no other proxy, so it is admitted here, per try, as
its destination would admit it (``http_inbound.RequestAdmission`` at the pod's workload, kept
per endpoint and snapshot: the L7 policy, ``http_inbound.authorize``: methods, paths, hosts,
request headers, dry-run and AUDIT as at a destination; then the pod port's RateLimitPolicies,
``Core.rate_limit``, from the node's buckets, so a pod's limit is one limit whichever node its
callers are on), where the far node would: when the try's head goes to the endpoint's open
connection (``H2Proxy``'s ``admit``), so after an injected delay, and a try held while its
connection opens (``unpark``ed then) is never admitted if the connect fails: it spends no token.
The pod resetting or losing a try before its response head is, to a rule's ``retry``, the 502
(gRPC ``UNAVAILABLE``) a far node answers for it (``H2Proxy``'s ``direct``), not a lost
connection retried whatever its codes. A refusal is answered as the destination node answers it,
403 ``RBAC: access denied`` (gRPC: trailers-only ``grpc-status: 7``) or 429
``local_rate_limited`` (``grpc-status: 8``, counted in
``nodemesh_rate_limited_requests_total``), as that try's response: a route rule whose
``retry.codes`` has its status sends the request again (a gRPC call's trailers-only answer is
status 200 to it, as from a far node), and the connection goes on. Its socket is therefore
opened without the connection-level check (``Outbound.open(requests_authorized=True)``: only a
proxy port is refused), which would match no L7 rule: under ALLOW it refused every call, under
DENY one denied method refused them all.

Each request is reported with ``reporter="source"`` (the connection's record, pointed at the
request's endpoint), with the source's own flags only: a same-node endpoint's refusal is
reported there without its ``RBAC``/``RL``, and the 502 for its pod lost before the response
head without ``UR``/``UC``, as a far node's 403, 429 or 502 is. The balancer learns
each request's time to response headers (``Attempts.finish(first_byte_at=...)``). An endpoint
whose tunnel cannot be opened (within the try's ``perTryTimeout``) counts against it with its
cause (``balanced.classify``), and the requests that waited for it go to another endpoint as
the backend Service's TrafficPolicy ``retries`` allow (``h2route.ServiceRetries``; a pod's
REFUSED_STREAM likewise), else are answered 503 ``UF`` / UNAVAILABLE (the tunnel's failure
then counted as a rejection, as the last attempt's failure of a connection is). One whose
set-up raises anything else (a defect, ``_broken``) is logged once with its cause and its calls
are answered at once, 503 ``UF`` / UNAVAILABLE (``UC`` once a try may have been sent there); the
session serves on.

A request that reached a same-node endpoint (its policy's refusal included) is reported with
``reporter="destination"`` too (``same_node_destination``): no other proxy sees it. So is each
try such an endpoint answered that was dropped for a retry (``H2Proxy.take_dropped``), as a far
node reports the tries it answered; each from when the try was sent there.

The shell is the destination's (``httpshell.CallbackShell`` and ``Outbox``): the client's socket
is read by a reader callback, each endpoint's HBONE stream hands its bytes to the session as
they arrive (``_UpstreamSink``), and each side's writes go out at once, else queue behind its
backpressure; while an endpoint's writes wait the client is not read, and while the client's
wait the endpoints' bytes stay in their streams (their windows bound them). One task per
endpoint opens its tunnel, then reads only what its stream could not hand over, its end, and a
same-node endpoint's socket. Why: the earlier shell's task per side, with a lock per write,
woke two tasks per call; this one wakes none once the endpoint's tunnel is open.

Request timeouts (a route's, or a gRPC call's ``grpc-timeout``) and the backoffs of a route
rule's retries are one timer per session, at the soonest time ``H2Proxy`` holds
(``next_deadline``); when it fires the proxy answers what expired and sends again what waited.

``RequestMirror``: a request whose rule mirrors it is kept (``Choice.mirror``, up to
``max_replay_body``) and, once the client sent all of it, copied to each mirror Service as
HTTP/1.1 does (``HttpOutbound``'s bound of copies in flight per node and their deadline; a
task that outlives the client connection): an endpoint by the mirror Service's own traffic
control (a same-node one's policy and rate limits asked about the copy first), a fresh tunnel,
``h2mirror.MirrorCall`` on it, the response dropped, only ``nodemesh_http_mirrored_total``
counting the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

from agent.policy.authz import Request as AuthzRequest
from agent.policy.traffic.balancer import EndpointLoad
from agent.proxy import sockets
from agent.proxy.balanced import classify
from agent.proxy.h2exchange import (
    NO_REPORTS,
    UPSTREAM_CONNECT_FAILURE,
    UPSTREAM_OVERFLOW,
    UPSTREAM_RESET,
    Choice,
    H2Exchange,
    H2Mirrored,
    H2Reports,
    LocalAnswer,
    PickRequest,
)
from agent.proxy.h2inbound import h2_request_record
from agent.proxy.h2mirror import MirrorCall, shadow_request
from agent.proxy.h2proxy import H2Proxy
from agent.proxy.h2route import Endpoint, admitted, route_request
from agent.proxy.http1 import NO_FLAGS, UPSTREAM_CLOSED, RequestHead, Verdict
from agent.proxy.http_inbound import ALLOWED, REFUSAL_FLAGS, RequestAdmission
from agent.proxy.http_mirror import MirrorTry
from agent.proxy.http_router import RoutePlan
from agent.proxy.httpidle import IdleTimer, ServiceIdleTimeout, closed
from agent.proxy.httpshell import (
    HEADER_TIMEOUT,
    READ_SIZE,
    CallbackShell,
    Outbox,
    try_send,
)
from agent.proxy.linger import linger_socket
from agent.proxy.records import Refused, cancel_current_task
from agent.proxy.resolve import Route, ServiceTarget
from agent.proxy.tunnel import TunnelError, TunnelStream, close_upstream
from agent.state import Snapshot, Workload
from agent.telemetry.records import (
    OUTBOUND,
    SECURITY_MTLS,
    ConnectionRecord,
    RequestRecord,
    same_node_destination,
)

if TYPE_CHECKING:
    from agent.proxy.outbound import Outbound, Upstream

log = logging.getLogger(__name__)


def _allow(_head: RequestHead) -> Verdict:
    return ALLOWED  # the destination node authorizes each request


class H2SourceSession(CallbackShell):
    """One client h2c connection to a Service VIP, its requests spread over the endpoints."""

    proxy: H2Proxy

    def __init__(
        self,
        outbound: Outbound,
        client: socket.socket,
        snap: Snapshot,
        source: Workload | None,
        target: ServiceTarget,
        src: str,
    ) -> None:
        super().__init__(client, HEADER_TIMEOUT)  # the client's socket is read by a callback
        self.outbound, self.client = outbound, client
        self.source, self.target, self.src = source, target, src
        self.src_ip = src.rsplit(":", 1)[0]
        core = outbound.core
        self.record = ConnectionRecord(OUTBOUND, src, f"{target.vip}:{target.port.port}")
        if source is not None:
            self.record.source_identity = core.identity(source, snap)
        self.record.path = "hbone"
        self.record.protocol = "http/2"  # reported per request (its TCP flows by the far ends)
        self.where = f"{src} -> {target.vip}:{target.port.port}"
        self.proxy = H2Proxy(_allow, pick=self._pick, admit=self._admit, direct=self._direct)
        self.conn_id = 0
        self.refused = False  # the proxy refused bad input: the close lingers (``linger``)
        self._upstreams: dict[int, Upstream] = {}
        self._routes: dict[Endpoint, ConnectionRecord] = {}  # the record of each one's route
        self._reached: set[Endpoint] = set()  # those whose upstream is (or was) open
        self._opened: set[int] = set()  # upstreams whose open ended (opened or failed)
        self._waiting: dict[int, list[object]] = {}  # tags of the tries held for each to open
        self._tasks: set[asyncio.Task[None]] = set()  # one per endpoint: opens, then reads
        self._to_client = Outbox(
            lambda data: try_send(client, data),
            lambda data: self._loop.sock_sendall(client, data),
            lambda: None,  # the endpoints' tasks wait for ``idle`` themselves
            self._end,
        )
        self._to_upstream: dict[int, Outbox] = {}
        # Inside the client's read callback (``_readable``): the one pass of ``_moved`` that
        # writes to each endpoint, so a tunnel alone on its HBONE connection is flushed at
        # once (``TunnelStream.write_now``) instead of after the rest of the pass.
        self._client_read = False
        self._routes_of: Snapshot | None = None  # the snapshot ``_route_cache`` is of
        self._route_cache: dict[Endpoint, Route] = {}
        # id(route) -> (the route, its same-node endpoint's admission), ``_verdict``; emptied
        # with ``_route_cache``
        self._admissions: dict[int, tuple[Route, RequestAdmission]] = {}
        self._timer: asyncio.TimerHandle | None = None  # the soonest timeout or retry
        self._timer_at: float | None = None
        self._idle = IdleTimer(self._loop, self._idle_expired)  # the Service's idleTimeout
        self._service_idle: ServiceIdleTimeout | None = None  # made when first asked
        # What each pick of an endpoint prefers (``_sparing``), with a descriptor budget.
        self._caps = core.caps
        self._narrow = self._sparing if core.caps is not None else None
        # The state's current snapshot, read three times a call (the pick, the endpoint's
        # route, the idle timeout): the store's own reader, not ``Core.snapshot`` around it.
        self._snapshot = core.store.snapshot

    def _pick(self, request: PickRequest) -> Choice | LocalAnswer:
        """Route the request (``h2route``: routes, weighted backend, traffic control)."""
        core, source = self.outbound.core, self.source
        choice = route_request(
            self.outbound.http.router,
            self._snapshot(),
            self.target,
            request,
            self.src_ip,
            source.labels if source is not None else None,
            (core.node, None),
            client_namespace=source.namespace if source is not None else "",
            narrow=self._narrow,
        )
        if isinstance(choice, LocalAnswer):
            head = request.head
            log.debug("%s %s %s: %s %s", self.where, head.method, head.path, choice.status,
                      choice.flags)  # fmt: skip
        elif choice.parked:  # queued for a slot (maxPendingRequests): sent when admitted
            plan = choice.tag
            assert isinstance(plan, RoutePlan)
            loop = asyncio.get_running_loop()

            def turn() -> None:  # called wherever a slot frees: act from the loop, here
                loop.call_soon(self._admitted, plan)

            plan.attempts.on_admitted = turn
        return choice

    def _sparing(
        self, backend: ServiceTarget, pool: Sequence[EndpointLoad]
    ) -> Sequence[EndpointLoad]:
        """The candidates of ``backend`` for a pick (``route_request``'s ``narrow``): with the
        descriptor budget full (``take_stream`` would refuse a new socket), those whose request
        needs no new socket: a far endpoint (a stream of a pooled HBONE connection) or one
        this session has an upstream to already; all of them if none does (the balancer's
        choice then stands and its socket is refused: 503 ``UO``, as before). With room, all
        of them: the balancer's choice is unchanged. Only the chosen backend's endpoints: a
        route's weighted split across backends is never bent."""
        caps = self._caps
        if caps is None or caps.used < caps.budget:  # room: ``take_stream`` would not refuse
            return pool
        service, port = (backend.service.namespace, backend.service.name), backend.port.port
        spare = [
            load for load in pool if self._no_new_socket(Endpoint(service, port, load.ip, backend))
        ]
        return spare or pool

    def _no_new_socket(self, key: Endpoint) -> bool:
        return self.proxy.has_upstream(key) or self._route_to(key).kind == "hbone"

    def _admitted(self, plan: RoutePlan) -> None:
        """A parked request's turn came: its endpoint (or 503 ``UH``) to ``H2Proxy``."""
        endpoint = admitted(plan)
        answer = endpoint if isinstance(endpoint, LocalAnswer) else Choice(endpoint, plan)
        if not self.proxy.unpark(plan, answer):
            plan.attempts.finish()  # the request ended meanwhile: give its slot back
            return
        self._moved()

    def _admit(self, exchange: H2Exchange, key: object, uid: int) -> LocalAnswer | bool:
        """``H2Proxy``'s admission of a try where its head goes to upstream ``uid``: a
        same-node endpoint's (L7 policy, then rate limits), as its destination admits what
        arrives there: once the upstream is open (held until then, ``_upstream`` unparks it;
        not asked when the open failed: the try goes elsewhere or fails as before). An
        endpoint on another node admits it there."""
        if not isinstance(key, Endpoint) or self._route_to(key).kind != "local":
            return True
        if uid not in self._upstreams:
            if uid in self._opened:
                return True  # its open failed: the proxy is told right after (``_upstream``)
            self._waiting.setdefault(uid, []).append(exchange.tag)
            return False
        verdict = self._verdict(self._route_to(key), exchange.head)
        # What refused this try, or would have (dry-run), for its destination report only
        # (``_report``): set for every try here, so none keeps an earlier try's.
        exchange.denied_by = None if verdict.allowed else verdict.reason
        exchange.dry_run = verdict.dry_run
        if verdict.allowed:
            return True
        return LocalAnswer(verdict.status, verdict.flag, verdict.body,
                           grpc_status=verdict.grpc_status, upstream=key)  # fmt: skip

    def _direct(self, key: object) -> bool:
        """Is upstream ``key`` a same-node endpoint (the pod itself: no destination proxy in
        front, this node answers for it)?"""
        return isinstance(key, Endpoint) and self._route_to(key).kind == "local"

    def _unpark_waiting(self, uid: int, key: Endpoint) -> None:
        """The tries held for upstream ``uid`` to open go to it now (``_admit`` asked again)."""
        self._opened.add(uid)
        for tag in self._waiting.pop(uid, ()):
            self.proxy.unpark(tag, Choice(key, tag))

    def _verdict(self, route: Route, head: RequestHead) -> Verdict:
        """``head`` at the same-node pod of ``route``, admitted as its destination admits it:
        through a ``RequestAdmission`` kept per endpoint and snapshot (as ``http_outbound``'s
        ``_verdict_here``), which works out per state version whether any policy bears on
        the pod, instead of a ``Request``, log text and ``Decision`` per call."""
        assert route.target is not None
        kept = self._admissions.get(id(route))
        if kept is None or kept[0] is not route:
            request = AuthzRequest(self.src_ip, route.ip, route.port, self.record.source_identity)
            where = f"{self.where} @{route.ip}:{route.port}"
            kept = (route, RequestAdmission(self.outbound.core, request, route.target, where))
            self._admissions[id(route)] = kept
        return kept[1].verdict(head)

    def _route_to(self, key: Endpoint) -> Route:
        """The route to endpoint ``key`` in the current snapshot (kept while it is current:
        every request asks it)."""
        snap = self._snapshot()
        if snap is not self._routes_of:
            self._routes_of, self._route_cache = snap, {}
            self._admissions.clear()
        route = self._route_cache.get(key)
        if route is None:
            route = self.outbound.resolver.endpoint_route(snap, self.source, key.target, key.ip)
            self._route_cache[key] = route
        return route

    def _described(self, route: Route) -> ConnectionRecord:
        """The session's record pointed at ``route``."""
        rec = self.record.copy()
        self.outbound.describe_route(self.outbound.core.snapshot(), route, rec)
        return rec

    async def serve(self) -> None:
        core = self.outbound.core
        self.conn_id = core.registry.add(self.record, cancel_current_task())
        core.registry.on_drain(self.conn_id, self._drain)
        clean = False
        try:
            self._moved()  # (our SETTINGS wait for the client preface: ``PrefaceSniff``)
            self._resume_client()
            await self._ended
            await self._to_client.idle.wait()  # what the proxy answered last
            clean = True
        except OSError as e:
            log.debug("%s: client side ended: %s", self.where, e)
        finally:
            # Whatever ended the session (also a cancellation), every request still open is
            # reported and its attempt finished, so the Service's counts stay right.
            self._reader.stop()
            self.proxy.receive_client(b"")
            self._report(self.proxy.take_reports())
            if self._timer is not None:
                self._timer.cancel()
            self._idle.cancel()
            self._head.cancel()
            self._to_client.cancel()
            for box in self._to_upstream.values():
                box.cancel()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for uid in list(self._upstreams):
                self._close(uid)
            core.registry.remove(self.conn_id)
            if clean:
                if self.refused:  # discard what the client still sends, so the answer arrives
                    await linger_socket(self.client)
                else:
                    with contextlib.suppress(OSError):
                        self.client.shutdown(socket.SHUT_WR)
                self.client.close()
            else:
                sockets.abort(self.client)

    # -- the client's side: a reader callback ------------------------------------------------
    def _readable(self) -> None:
        try:
            data = self.client.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._end(e)
            return
        self.record.bytes_sent += len(data)
        self._client_read = True  # what goes to the endpoints now leaves now (``_outbox``)
        try:
            self.proxy.receive_client(data)
            self._moved()
        except Exception as e:  # the session's failure, not the event loop's
            self._end(e)
            return
        finally:
            self._client_read = False
        if not data:  # the client is done: so is the session (its open requests reported)
            self._end(None)

    def _resume_client(self) -> None:
        """Read the client again, unless an endpoint is not reading what it sent."""
        if self._reader.active or self._ended.done() or self.proxy.closing:
            return
        if any(box.busy for box in self._to_upstream.values()):
            return
        self._reader.start()

    # -- the endpoints' side -----------------------------------------------------------------
    async def _upstream(self, uid: int, key: Endpoint) -> None:
        """Open the tunnel to endpoint ``key`` for upstream ``uid``; then its bytes are handed
        over as they arrive (``_UpstreamSink``), and this task reads only what could not be
        (the client was not reading), the tunnel's end, and a same-node endpoint's socket.
        Anything else raising here but the session's end (a defect) is ``_broken``: the
        endpoint's calls are answered at once, the session serves on."""
        out, proxy, ip = self.outbound, self.proxy, key.ip
        route = self._route_to(key)
        self._routes[key] = rec = self._described(route)
        self._reached.discard(key)
        # A same-node or unmeshed endpoint is a socket of its own: one descriptor from the
        # process's budget, given back where the socket is closed (``_close``) or never made.
        # A tunnel is a stream of a pooled HBONE connection, not charged here.
        caps = out.core.caps if route.kind != "hbone" else None
        if caps is not None and not caps.take_stream(f"{self.where} via {key}"):  # counted
            self._unpark_waiting(uid, key)
            proxy.upstream_failed(uid, UPSTREAM_OVERFLOW)  # 503 UO, gRPC UNAVAILABLE
            self._moved()
            return
        try:
            timeout = key.connect_timeout or out.core.settings.connect_timeout
            # A same-node endpoint's policy is asked per try (``_admit``).
            opening = out.open(route, rec, self.src_ip, self.conn_id, requests_authorized=True)
            upstream = await asyncio.wait_for(opening, timeout)
        except BaseException as e:
            if caps is not None:
                caps.release_stream()
            if not isinstance(e, Exception):  # cancelled: the session's end
                raise
            if not isinstance(e, (OSError, TunnelError, Refused)):
                self._broken(uid, key, e, UPSTREAM_CONNECT_FAILURE)
                return
            self._unpark_waiting(uid, key)  # to the failed upstream, for the proxy to redo
            cause = None if isinstance(e, Refused) else classify(e)
            if cause is None:  # not the endpoint's failure: its requests end UC
                if not isinstance(e, Refused):
                    out.count_failure(e, route, rec)
                proxy.upstream_failed(uid)
            elif proxy.upstream_unreachable(uid, cause):  # some were not sent elsewhere
                out.count_failure(e, route, rec)
            log.debug("%s: cannot open %s: %r", self.where, key, e)
            self._moved()
            return
        # From here ``_close`` (below, or the session's end) closes it and gives its
        # descriptor back, whatever raises: nothing awaits between the open and this line.
        self._upstreams[uid] = upstream
        broken: Exception | None = None
        lost = UPSTREAM_CONNECT_FAILURE  # until a try may have been sent there
        try:
            self._reached.add(key)
            self._to_upstream[uid] = _outbox(
                upstream,
                self._resume_client,
                lambda e: self._upstream_write_failed(uid, e),
                lambda: self._client_read,
            )
            self._unpark_waiting(uid, key)
            if isinstance(upstream, TunnelStream):
                upstream.deliver_directly(_UpstreamSink(self, uid))
            lost = UPSTREAM_CLOSED
            self._moved()  # the preface and the requests queued meanwhile
            while proxy.upstream_live(uid) and not proxy.closing:
                if self._to_client.busy:  # the client is not reading: neither do we
                    await self._to_client.idle.wait()
                    continue
                data = await _read(upstream)
                self._from_upstream(uid, data)
                if not data:
                    break
        except (OSError, TunnelError) as e:
            log.debug("%s: upstream %s failed: %s", self.where, ip, e)
            proxy.upstream_failed(uid)
            self._moved()
        except Exception as e:  # answered once the upstream is closed (below)
            broken = e
        finally:
            if isinstance(upstream, TunnelStream):
                upstream.deliver_directly(None)
            self._close(uid)
        if broken is not None:
            self._broken(uid, key, broken, lost)

    def _broken(self, uid: int, key: Endpoint, error: Exception, lost: str) -> None:
        """Something unexpected (a defect, not the endpoint's failure nor the session's end)
        broke upstream ``uid``, before its open or after it (then it is closed by now: the
        tries it held are not admitted, so they spend no token of the pod's rate limits).
        Logged once with its cause, and its calls answered now rather than at their timeout
        or the client's leaving: ``lost`` ``UF`` (nothing was sent there yet) answers each
        503 (gRPC ``UNAVAILABLE``), ``UC`` as a lost upstream (502, or a reset once its
        response began; a rule's ``retry`` as for one). The session serves its other calls;
        if answering them fails too, the session ends (its calls reported, the client reset)."""
        log.error("%s: upstream %s failed, its calls answered", self.where, key, exc_info=error)
        try:
            self._unpark_waiting(uid, key)
            self.proxy.upstream_failed(uid, lost)
            self._moved()
        except Exception as e:
            self._end(e)

    def _from_upstream(self, uid: int, data: bytes) -> None:
        if data and not self.record.first_byte:
            self.record.first_byte = time.monotonic()
        self.record.bytes_received += len(data)
        self.proxy.receive_upstream(data, uid)
        self._moved()

    def deliver(self, uid: int, data: bytes) -> int:
        """An endpoint's bytes as the tunnel receives them (no task wakes up for them), unless
        the client is not reading or the session is ending: then its task reads them."""
        proxy = self.proxy
        if proxy.closing or self._to_client.busy or self._ended.done():
            return 0
        if not proxy.upstream_live(uid):
            return 0
        try:
            self._from_upstream(uid, data)
        except Exception as e:  # the session's failure, not the HBONE connection's
            self._end(e)
        return len(data)

    def _upstream_write_failed(self, uid: int, error: Exception) -> None:
        log.debug("%s: upstream send failed: %r", self.where, error)
        self.proxy.upstream_failed(uid)
        self._moved()

    def _close(self, uid: int) -> None:
        box = self._to_upstream.pop(uid, None)
        if box is not None:
            box.cancel()
        upstream = self._upstreams.pop(uid, None)
        if upstream is not None:
            close_upstream(upstream)
            if not isinstance(upstream, TunnelStream) and (caps := self.outbound.core.caps):
                caps.release_stream()  # its descriptor, taken in ``_upstream``
        self._resume_client()  # its outbox no longer holds the client's reads

    # -- both --------------------------------------------------------------------------------
    def _moved(self) -> None:
        """After input (or a timer): open the new upstreams, write what the proxy produced,
        report finished requests, keep the timers, and see whether the proxy is done."""
        proxy = self.proxy
        for uid, key in proxy.take_new_upstreams():
            assert isinstance(key, Endpoint)  # what ``_pick`` names
            self._spawn(self._upstream(uid, key), f"h2-upstream-{key}")
        for uid, box in self._to_upstream.items():
            data = proxy.take_to_upstream(uid)
            if data:
                box.send(data)
                if box.busy:
                    self._reader.stop()  # the endpoint is not reading: neither do we the client
        data = proxy.take_to_client()
        if data:
            self._to_client.send(data)
        reports = proxy.take_reports()
        if reports is not NO_REPORTS:  # most passes finish nothing
            self._report(reports)
        self._arm()
        if proxy.active_streams or proxy.head_started is not None:
            self._idle.busy()
        elif self._idle.since is None and not proxy.closing:
            self._idle.idle(self._idle_timeout())
        started = proxy.head_started
        if started != self._head.started and not proxy.closing:
            self._head.time(started)
        if proxy.closing:
            self._end(None)

    def _spawn(self, work: Coroutine[object, object, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _arm(self) -> None:
        """Keep one timer no later than the soonest timeout or retry (``H2Proxy.next_deadline``).
        A timer armed for a sooner time is kept when that time went away or a later one came
        (a gRPC client's calls each bring a deadline, and most end well before it): it fires,
        ``expire`` finds nothing due and it is armed again at what is due then. So a client
        making calls one after another costs a timer per deadline's length, not a cancel and
        a ``call_later`` per call."""
        at = None if self.proxy.closing else self.proxy.next_deadline()
        if at is None:
            return
        armed = self._timer_at
        if self._timer is not None and armed is not None and armed <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        delay = max(0.0, at - time.monotonic())
        self._timer, self._timer_at = self._loop.call_later(delay, self._expired), at

    def _expired(self) -> None:
        self._timer, self._timer_at = None, None
        self.proxy.expire()
        self._moved()

    def _idle_timeout(self) -> float | None:
        """The dialled Service's ``connectionPool.idleTimeout`` (its TrafficPolicy, now)."""
        if self._service_idle is None:
            self._service_idle = ServiceIdleTimeout(
                self.outbound.http.router.traffic, self.target.service.key
            )
        return self._service_idle.get(self._snapshot())

    def _drain(self) -> None:
        """The agent drains: GOAWAY to the client, its open calls go on (``H2Core.drain``)."""
        self.proxy.drain()
        self._moved()

    def _idle_expired(self) -> None:
        """No stream for the Service's idle timeout: GOAWAY, then closed (``_moved`` ends the
        session once the GOAWAY is written), unless a write to the client still waits."""
        if self._to_client.busy:
            self._idle.again()
        elif self.proxy.idle_close():
            closed(self.outbound.core.registry, self._idle.timeout, self.where)
            self._moved()

    def _report(self, reports: H2Reports) -> None:
        """What the proxy finished (``H2Proxy.take_reports``), reported."""
        completed, dropped, rejections, mirrors = reports
        core = self.outbound.core
        for exchange in completed:
            self._idle.busy()  # a request came and went: the idle period starts again
            own = exchange.flags  # the source's own (DI) are added by ``_finish``
            connection = self._request_connection(exchange)
            if connection.path == "local" and _answered_for_pod(exchange, own):
                # Its destination's flag: a far node's answer reaches the source as a plain
                # response, reported without one.
                exchange.flags = NO_FLAGS
            self._finish(exchange)
            why = None
            if exchange.denied_by is not None or exchange.dry_run:
                # A same-node endpoint's admission (``_admit``): its destination's to report.
                why = (exchange.denied_by or "", exchange.dry_run)
                exchange.denied_by, exchange.dry_run = None, ""
            record = h2_request_record(exchange)
            core.registry.request_done(connection, record, carried_by=self.record)
            key = exchange.upstream
            if connection.path == "local" and key in self._reached:
                # No other proxy saw it: reported as its destination too, from when its try
                # was sent there, without the source's own flags (DI).
                self._report_destination(connection, exchange, record, own, why)
        for tried in dropped:
            connection = self._request_connection(tried)
            if connection.path == "local" and tried.upstream in self._reached:
                # Dropped for a retry: the try its destination answered. With no response
                # head, it answered 502 for a pod that reset or closed (``UR``, ``UC``).
                if not tried.status and tried.flags in (UPSTREAM_RESET, UPSTREAM_CLOSED):
                    tried.status = 502
                self._report_destination(connection, tried, h2_request_record(tried), tried.flags)
        for cause in rejections:
            self.refused = True
            refusal = self.proxy.refusal  # what broke which limit, as HTTP/1.1's line says
            core.registry.http_rejected(cause, f"{self.where}: {refusal}")
        for copy in mirrors:
            self._mirror(copy)

    def _report_destination(
        self,
        connection: ConnectionRecord,
        exchange: H2Exchange,
        record: RequestRecord,
        flags: str,
        why: tuple[str, str] | None = None,
    ) -> None:
        """``record`` of ``exchange`` (its try at a same-node endpoint; ``connection``: the
        source's record pointed there) reported as that endpoint's destination reports it:
        from when the try was sent, with the exchange's own ``flags``, and ``why``: the policy
        that refused it and the dry-run ones that would have (when not already on ``record``)."""
        assert isinstance(exchange.upstream, Endpoint)
        sent = exchange.sent or exchange.started
        record = replace(
            record,
            response_flags=flags,
            duration_ms=max(0.0, (exchange.ended - sent) * 1000),
            started_at=record.started_at + (sent - exchange.started),
        )
        if why is not None:
            record.policy, record.dry_run_policy = why
        service = exchange.upstream.target.service.hostname()
        self.outbound.core.registry.request_done(same_node_destination(connection, service), record)

    # -- mirrors (RequestMirror) -------------------------------------------------------------
    def _mirror(self, copy: H2Mirrored) -> None:
        """Start the copies of a complete request (``HttpOutbound.mirror``)."""
        plan = copy.tag
        if not isinstance(plan, RoutePlan):
            return
        whole, send = copy.body is not None, partial(self._send_copy, copy)
        self.outbound.http.mirror(plan.mirrors, whole, self.source, self.record, self.where, send)

    async def _send_copy(self, copy: H2Mirrored, attempt: MirrorTry) -> None:
        """One copy's HTTP/2 (``MirrorSend``): a fresh tunnel, the request (``:authority``
        suffixed ``-shadow``; a same-node endpoint's policy and rate limits asked first), the
        response read and dropped."""
        assert copy.body is not None
        route = attempt.route
        upstream: Upstream | None = None
        try:
            # conn_id 0: a copy is no connection of the registry (nothing to re-check)
            upstream = await self.outbound.open(
                route, attempt.record, self.src_ip, 0, requests_authorized=True
            )
            attempt.attempts.connected(attempt.ip)
            # A same-node endpoint admits the copy on arrival, as its destination would.
            shadow = shadow_request(copy.head)
            if route.kind == "local" and not self._verdict(route, shadow).allowed:
                attempt.outcome = "denied"
                return
            call = MirrorCall(copy.head, copy.body, copy.trailers)
            try:
                while True:
                    data = call.data_to_send()
                    if data:
                        await _write(upstream, data)
                    if call.done:
                        break
                    call.receive(await _read(upstream))
            finally:
                attempt.status = call.status
            attempt.outcome = "sent" if call.status else "failed"
        except Refused:
            attempt.outcome = "denied"
        finally:
            if upstream is not None:
                close_upstream(upstream)

    def _finish(self, exchange: H2Exchange) -> None:
        plan = exchange.tag
        if isinstance(plan, RoutePlan):
            reset = exchange.flags in ("UC", "UR") and not exchange.first_byte
            plan.finish(exchange.status, exchange.first_byte, reset_before_response=reset)
            exchange.flags = plan.flags(exchange.flags)  # DI for an injected delay

    def _request_connection(self, exchange: H2Exchange) -> ConnectionRecord:
        """The connection record as this request saw it: pointed at its endpoint."""
        if not isinstance(exchange.upstream, Endpoint):
            return self.record
        rec = self._routes.get(exchange.upstream)
        if rec is None:
            return self.record
        out = self.record.copy()  # a tenth of ``dataclasses.replace``'s time
        out.upstream, out.destination_identity = rec.upstream, rec.destination_identity
        out.path = rec.path
        if rec.path == "hbone":
            out.security = SECURITY_MTLS
        return out


def _answered_for_pod(exchange: H2Exchange, flags: str) -> bool:
    """Was a same-node endpoint's request answered as its destination proxy answers it: its
    refusal (``_admit``), or the 502 (gRPC ``UNAVAILABLE``) for its pod that reset or closed
    before the response head (not a refused stream, passed on as it is, nor a reset after
    the head, both the source's own at a far node too)?"""
    if flags in REFUSAL_FLAGS:
        return True
    lost = flags in (UPSTREAM_RESET, UPSTREAM_CLOSED)
    return lost and bool(exchange.status) and not exchange.first_byte


class _UpstreamSink:
    """``Sink`` of one endpoint's tunnel: its bytes to the session, marked with its upstream."""

    __slots__ = ("session", "uid")

    def __init__(self, session: H2SourceSession, uid: int) -> None:
        self.session, self.uid = session, uid

    def send(self, data: bytes, /) -> int:
        return self.session.deliver(self.uid, data)


def _outbox(
    upstream: Upstream,
    on_idle: Callable[[], None],
    on_error: Callable[[Exception], None],
    at_once: Callable[[], bool] = lambda: False,
) -> Outbox:
    """The writes to one endpoint: at once when its tunnel (or socket) takes them. A tunnel's
    bytes are sealed into a TLS record and sent when the loop has run the callbacks ready now
    (``flush_soon``: one record for what several streams wrote in that pass), except while
    ``at_once()`` (the client's read callback, which writes once to each endpoint): then a
    tunnel alone on its HBONE connection goes out in this callback (``write_now``), so a
    call's request does not wait for the rest of the session's pass (its reports, timers:
    6.7 µs at p50 in ``bench_grpc_cpu vip``, one call at a time) and the loop's next
    callbacks; with other streams on the connection it still waits to share their record."""
    if isinstance(upstream, TunnelStream):
        stream = upstream

        def take(data: bytes) -> int:
            # At most what the queue budget lets one write add: the outbox writes the rest.
            return stream.write_some(data) if at_once() else stream.try_write(data)

        return Outbox(take, stream.write, on_idle, on_error)
    loop = asyncio.get_running_loop()
    return Outbox(
        lambda data: try_send(upstream, data),
        lambda data: loop.sock_sendall(upstream, data),
        on_idle,
        on_error,
    )


async def _read(upstream: Upstream) -> bytes:
    if isinstance(upstream, TunnelStream):
        chunk = await upstream.read()
        if chunk is None:
            return b""
        upstream.consumed(len(chunk))
        return chunk
    return await asyncio.get_running_loop().sock_recv(upstream, READ_SIZE)


async def _write(upstream: Upstream, data: bytes) -> None:  # a mirror's copy
    if isinstance(upstream, TunnelStream):
        await upstream.write(data)
    else:
        await asyncio.get_running_loop().sock_sendall(upstream, data)
