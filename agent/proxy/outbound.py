"""Outbound (15001): connections the capture took from a meshed pod.

The original destination is the accepted socket's local address (transparent listener). It is
resolved in the state (``resolve``): to a meshed pod on another node the bytes go through an
HBONE tunnel that presents the *source pod's* certificate and accepts only the destination pod's
identity; to a meshed pod on this node they never leave the node, so there is no TLS, but the
destination's policies are enforced here and the connection is made with the client pod's IP as
source (with the same-node splice on, the kernel then moves its bytes: ``agent.proxy.splice``);
anything else is plain TCP passthrough. A connection to a Service VIP is handed to
``balanced`` (traffic control: endpoint choice, limits, retries, faults, splits), which uses the
same ``open``/``relay`` steps once per attempt; on a Service port declared HTTP/1.1 it goes to
``http_outbound`` instead, and on one declared HTTP/2 or gRPC to ``h2outbound``: both terminate
the client's protocol and balance each request (direct pod-IP traffic stays per connection, as
below). Every CONNECT for a Service names it (``nodemesh-service``) so the far node labels its
metrics with the Service the client dialled. A refusal closes the client with RST, so the
application sees a failed connection and not a clean end of stream. How many connections one pod
may hold here at once, and the process on all listeners, is checked before ``handle`` runs, when
the connection is accepted (``agent.base.conncaps``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, NamedTuple

from agent.policy.authz import Request
from agent.proxy import sockets
from agent.proxy.balanced import BalancedOutbound
from agent.proxy.contexts import NoCertificate
from agent.proxy.core import Core, ProxySettings
from agent.proxy.h2outbound import H2SourceSession
from agent.proxy.http_outbound import HttpOutbound
from agent.proxy.pool import HbonePool, PoolKey
from agent.proxy.records import Refused, Registry, cancel_current_task
from agent.proxy.relay import relay_sockets, relay_tunnel, start_sockets, start_tunnel
from agent.proxy.resolve import NoEndpoints, Resolver, Route, looped, node_loopback
from agent.proxy.samenode import serve_same_node_http
from agent.proxy.splice import start_spliced
from agent.proxy.tunnel import TunnelError, TunnelStream
from agent.state import Snapshot
from agent.state.protocols import GRPC, HTTP, HTTP2, TCP, port_protocol
from agent.telemetry.records import OUTBOUND, SECURITY_MTLS, ConnectionRecord

log = logging.getLogger(__name__)

Upstream = socket.socket | TunnelStream


# An HBONE route's pool key, the CONNECT's authority and the dialled Service it names.
_Tunnel = tuple[PoolKey, str, str | None]


class _Kept(NamedTuple):
    """What a pod-IP or passthrough destination resolves to, per (client IP, destination IP,
    port), and what every connection to it would otherwise build again: the record's strings,
    to a pod on another node the tunnel's pool key, authority and Service, and to one on this
    node the ``Request`` its policy sees (immutable, made of the key's fields and the source
    identity). At most ``_KEPT_ROUTES`` per state version (about 0.7 KB each: the route's
    workloads are the snapshot's own)."""

    route: Route
    source_identity: str | None
    destination_identity: str | None
    destination: str  # ``ip:port`` as dialled
    upstream: str  # the record's upstream: ``destination`` itself for a pod IP
    tunnel: _Tunnel | None  # for an HBONE route whose identities are known
    request: Request | None  # for a local route


_KEPT_ROUTES = 1024


class _Expired:
    """A tunnel open's deadline (``Outbound._open_within``): cancels the opening task, and
    remembers it did, so that the cancellation is told apart from any other."""

    __slots__ = ("fired", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.fired = False

    def __call__(self) -> None:
        self.fired = True
        self.task.cancel()


def _upstream(route: Route, destination: str) -> str:
    """The address a record names as ``route``'s upstream: to a pod IP it is the destination,
    one string for both (kept for the record's life)."""
    upstream = _addr(route.ip, route.port)
    return destination if upstream == destination else upstream


def _addr(ip: str, port: int) -> str:
    return f"{ip}:{port}"


class _Relayed:
    """The end of a pod-IP connection whose relay runs without the handler's task (one for
    all of them: the relay tells it the connection's ends)."""

    __slots__ = ("registry",)

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def relay_ended(
        self,
        done: asyncio.Future[None],
        record: ConnectionRecord,
        client: socket.socket,
        upstream: Upstream,
    ) -> None:
        self.registry.remove(record.id)
        if isinstance(upstream, socket.socket):
            upstream.close()
        error = None if done.cancelled() else done.exception()
        if error is None and not done.cancelled():
            client.close()
            return
        sockets.abort(client)
        if error is not None and not isinstance(error, (OSError, TunnelError)):
            log.error("outbound %s relay failed", record.destination, exc_info=error)
        elif error is not None:
            log.debug("outbound %s -> %s ended: %s", record.source, record.destination, error)


class Outbound:
    def __init__(self, core: Core, pool: HbonePool) -> None:
        self.core = core
        self.pool = pool
        self._relayed = _Relayed(core.registry)
        self.resolver = Resolver(core.node)
        # A pod IP's or passthrough destination's route, per client, destination and port, in
        # the state of ``_routes_version`` and with the settings of ``_routes_settings`` (a
        # tunnel's pool key names their HBONE port): ``_resolve``.
        self._routes: dict[tuple[str, str, int], _Kept] = {}
        self._routes_version = -1
        self._routes_settings: ProxySettings | None = None
        # The loop the handlers last ran on (``_loop_now``).
        self._loop: asyncio.AbstractEventLoop | None = None
        self.balanced = BalancedOutbound(self)
        self.http = HttpOutbound(self)

    async def handle(
        self, client: socket.socket, original_dst: tuple[str, int] | None = None
    ) -> asyncio.Future[None] | None:
        """Serve one captured connection; ``original_dst`` overrides ``getsockname()`` (tests).
        A connection to a pod IP is handed to a relay without a task once connected: the
        relay's ``done`` is returned and owns ``client`` from then on (the caller awaits it or
        tracks it for the drain, and closes ``client`` only when None is returned)."""
        addresses = sockets.captured_addresses(client, original_dst)
        if addresses is None:
            return None
        src_ip, src_port, dst_ip, dst_port = addresses
        snap = self.core.snapshot()
        if snap.version != self._routes_version or self.core.settings is not self._routes_settings:
            self._routes.clear()
            self._routes_version = snap.version
            self._routes_settings = self.core.settings
        key = (src_ip, dst_ip, dst_port)
        kept = self._routes.get(key)
        if kept is None:
            kept = await self._resolve(client, snap, key, src_port)
            if kept is None:
                return None
        route = kept.route
        record = ConnectionRecord(  # what ``record`` makes for ``route``, its identities kept
            OUTBOUND,
            _addr(src_ip, src_port),
            kept.destination,
            kept.source_identity,
            kept.destination_identity,
            path=route.kind,
            upstream=kept.upstream,
        )
        if route.kind == "local":
            protocol = self.core.protocol(snap, dst_ip, dst_port)
            if protocol != TCP:  # a declared HTTP port: served per request (``samenode``)
                await serve_same_node_http(self, client, record, route, protocol)
                return None
        loop = self._loop_now()
        close = cancel_current_task(loop)  # the handler's task: ``_open_within`` bounds it
        conn_id = self.core.registry.add(record, close)
        # A socket relay takes the upstream socket's poll handle over from its connect, if it
        # had to wait (see ``sockets.connect``); the splice reads neither socket, and a tunnel
        # has no socket.
        splicing = route.kind == "local" and self.core.splicer is not None
        hold = route.kind != "hbone" and not splicing
        try:
            try:
                task = close if isinstance(close, asyncio.Task) else None
                upstream = await self._open_within(
                    route, record, src_ip, conn_id, hold, task, loop=loop, kept=kept
                )
            except (OSError, TunnelError) as e:
                self.count_failure(e, route, record)
                raise
        except (OSError, TunnelError, Refused) as e:
            log.debug("outbound %s -> %s ended: %s", record.source, record.destination, e)
            self.core.registry.remove(conn_id)
            sockets.abort(client)
            return None
        except BaseException:  # cancelled (policy re-check, drain) while connecting
            self.core.registry.remove(conn_id)
            sockets.abort(client)
            raise
        return self._start(
            client, upstream, record, conn_id, splice=route.kind == "local", loop=loop
        )

    async def _resolve(
        self, client: socket.socket, snap: Snapshot, key: tuple[str, str, int], src_port: int
    ) -> _Kept | None:
        """Where a connection to ``key``'s destination goes and what its record says about
        both ends, kept for the rest of the state version when it is a pod IP or passthrough
        (at most ``_KEPT_ROUTES``: a new version drops them all); None when it went elsewhere
        and is served already (a Service VIP: traffic control or an HTTP layer, per connection;
        a refusal)."""
        src_ip, dst_ip, dst_port = key
        # Never kept (``_routes``): a refused destination is checked again each time.
        why = (
            "its own connection come back"
            if looped(src_ip, dst_ip)
            else "its loopback"
            if node_loopback(snap, dst_ip)
            else None
        )
        if why is not None:
            self.core.registry.reject(
                "own_address",
                f"{_addr(src_ip, src_port)} -> {_addr(dst_ip, dst_port)}: the node itself "
                f"({why}) is never a destination",
            )
            sockets.abort(client)
            return None
        source = self.resolver.source(snap, src_ip)
        try:
            target = self.resolver.service(snap, dst_ip, dst_port)
        except NoEndpoints as e:
            if e.target is not None and port_protocol(e.target.port) == HTTP:
                # An HTTP client is answered 503 (UH) per request, not reset.
                await self.http.handle(client, source, e.target, _addr(src_ip, src_port))
                return None
            if e.target is not None and port_protocol(e.target.port) in (HTTP2, GRPC):
                # Per request too: its routes may send it to other Services (else 503 / UH).
                src = _addr(src_ip, src_port)
                await H2SourceSession(self, client, snap, source, e.target, src).serve()
                return None
            self.core.registry.reject("no_endpoints", str(e))
            sockets.abort(client)
            return None
        if target is not None and port_protocol(target.port) == HTTP:
            await self.http.handle(client, source, target, _addr(src_ip, src_port))
            return None
        if target is not None:
            src = _addr(src_ip, src_port)
            if port_protocol(target.port) in (HTTP2, GRPC):  # per request (``h2outbound``)
                await H2SourceSession(self, client, snap, source, target, src).serve()
                return None
            await self.balanced.handle(client, snap, source, target, src)
            return None
        route = self.resolver.route(snap, source, dst_ip, dst_port)
        destination = _addr(dst_ip, dst_port)
        described = self.record(snap, route, "", destination)
        tunnel = request = None
        if route.kind == "hbone" and described.source_identity and described.destination_identity:
            tunnel = self._tunnel(route, described)
        elif route.kind == "local":
            request = Request(src_ip, route.ip, route.port, described.source_identity)
        kept = _Kept(
            route,
            described.source_identity,
            described.destination_identity,
            destination,
            described.upstream,
            tunnel,
            request,
        )
        if len(self._routes) >= _KEPT_ROUTES:
            self._routes.clear()
        self._routes[key] = kept
        return kept

    def _start(
        self,
        client: socket.socket,
        upstream: Upstream,
        record: ConnectionRecord,
        conn_id: int,
        *,
        splice: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> asyncio.Future[None]:
        """Relay without this task (``relay.start_*``): once a ``start_*`` returned, the
        connection's clean-up is the relay's end (``_Relayed``), and the registry's close
        (policy re-check, drain) cancels the relay. Whatever raises before that (here or in
        the ``start_*``), no relay owns the ends: ``_unrelayed`` closes them, once.
        ``splice``: nothing needs the bytes (an admitted same-node connection), so the kernel
        moves them when the agent runs with the same-node splice. ``loop``: the running loop
        (``handle`` has it), for a socket relay."""
        registry = self.core.registry
        try:
            registry.leave_task(conn_id)
            owner = self._relayed
            if isinstance(upstream, TunnelStream):
                record.security = SECURITY_MTLS
                done = start_tunnel(client, upstream, record, owner, outbound=True)
            elif splice and self.core.splicer is not None:
                done = start_spliced(client, upstream, record, owner, self.core.splicer)
            else:
                done = start_sockets(client, upstream, record, owner, loop)
        except BaseException:
            self._unrelayed(client, upstream, conn_id, loop)
            raise
        registry.hand_over(conn_id, done)
        return done

    def _unrelayed(
        self,
        client: socket.socket,
        upstream: Upstream,
        conn_id: int,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        """The upstream was opened but no relay owns the connection (``_start`` failed): the
        connection out of the registry, a tunnel's stream reset (its pooled HBONE connection
        serves on), the upstream socket and the client closed with RST, each socket's poll
        registrations dropped first (a held reader, ``sockets.connect(hold_reader=True)``, or
        what a relay that failed half-made put there). The caller then raises, and the
        handler's failure is logged once (``acceptor.serve_accepted``, which closes nothing
        more: a closed socket's ``close`` does nothing)."""
        try:
            self.core.registry.remove(conn_id)
        finally:
            try:
                if isinstance(upstream, TunnelStream):
                    upstream.deliver_directly(None)
                    upstream.waker = None
                    upstream.proto.finish(upstream)
                else:
                    sockets.unpoll(upstream, loop)
                    sockets.abort(upstream)
            finally:
                sockets.unpoll(client, loop)
                sockets.abort(client)

    def record(
        self, snap: Snapshot, route: Route, source: str, destination: str
    ) -> ConnectionRecord:
        record = ConnectionRecord(OUTBOUND, source, destination)
        if route.source is not None:
            record.source_identity = self.core.identity(route.source, snap)
        self.describe_route(snap, route, record)
        return record

    def describe_route(self, snap: Snapshot, route: Route, record: ConnectionRecord) -> None:
        """Point ``record`` at ``route`` (again for each attempt of a Service connection)."""
        record.path = route.kind
        record.upstream = _upstream(route, record.destination)
        record.destination_identity = None
        if route.target is not None and route.kind != "passthrough":
            record.destination_identity = self.core.identity(route.target, snap)

    async def _open_within(
        self,
        route: Route,
        record: ConnectionRecord,
        src_ip: str,
        conn_id: int,
        hold: bool,
        task: asyncio.Task[Any] | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        kept: _Kept | None = None,
    ) -> Upstream:
        """``open`` bounded by the agent's connect timeout as a whole: for a tunnel, the dial
        (TCP, TLS) when no pooled connection can take the stream, then the far node's answer
        to the CONNECT. Without the bound, a far node that never answered held the client
        until the HBONE connection's keepalive gave up, long after the client had. (A
        Service's connections are bounded per try by their own traffic policy instead.)
        A pod or passthrough connect awaits nothing but ``sockets.connect``, which its own
        timer bounds by the same limit, so it goes without one (about 4 µs per connection).
        ``hold``: a socket relay starts on the upstream socket before anything awaits.
        ``task``: the task running this, when the caller has it at hand (``handle``: the one
        it registered; each ``asyncio.current_task()`` or ``get_running_loop()`` without a loop
        is a ``getpid`` system call on Python 3.11); else it is looked up. ``loop``, the
        running loop, and ``kept``, what the route keeps: see ``open``.

        The tunnel's bound is a timer that cancels this task (``_Expired``), as
        ``asyncio.timeout`` does, without its context manager: the cancellation it caused
        becomes ``TimeoutError``, any other (policy re-check, drain) stays a cancellation."""
        if route.kind != "hbone":
            return await self.open(
                route, record, src_ip, conn_id, hold_reader=hold, loop=loop, kept=kept
            )
        limit = self.core.settings.connect_timeout
        if task is None:
            task = asyncio.current_task()
            assert task is not None  # a connection's handler task
        cancelling, expired = task.cancelling(), _Expired(task)
        timer = task.get_loop().call_later(limit, expired)
        try:
            return await self.open(route, record, src_ip, conn_id, hold_reader=hold, kept=kept)
        except asyncio.CancelledError:
            if not expired.fired or task.uncancel() > cancelling:
                raise
            cause: TimeoutError | None = None
        except TimeoutError as e:
            cause = e
        finally:
            timer.cancel()
        raise TimeoutError(
            f"not connected within the {limit:g} s connect timeout "
            "(TCP, TLS and the CONNECT's answer)"
        ) from cause

    async def open(
        self,
        route: Route,
        record: ConnectionRecord,
        src_ip: str,
        conn_id: int,
        *,
        requests_authorized: bool = False,
        hold_reader: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
        kept: _Kept | None = None,
    ) -> Upstream:
        """Connect to ``route``'s destination. Raises ``Refused`` (already counted), or
        ``TunnelError``/``OSError``/``TimeoutError`` for the caller to count or retry.
        ``requests_authorized``: the caller authorizes each request it sends to a same-node
        pod (its L7 policy), so only a proxy port is refused here. ``hold_reader``: see
        ``sockets.connect`` (a socket's caller then starts a relay on it before it awaits).
        ``loop``: the running loop, when the caller has it (``sockets.connect``). ``kept``:
        ``route``'s ``_Kept`` (its tunnel, its same-node ``Request``), else they are made."""
        if route.kind == "hbone":
            tunnel = kept.tunnel if kept is not None else None
            key, authority, dialled = tunnel or self._tunnel(route, record)
            return await self.pool.open(key, authority, src_ip, dialled)
        if route.kind == "local":
            request = kept.request if kept is not None else None
            self._authorize_local(route, record, src_ip, conn_id, requests_authorized, request)
        s = self.core.settings
        return await sockets.connect(
            (route.ip, route.port),
            mark=s.mark,
            timeout=s.connect_timeout,
            source_ip=src_ip if route.kind == "local" else None,
            hold_reader=hold_reader,
            loop=loop,
        )

    def _tunnel(self, route: Route, record: ConnectionRecord) -> _Tunnel:
        """An HBONE route's pool key (both identities, the pod's node IP and HBONE port), the
        CONNECT's authority and the dialled Service it names (``namespace/name``)."""
        assert record.source_identity and record.destination_identity
        key = PoolKey(
            record.source_identity,
            record.destination_identity,
            route.ip,
            self.core.settings.hbone_port,
        )
        service = route.service
        dialled = f"{service.namespace}/{service.name}" if service is not None else None
        return key, _addr(route.ip, route.port), dialled

    def _loop_now(self) -> asyncio.AbstractEventLoop:
        """The running loop, kept from the last connection: ``asyncio.current_task(loop)``
        finds this task only in the loop that runs it, so a kept loop is checked for free,
        and looked up again (a ``getpid`` system call on Python 3.11, as every
        ``get_running_loop``) only when it is not the one running."""
        loop = self._loop
        if loop is None or asyncio.current_task(loop) is None:
            self._loop = loop = asyncio.get_running_loop()
        return loop

    def _authorize_local(
        self,
        route: Route,
        record: ConnectionRecord,
        src_ip: str,
        conn_id: int,
        requests_authorized: bool = False,
        request: Request | None = None,
    ) -> None:
        """Refuse a proxy port, and unless ``requests_authorized``, authorize the connection
        (``request``: what policy sees, if the caller kept it)."""
        assert route.target is not None
        if route.port in self.core.settings.proxy_ports:
            self.core.registry.reject("proxy_port", f"{record.destination} is a proxy port")
            raise Refused(record.destination)
        if requests_authorized:
            return
        if request is None:
            request = Request(src_ip, route.ip, route.port, record.source_identity)
        where = f"{record.source} -> {record.destination} (same node)"
        if not self.core.authorize(request, route.target, where, self.core.snapshot()):
            raise Refused(where)
        self.core.registry.authorized(conn_id, request, route.target)

    def count_failure(self, error: BaseException, route: Route, record: ConnectionRecord) -> None:
        """Count and log a failed ``open`` under its reason (the last attempt's, for a Service)."""
        if isinstance(error, NoCertificate):
            self.core.registry.reject("no_certificate", f"{record.destination}: {error}")
        elif route.kind == "hbone" and isinstance(error, TunnelError):
            self.core.registry.reject("tunnel_refused", f"{record.destination} via HBONE: {error}")
        elif route.kind == "hbone":
            port = self.core.settings.hbone_port
            self.core.registry.reject(
                "tunnel_unreachable",
                f"cannot reach {route.ip}:{port} for {record.destination}: {error}; is HBONE port "
                f"{port} blocked between the nodes (firewall, NetworkPolicy)?",
            )
        else:
            self.core.registry.reject(
                "upstream_unreachable",
                f"{record.destination} -> {route.ip}:{route.port}: {error!r}",
            )

    async def relay(
        self, client: socket.socket, upstream: Upstream, record: ConnectionRecord
    ) -> None:
        """Copy both ways until both directions ended (a Service's connection, in its task:
        ``balanced``, which closes the upstream afterwards, however it ended)."""
        if isinstance(upstream, TunnelStream):
            record.security = SECURITY_MTLS
            await relay_tunnel(client, upstream, record, outbound=True)
            return
        await relay_sockets(client, upstream, record)
