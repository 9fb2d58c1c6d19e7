"""Outbound connections to a Service VIP, under the Service's traffic control (issue 9).

The decisions are sans-IO (``agent.policy.traffic``); this module performs them for one client
connection: admission (connection limits: over the limit the client is reset at once and the
reason counted), injected faults (sleep, or reset/close the client), then attempts: each picks an
endpoint, opens it through ``Outbound.open`` (HBONE, same-node or passthrough, exactly as for a
pod addressed directly) within the per-try timeout cut to the overall connect deadline, and on a
retryable failure tries another endpoint while the attempts and the retry budget last. Only the
last failure is counted as the connection's rejection; earlier ones are traffic-control events.
Once connected, the relay runs under the Service's idle timeout, and a reset before any byte came
back counts against the endpoint (outlier detection).

How a failure is classified (the TrafficPolicy's ``retryOn`` values): ``refused`` for a TCP
refusal of a same-node or passthrough endpoint and for an HBONE 503 (the far node could not
connect to the pod); ``connect-failure`` for a timeout, an unreachable network or a tunnel that
failed; a policy denial (HBONE 401) or another HTTP status is final and never held against the
endpoint. Bytes the client sent cannot be replayed, so a connection that failed after connecting
is not retried; its reset still counts toward ejecting the endpoint.

The relay runs in the connection's task, so the task closes the upstream once it is done with it,
however that ended (``_release`` when something raised: also before the relay or the
per-request session owned it; the stream is then reset, the socket closed, the client reset).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING

from agent.policy.traffic.attempts import CONNECT_FAILURE, REFUSED, Attempts
from agent.policy.traffic.config import TrafficConfig
from agent.policy.traffic.control import TrafficControl
from agent.policy.traffic.service import Rejected
from agent.proxy import sockets, trafficmetrics
from agent.proxy.records import Refused, cancel_current_task
from agent.proxy.resolve import Route, ServiceTarget
from agent.proxy.samenode import serve_requests, served_record
from agent.proxy.tunnel import TunnelError, TunnelStream, close_upstream
from agent.state import Snapshot, Workload
from agent.state.protocols import TCP
from agent.telemetry.records import ConnectionRecord

if TYPE_CHECKING:
    from agent.proxy.outbound import Outbound, Upstream

log = logging.getLogger(__name__)


class IdleTimeout(OSError):
    """No byte in either direction for the Service's idle timeout."""


def classify(error: BaseException) -> str | None:
    """The retryOn cause of a failed open, or None when it is not the endpoint's failure."""
    if isinstance(error, TunnelError):
        if error.status == 503:
            return REFUSED
        return CONNECT_FAILURE if error.status == 0 else None
    if isinstance(error, ConnectionRefusedError):
        return REFUSED
    return CONNECT_FAILURE if isinstance(error, OSError) else None


def _release(upstream: Upstream) -> None:
    """A connection's upstream after something raised once it was open (``_serve``): the
    relay or the per-request session that would own it included, or the relay's own failure.
    Its tunnel's stream finished, reset unless both halves ended (the pooled HBONE connection
    serves on; a relay that ran finished it already, so this is a look-up then), or its
    socket's poll registrations dropped (a relay that failed half-made may have left some)
    and the socket closed. When the relay or session ended well, ``_serve`` only closes the
    socket (a tunnel relay's end finished its stream): about 1.7k instructions per connection
    fewer than calling this (callgrind)."""
    if not isinstance(upstream, TunnelStream):
        sockets.unpoll(upstream)
    close_upstream(upstream)


def _is_reset(error: BaseException) -> bool:
    return isinstance(error, ConnectionResetError | BrokenPipeError | TunnelError)


class BalancedOutbound:
    def __init__(self, outbound: Outbound) -> None:
        self.outbound = outbound
        timeout = outbound.core.settings.connect_timeout
        self.traffic = TrafficControl(
            defaults=TrafficConfig(connect_timeout=timeout, per_try_timeout=timeout),
            observer=trafficmetrics.observe,
        )

    async def handle(
        self,
        client: socket.socket,
        snap: Snapshot,
        source: Workload | None,
        target: ServiceTarget,
        src: str,
    ) -> None:
        core = self.outbound.core
        traffic = self.traffic.service(snap, target.service)
        src_ip = src.rsplit(":", 1)[0]
        try:
            attempts = traffic.admit(src_ip, source.labels if source else None, (core.node, None))
        except Rejected as e:
            core.registry.reject(e.reason, f"{src} -> {target.vip}:{target.port.port}: {e}")
            sockets.abort(client)
            return
        outcome = _Outcome()
        try:
            if attempts.fault.delay:
                await asyncio.sleep(attempts.fault.delay)
            if self._abort(client, attempts, src, target, outcome) is None:
                await self._serve(client, snap, source, target, src, attempts, outcome)
        finally:
            first_byte = outcome.record.first_byte if outcome.record is not None else 0.0
            attempts.finish(reset_before_data=outcome.reset_before_data, first_byte_at=first_byte)
            if outcome.conn_id:
                core.registry.remove(outcome.conn_id)
            if outcome.clean:
                client.close()
            elif not outcome.client_closed:
                sockets.unpoll(client)  # a relay that failed half-made may poll it
                sockets.abort(client)

    def _abort(
        self,
        client: socket.socket,
        attempts: Attempts,
        src: str,
        target: ServiceTarget,
        outcome: _Outcome,
    ) -> str | None:
        """Apply an injected abort (counted); the abort mode, or None to go on."""
        mode = attempts.fault.abort
        if mode is not None:
            where = f"{src} -> {target.vip}:{target.port.port}"
            self.outbound.core.registry.reject("fault_abort", f"{where}: injected {mode}")
            if mode == "REFUSE":
                client.close()
                outcome.client_closed = True
        return mode

    async def _serve(
        self,
        client: socket.socket,
        snap: Snapshot,
        source: Workload | None,
        target: ServiceTarget,
        src: str,
        attempts: Attempts,
        outcome: _Outcome,
    ) -> None:
        out = self.outbound
        src_ip = src.rsplit(":", 1)[0]
        try:
            while (ip := attempts.next_endpoint()) is not None:
                route = out.resolver.endpoint_route(snap, source, target, ip)
                record = self._record(snap, route, src, target, outcome)
                protocol = TCP
                if route.kind == "local":
                    protocol = out.core.protocol(snap, route.ip, route.port)
                upstream = await self._attempt(
                    route, record, src_ip, attempts, outcome, requests_authorized=protocol != TCP
                )
                if upstream is None:
                    continue
                try:
                    attempts.connected(route.ip)
                    if protocol != TCP:
                        assert isinstance(upstream, socket.socket)  # a local route: a socket
                        await self._serve_requests(
                            client, upstream, record, route, target, protocol
                        )
                    else:
                        try:
                            await self._relay(client, upstream, record, attempts)
                        except (OSError, TunnelError) as e:
                            outcome.reset_before_data = record.bytes_received == 0 and _is_reset(e)
                            raise
                except BaseException:
                    _release(upstream)
                    raise
                if not isinstance(upstream, TunnelStream):  # the relay's end finished a stream
                    upstream.close()
                outcome.clean = True
                return
            out.core.registry.reject(
                "no_endpoints", f"{src} -> {target.vip}:{target.port.port}: no endpoint left"
            )
        except (OSError, TunnelError, Refused) as e:
            log.debug("outbound %s -> %s:%d ended: %s", src, target.vip, target.port.port, e)

    def _record(
        self, snap: Snapshot, route: Route, src: str, target: ServiceTarget, outcome: _Outcome
    ) -> ConnectionRecord:
        out = self.outbound
        if outcome.record is None:
            destination = f"{target.vip}:{target.port.port}"
            outcome.record = out.record(snap, route, src, destination)
            outcome.conn_id = out.core.registry.add(outcome.record, cancel_current_task())
        else:
            out.describe_route(snap, route, outcome.record)
        return outcome.record

    async def _serve_requests(
        self,
        client: socket.socket,
        upstream: socket.socket,
        record: ConnectionRecord,
        route: Route,
        target: ServiceTarget,
        protocol: str,
    ) -> None:
        """Serve a connection to a same-node endpoint whose pod port is declared HTTP (the
        Service port is not) request by request, as the endpoint's node would if the client
        were on another node: its L7 policy and rate limits per request, each request reported
        by both reporters (``samenode``). The destination's record (named after the Service,
        as the CONNECT would name it) is registered beside the source's for the connection's
        life, as the two nodes would each hold one. The session counts bytes on the
        destination's record; the source's takes its totals at the end (its TCP metrics, the
        balancer's time to first byte)."""
        registry = self.outbound.core.registry
        served = served_record(record, target.service.hostname(), protocol)
        served_id = registry.add(served, cancel_current_task())
        try:
            await serve_requests(self.outbound, client, upstream, record, served, route, protocol)
        finally:
            record.bytes_sent, record.bytes_received = served.bytes_sent, served.bytes_received
            record.first_byte = served.first_byte
            registry.remove(served_id)

    async def _attempt(
        self,
        route: Route,
        record: ConnectionRecord,
        src_ip: str,
        attempts: Attempts,
        outcome: _Outcome,
        *,
        requests_authorized: bool = False,
    ) -> Upstream | None:
        """One attempt: the upstream, None to retry, or raises (counted) to give up.
        ``requests_authorized``: the caller authorizes each request (``_serve_requests``)."""
        opening = self.outbound.open(
            route, record, src_ip, outcome.conn_id, requests_authorized=requests_authorized
        )
        try:
            upstream = await asyncio.wait_for(opening, attempts.try_timeout())
        except (OSError, TunnelError) as e:
            cause = classify(e)
            if cause is not None:
                attempts.failed(route.ip, cause)
                if attempts.may_retry(cause):
                    log.debug("%s: retrying after %s from %s", record.source, cause, route.ip)
                    return None
            self.outbound.count_failure(e, route, record)
            raise
        return upstream  # ``_serve`` tells ``attempts`` it connected

    async def _relay(
        self,
        client: socket.socket,
        upstream: Upstream,
        record: ConnectionRecord,
        attempts: Attempts,
    ) -> None:
        idle = attempts.service.config.idle_timeout
        if idle is None:
            await self.outbound.relay(client, upstream, record)
            return
        relay = asyncio.ensure_future(self.outbound.relay(client, upstream, record))
        loop = asyncio.get_running_loop()
        seen, quiet_since = -1, loop.time()
        try:
            while True:
                done, _ = await asyncio.wait({relay}, timeout=idle / 4)
                if done:
                    relay.result()
                    return
                total, now = record.bytes_sent + record.bytes_received, loop.time()
                if total != seen:
                    seen, quiet_since = total, now
                elif now - quiet_since >= idle:
                    self.outbound.core.registry.reject(
                        "idle_timeout", f"{record.source} -> {record.destination}: idle {idle}s"
                    )
                    raise IdleTimeout(f"no traffic for {idle}s")
        finally:
            if not relay.done():
                relay.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError, TunnelError):
                    await relay


class _Outcome:
    """What the finally block of one Service connection must know."""

    def __init__(self) -> None:
        self.record: ConnectionRecord | None = None
        self.conn_id = 0
        self.clean = False
        self.client_closed = False
        self.reset_before_data = False
