"""Inbound HBONE (15008): terminate mTLS, check each CONNECT, authorize, connect as the client.

Per connection: the destination address of the accepted socket names the local workload whose
certificate is served (there is no SNI in HBONE); a connection to an address that is not a meshed
workload of this node is closed before any TLS. The handshake has a deadline (a client that
sends nothing, or trickles, cannot hold a slot), requires a client certificate chained to the
trust bundle in our trust domain, and ALPN ``h2``. The peer's SPIFFE ID is the principal that
authorization sees.

Per stream: ``:authority`` must be the same workload IP the connection was made to (its identity
is the one the client verified) and a port that is not the proxy's own (loop protection) —
else 400; policy must allow — else 401; the pod must accept the connection — else 503. Only then
200, so the client never sends bytes into a connection that will not exist.

Descriptors: each stream's pod socket takes one from the process's budget before the connect
(``count_in``, ``agent.base.conncaps``: the 15008 connection itself is charged only its own),
given back where that socket is closed or was never made; with none left the stream is answered
503 (``global_stream_limit``) and the connection serves its other streams.

Connection limits (``agent.proxy.hbone_limits.InboundLimits``): at most ``max_handshakes`` TLS
handshakes at a time and ``max_connections_per_peer`` connections per peer address (more are
reset before any TLS, so that whoever reaches 15008 cannot exhaust descriptors or tasks); an
established connection PINGs its peer like the client side does and is closed after
``idle_timeout`` without a stream. A request's handler is cancelled when the peer resets the
stream before it was answered, and reports to the codec when it is done (rapid-reset
accounting: ``HboneConnection.request_done``).

The dialled Service: ``nodemesh-service: <namespace>/<name>`` (``hbone.SERVICE_HEADER``) names
the Service the client addressed, so ``destination_service`` is that one and not merely the
first Service selecting the pod. It is used for telemetry labels only, never for policy, and
only when that Service exists and has the pod among its endpoints (``dialled_service``).

The client address: the ``forwarded: for=`` header names the client pod. It is believed only
when the state says that IP belongs to a pod with the peer's identity; otherwise the proxy falls
back to the connection's source address (the peer node), so a workload cannot claim another's IP
to slip through an ``ipBlocks`` rule.

A port declared HTTP/1.1, HTTP/2 or gRPC (``agent.state.protocols``) is not authorized per
connection: the stream is answered 200 and every request inside it is parsed, authorized and
reported by ``agent.proxy.http_inbound`` (HTTP/1.1) or ``agent.proxy.h2inbound`` (h2c, gRPC):
403 or PERMISSION_DENIED for a denied request, the connection keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from functools import partial
from typing import NamedTuple

from agent.base.accepted import peer_of
from agent.base.conncaps import ConnectionCaps, PeerSlots
from agent.identity.tls import PeerIdentityError
from agent.policy.authz import Request
from agent.proxy import hbone_events as ev
from agent.proxy import sockets
from agent.proxy.contexts import ALPN, NoCertificate
from agent.proxy.core import Core
from agent.proxy.h2inbound import H2Session
from agent.proxy.hbone import SERVICE_HEADER, HboneConnection
from agent.proxy.hbone_limits import InboundLimits
from agent.proxy.http_inbound import HttpSession, StreamDownstream
from agent.proxy.records import Registry, cancel_current_task
from agent.proxy.relay import start_tunnel
from agent.proxy.tunnel import HboneProtocol, TunnelError, TunnelStream
from agent.state import Snapshot, Workload
from agent.state.protocols import HTTP, TCP
from agent.telemetry.records import INBOUND, SECURITY_MTLS, ConnectionRecord

log = logging.getLogger(__name__)


class InboundHbone:
    def __init__(self, core: Core) -> None:
        self.core = core
        self._relayed = _Relayed(core)
        self.connections: set[HboneProtocol] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self.limits = InboundLimits()
        self.handshaking = 0
        self.peers = PeerSlots()  # connections handshaking or established, by peer address
        self._idle_timers: dict[HboneProtocol, asyncio.TimerHandle] = {}  # one per connection
        self._idle_since: dict[HboneProtocol, float] = {}  # loop time each went idle
        # What a stream's CONNECT resolves to in the state of ``_facts_version`` (``_facts_of``).
        self._facts: dict[_FactsKey, _Facts] = {}
        self._facts_version = -1

    async def handle(self, sock: socket.socket, local_ip: str | None = None) -> None:
        """Serve one accepted connection; ``local_ip`` overrides ``getsockname()`` (tests)."""
        try:
            peer_ip = peer_of(sock)[0]
            local_ip = local_ip or sock.getsockname()[0]
        except OSError:
            sock.close()
            return
        snap = self.core.snapshot()
        workload = self.core.local_workload(snap, local_ip)
        if workload is None or self.draining:
            key, why = (
                ("draining", "the agent is draining")
                if self.draining
                else ("not_local_workload", "not a meshed workload on this node")
            )
            self.core.registry.reject(key, f"HBONE to {local_ip} from {peer_ip}: {why}")
            sockets.abort(sock)
            return
        if not self._admit(sock, peer_ip, local_ip):
            return
        self.peers.take(peer_ip)
        try:
            await self._serve_connection(
                sock, peer_ip, local_ip, self.core.identity(workload, snap)
            )
        finally:
            self.peers.release(peer_ip)

    def count_in(self, caps: ConnectionCaps) -> None:
        """Charge each stream's pod socket to ``caps`` (``ConnectionCaps.take_stream``): one
        descriptor taken before the connect, given back exactly where that socket is closed
        (``_drop``, ``_closed``) or when the connect failed; a stream the budget has no room
        for is answered 503 and the connection serves on. Before the accept loops start."""
        caps.count_streams()
        self.core.caps = caps  # the h2 source sessions' sockets are charged to it too

    def _drop(self, upstream: socket.socket) -> None:
        """A connected pod socket that will carry no relay: closed, and its descriptor given
        back to the budget."""
        sockets.release(upstream)
        if (caps := self.core.caps) is not None:
            caps.release_stream()

    def _admit(self, sock: socket.socket, peer_ip: str, local_ip: str) -> bool:
        """The handshake and per-peer caps; a refused socket is reset and counted."""
        limits, where = self.limits, f"HBONE to {local_ip} from {peer_ip}"
        if self.handshaking >= limits.max_handshakes:
            why = f"{limits.max_handshakes} TLS handshakes are already in progress"
            self.core.registry.reject("handshake_limit", f"{where}: {why}")
        elif self.peers.at_limit(peer_ip, limits.max_connections_per_peer):
            why = f"{limits.max_connections_per_peer} connections from that peer already"
            self.core.registry.reject(
                "peer_connection_limit",
                f"{where}: {why} (more are counted, not logged, until one of them ends)",
                quiet=not self.peers.first_refusal(peer_ip),
            )
        else:
            return True
        sockets.abort(sock)
        return False

    async def _serve_connection(
        self, sock: socket.socket, peer_ip: str, local_ip: str, identity: str
    ) -> None:
        sockets.keepalive(sock)
        self.handshaking += 1
        try:
            proto = await self._handshake(sock, peer_ip, local_ip, identity)
        finally:
            self.handshaking -= 1
        if proto is None:
            return
        self.connections.add(proto)
        proto.start_keepalive()
        self._arm_idle(proto)
        try:
            await proto.closed
        finally:
            self.connections.discard(proto)
            self._disarm_idle(proto)

    def _arm_idle(self, proto: HboneProtocol) -> None:
        """No stream on ``proto``: close it if none arrives within ``idle_timeout``. The time
        is noted and one timer per connection checks it (``_close_idle``): a connection that
        goes idle after every stream no longer makes a timer at each stream's end and cancels
        it at the next stream's CONNECT (``_busy``)."""
        self._idle_since[proto] = proto.loop.time()
        if proto not in self._idle_timers:
            self._idle_timers[proto] = proto.loop.call_later(
                self.limits.idle_timeout, self._close_idle, proto
            )

    def _busy(self, proto: HboneProtocol) -> None:
        """A stream arrived on ``proto``: not idle (its timer, if any, finds that)."""
        self._idle_since.pop(proto, None)

    def _disarm_idle(self, proto: HboneProtocol) -> None:
        """``proto`` is gone: no timer is left holding it."""
        self._idle_since.pop(proto, None)
        timer = self._idle_timers.pop(proto, None)
        if timer is not None:
            timer.cancel()

    def _close_idle(self, proto: HboneProtocol) -> None:
        del self._idle_timers[proto]
        since = self._idle_since.get(proto)
        if since is None:  # busy again: its next idle arms a timer
            return
        left = since + self.limits.idle_timeout - proto.loop.time()
        if left > 0:  # busy and idle again meanwhile: idle for less than the timeout yet
            self._idle_timers[proto] = proto.loop.call_later(left, self._close_idle, proto)
            return
        del self._idle_since[proto]
        if not proto.streams and proto.transport is not None:
            log.debug("closing an HBONE connection idle for %ss", self.limits.idle_timeout)
            proto.goaway()
            proto.transport.close()

    async def _handshake(
        self, sock: socket.socket, peer_ip: str, local_ip: str, identity: str
    ) -> HboneProtocol | None:
        loop = asyncio.get_running_loop()
        try:
            ctx = await self.core.contexts.server(identity)
        except NoCertificate as e:
            self.core.registry.reject("no_certificate", f"HBONE to {local_ip} from {peer_ip}: {e}")
            sockets.abort(sock)
            return None
        proto = HboneProtocol(
            HboneConnection(
                client_side=False, settings=self.core.settings.hbone, budget=self.core.hbone_budget
            ),
            on_idle=self._arm_idle,
        )
        proto.on_request = lambda p, e: self._spawn(p, e, local_ip, peer_ip)
        timeout = self.core.settings.handshake_timeout
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: proto, sock, ssl=ctx, ssl_handshake_timeout=timeout
            )
        except (ssl.SSLError, PeerIdentityError) as e:
            self.core.registry.reject("tls_handshake_failed", f"from {peer_ip} to {local_ip}: {e}")
            sockets.disown(sock)
            return None
        except (TimeoutError, ConnectionAbortedError):
            # asyncio and uvloop abort a handshake past its deadline with ConnectionAbortedError.
            self.core.registry.reject(
                "handshake_timeout", f"from {peer_ip} to {local_ip}: no TLS handshake in {timeout}s"
            )
            sockets.disown(sock)
            return None
        except (ConnectionError, OSError) as e:
            self.core.registry.reject(
                "tls_handshake_failed", f"from {peer_ip} to {local_ip}: {e!r}"
            )
            sockets.disown(sock)
            return None
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object else None
        if alpn != ALPN:
            self.core.registry.reject(
                "wrong_alpn", f"from {peer_ip}: ALPN {alpn!r}, expected {ALPN!r}"
            )
            transport.abort()
            return None
        return proto

    def _spawn(
        self, proto: HboneProtocol, request: ev.TunnelRequested, local_ip: str, peer_ip: str
    ) -> None:
        self._busy(proto)
        # The protocol's loop, not ``asyncio.create_task`` (which looks the running loop up: a
        # ``getpid`` system call on Python 3.11); the supervision as a ``partial``, no closure.
        task = proto.loop.create_task(
            self._serve(proto, request, local_ip, peer_ip), name=f"hbone-stream-{request.stream_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(partial(self._stream_done, proto=proto, stream_id=request.stream_id))
        stream = proto.streams.get(request.stream_id)
        if stream is not None:
            stream.on_drop = task.cancel  # until answered: see _serve

    def _stream_done(self, task: asyncio.Task[None], proto: HboneProtocol, stream_id: int) -> None:
        """Supervision: a stream handler that failed unexpectedly is logged and its stream reset,
        so the peer is not left waiting and the connection keeps serving other streams."""
        self._tasks.discard(task)
        proto.codec.request_done(stream_id)
        if task.cancelled() or task.exception() is None:
            return
        log.error("HBONE stream %d handler failed", stream_id, exc_info=task.exception())
        stream = proto.streams.get(stream_id)
        if stream is not None:
            proto.finish(stream)

    def _refuse(
        self, proto: HboneProtocol, stream_id: int, status: int, key: str, detail: str
    ) -> None:
        self.core.registry.reject(key, detail)
        self._answer(proto, stream_id, status)

    def _answer(self, proto: HboneProtocol, stream_id: int, status: int) -> None:
        """End a refused stream with ``status`` (the refusal is already counted and logged)."""
        proto.streams.pop(stream_id, None)
        proto.codec.respond(stream_id, status)
        proto.flush()
        proto.stream_closed()

    def _client_ip(
        self, snap: Snapshot, request: ev.TunnelRequested, principal: str, peer_ip: str
    ) -> str:
        claimed = request.forwarded_for
        if claimed is None:
            return peer_ip
        owner = snap.workload_by_ip.get(claimed)
        if owner is not None and self.core.identity(owner, snap) == principal:
            return claimed
        return peer_ip

    def _facts_of(
        self, snap: Snapshot, req: ev.TunnelRequested, principal: str, peer_ip: str
    ) -> _Facts | None:
        """What the state says about a stream's CONNECT: the local workload it targets (None:
        not one), the client's address, the authority, the log prefix, the destination
        identity, the dialled Service, the port's protocol and the ``Request`` that policy
        sees (immutable, made of the key's fields). Kept per state version and per
        what they depend on (``_FactsKey``): streams of the same client to the same pod port,
        the common case on a pooled connection, look nothing up again until the state changes;
        a new version drops them all. Authorization is not kept: it runs for every stream."""
        if snap.version != self._facts_version:
            self._facts.clear()
            self._facts_version = snap.version
        service_claim = req.headers.get(SERVICE_HEADER)
        key = (req.host, req.port, req.forwarded_for, service_claim, principal, peer_ip)
        facts = self._facts.get(key)
        if facts is None:
            workload = self.core.local_workload(snap, req.host)
            if workload is None:
                return None
            authority = req.authority
            client_ip = self._client_ip(snap, req, principal, peer_ip)
            facts = _Facts(
                workload,
                client_ip,
                authority,
                _where(principal, peer_ip, authority),
                self.core.identity(workload, snap),
                dialled_service(snap, service_claim, req.host),
                self.core.protocol(snap, req.host, req.port),
                Request(client_ip, req.host, req.port, principal),
            )
            if len(self._facts) >= _KEPT_FACTS:
                self._facts.clear()
            self._facts[key] = facts
        elif service_claim and not facts.service:  # logged for every stream, as before
            log.debug(
                "CONNECT names Service %r, which does not select %s: ignored",
                service_claim,
                req.host,
            )
        claimed = req.forwarded_for
        if claimed is not None and facts.client_ip != claimed:  # logged for every stream, as before
            log.info(
                "HBONE from %s (%s) claims client %s, which is not its pod: using %s",
                peer_ip,
                principal,
                claimed,
                peer_ip,
            )
        return facts

    async def _serve(
        self, proto: HboneProtocol, req: ev.TunnelRequested, local_ip: str, peer_ip: str
    ) -> None:
        sid = req.stream_id
        try:
            principal = proto.peer_identity()
        except PeerIdentityError as e:
            self._refuse(proto, sid, 401, "peer_identity", f"from {peer_ip}: {e}")
            return
        if req.host != local_ip:
            where = _where(principal, peer_ip, req.authority)
            self._refuse(
                proto, sid, 400, "authority_mismatch", f"{where}: connection was to {local_ip}"
            )
            return
        if req.port in self.core.settings.proxy_ports:
            where = _where(principal, peer_ip, req.authority)
            self._refuse(
                proto, sid, 400, "proxy_port", f"{where}: port {req.port} is the proxy's own"
            )
            return
        snap = self.core.snapshot()
        facts = self._facts_of(snap, req, principal, peer_ip)
        if facts is None:
            where = _where(principal, peer_ip, req.authority)
            self._refuse(
                proto, sid, 400, "not_local_workload", f"{where}: no longer a local meshed pod"
            )
            return
        workload, client_ip, authority, where, destination_identity, service, protocol, request = (
            facts
        )
        record = ConnectionRecord(
            INBOUND,
            client_ip,
            authority,
            source_identity=principal,
            destination_identity=destination_identity,
            security=SECURITY_MTLS,
            path="hbone",
            service=service,
        )
        http = protocol != TCP
        allowed = http or self.core.authorize(request, workload, where, snap, unregistered=record)
        if not allowed:
            self._answer(proto, sid, 401)
            return
        s, caps = self.core.settings, self.core.caps
        if caps is not None and not caps.take_stream(where):  # counted and logged there
            self._answer(proto, sid, 503)
            return
        try:
            # A TCP stream's relay takes the connect's poll registration over (``_relay``),
            # if it had to wait for one (``sockets.connect``: mostly it finishes at once).
            upstream = await sockets.connect(
                (req.host, req.port),
                mark=s.mark,
                timeout=s.connect_timeout,
                source_ip=client_ip,
                hold_reader=not http,
                loop=proto.loop,
            )
        except BaseException as e:  # no socket: its descriptor back (a cancel, the drain too)
            if caps is not None:
                caps.release_stream()
            if not isinstance(e, (OSError, TimeoutError)):
                raise
            self._refuse(proto, sid, 503, "upstream_unreachable", f"{where}: {e!r}")
            return
        try:
            stream = proto.streams.get(sid)
            if stream is None:  # the client gave up meanwhile
                self._drop(upstream)
                return
            if not http and not self._still_allowed(request, workload, where, snap, record):
                self._drop(upstream)
                self._answer(proto, sid, 401)
                return
            stream.on_drop = None  # answered: from now on the relay sees a reset as a read error
            proto.codec.respond(sid, 200)
            proto.flush_soon()
        except BaseException:  # never leave the held reader on a socket nobody will close
            self._drop(upstream)
            raise
        await self._relay(stream, upstream, record, request, workload, protocol=protocol)

    def _still_allowed(
        self,
        request: Request,
        workload: Workload,
        where: str,
        authorized_in: Snapshot,
        record: ConnectionRecord,
    ) -> bool:
        """Authorize again if the state changed while the pod was being dialled. The stream
        joins the registry (``_relay``) only once connected, so a policy change during the
        connect found nothing to re-check; from the registration on, ``recheck`` covers it
        (nothing awaits between this check and the registration)."""
        now = self.core.snapshot()
        if now.version == authorized_in.version:
            return True
        return self.core.authorize(request, workload, where, now, unregistered=record)

    async def _relay(
        self,
        stream: TunnelStream,
        upstream: socket.socket,
        record: ConnectionRecord,
        request: Request,
        workload: Workload,
        *,
        protocol: str,
    ) -> None:
        registry = self.core.registry
        try:
            conn_id = registry.add(record, cancel_current_task(stream.proto.loop))
            if protocol == TCP:
                registry.authorized(conn_id, request, workload)
                registry.leave_task(conn_id)
                done = start_tunnel(
                    upstream, stream, record, self._relayed, outbound=False, reader_held=True
                )
        except BaseException:  # no relay owns the pod socket: nothing else would close it
            self._unrelayed(stream, upstream, record)
            raise
        if protocol == TCP:
            # The relay owns the socket from here: its end (``_Relayed``) closes it and gives
            # its descriptor back; the registry's close (policy re-check) cancels the relay,
            # the drain and a cut HBONE connection end it through the stream.
            registry.hand_over(conn_id, done)
            return
        try:
            kind = HttpSession if protocol == HTTP else H2Session
            session = kind(self.core, StreamDownstream(stream), upstream, record, request, workload)
            try:
                await session.serve()
            finally:
                stream.proto.finish(stream)
        except (OSError, TunnelError) as e:
            log.debug("inbound %s ended: %s", record.destination, e)
        finally:
            _closed(self.core.registry, stream, upstream, conn_id, self.core.caps)

    def _unrelayed(
        self, stream: TunnelStream, upstream: socket.socket, record: ConnectionRecord
    ) -> None:
        """The stream's pod socket was connected and its stream answered 200, but something
        failed before a relay or session owned the socket: the stream reset, the socket
        aborted (and its held reader dropped), its descriptor given back once, the connection
        out of the registry (``record.id`` is set by ``Registry.add`` first; an id not live
        is no-op). The caller's task then fails and is logged (``_stream_done``); the HBONE
        connection serves its other streams."""
        try:
            stream.proto.finish(stream)
            self.core.registry.remove(record.id)
        finally:
            sockets.unpoll(upstream, stream.proto.loop)
            sockets.abort(upstream)
            if (caps := self.core.caps) is not None:
                caps.release_stream()

    def goaway_all(self) -> None:
        self.draining = True
        for proto in list(self.connections):
            proto.goaway()
            if not proto.streams and proto.transport is not None:
                proto.transport.close()


# A stream's CONNECT as the state sees it, by (pod IP, port, claimed client, claimed Service,
# peer's principal, peer's address). At most ``_KEPT_FACTS`` per state version (a peer that
# makes new claims for every stream only refills it), about 0.6 KB each (with its ``Request``).
_FactsKey = tuple[str, int, str | None, str | None, str, str]
_KEPT_FACTS = 256


class _Facts(NamedTuple):
    workload: Workload
    client_ip: str
    authority: str
    where: str  # the log prefix: ``_where``
    destination_identity: str
    service: str
    protocol: str
    request: Request


def _where(principal: str, peer_ip: str, authority: str) -> str:
    """How a stream is named in the log lines about it."""
    return f"{principal} ({peer_ip}) -> {authority}"


class _Relayed:
    """The end of a TCP stream whose relay runs without the stream's task (one for all of
    them: the relay tells it the connection's ends)."""

    __slots__ = ("core",)

    def __init__(self, core: Core) -> None:
        self.core = core

    def relay_ended(
        self,
        done: asyncio.Future[None],
        record: ConnectionRecord,
        upstream: socket.socket,
        stream: socket.socket | TunnelStream,
    ) -> None:
        assert isinstance(stream, TunnelStream)  # ``start_tunnel``'s peer
        error = None if done.cancelled() else done.exception()
        if error is not None and not isinstance(error, (OSError, TunnelError)):
            log.error("HBONE stream %d relay failed", stream.stream_id, exc_info=error)
        elif error is not None:
            log.debug("inbound %s ended: %s", record.destination, error)
        _closed(self.core.registry, stream, upstream, record.id, self.core.caps)


def _closed(
    registry: Registry,
    stream: TunnelStream,
    upstream: socket.socket,
    conn_id: int,
    caps: ConnectionCaps | None,
) -> None:
    """The stream's connection ended: telemetry's close, and the pod's socket closed (reset
    unless the stream ended cleanly on both halves) and its descriptor given back."""
    try:
        registry.remove(conn_id)
    finally:
        if stream.complete:
            upstream.close()
        else:
            sockets.abort(upstream)
        if caps is not None:
            caps.release_stream()


def dialled_service(snap: Snapshot, claimed: str | None, pod_ip: str) -> str:
    """The hostname of the Service ``claimed`` (``namespace/name``) if it has ``pod_ip`` among
    its endpoints, else "" (labels fall back to the pod's first Service). A peer can only
    choose among the Services that really select the pod, and only for labels."""
    if not claimed:
        return ""
    namespace, _, name = claimed.partition("/")
    service = snap.services.get((namespace, name))
    if service is None or not any(e.ip == pod_ip for e in service.endpoints):
        log.debug("CONNECT names Service %r, which does not select %s: ignored", claimed, pod_ip)
        return ""
    return service.hostname()
