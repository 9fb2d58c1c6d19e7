"""Outbound (15001): connections the capture took from a meshed pod.

The original destination is the accepted socket's local address (transparent listener). It is
resolved in the state (``resolve``): to a meshed pod on another node the bytes go through an
HBONE tunnel that presents the *source pod's* certificate and accepts only the destination pod's
identity; to a meshed pod on this node they never leave the node, so there is no TLS, but the
destination's policies are enforced here and the connection is made with the client pod's IP as
source; anything else is plain TCP passthrough. A refusal closes the client with RST, so the
application sees a failed connection and not a clean end of stream.
"""

from __future__ import annotations

import logging
import socket

from agent.policy.authz import Request
from agent.proxy import sockets
from agent.proxy.core import Core
from agent.proxy.pool import HbonePool, PoolKey
from agent.proxy.records import (
    OUTBOUND,
    SECURITY_MTLS,
    ConnectionRecord,
    Refused,
    cancel_current_task,
)
from agent.proxy.relay import relay_sockets, relay_tunnel
from agent.proxy.resolve import NoEndpoints, Resolver, Route
from agent.proxy.tunnel import TunnelError

log = logging.getLogger(__name__)


def _addr(ip: str, port: int) -> str:
    return f"{ip}:{port}"


class Outbound:
    def __init__(self, core: Core, pool: HbonePool) -> None:
        self.core = core
        self.pool = pool
        self.resolver = Resolver(core.node)

    async def handle(
        self, client: socket.socket, original_dst: tuple[str, int] | None = None
    ) -> None:
        """Serve one captured connection; ``original_dst`` overrides ``getsockname()`` (tests)."""
        try:
            src_ip, src_port = client.getpeername()[:2]
            dst_ip, dst_port = original_dst or client.getsockname()[:2]
        except OSError:
            client.close()
            return
        snap = self.core.snapshot()
        try:
            route = self.resolver.resolve(snap, src_ip, dst_ip, dst_port)
        except NoEndpoints as e:
            self.core.registry.reject("no_endpoints", str(e))
            sockets.abort(client)
            return
        record = ConnectionRecord(
            OUTBOUND,
            _addr(src_ip, src_port),
            _addr(dst_ip, dst_port),
            path=route.kind,
            upstream=_addr(route.ip, route.port),
        )
        if route.source is not None:
            record.source_identity = self.core.identity(route.source, snap)
        if route.target is not None and route.kind != "passthrough":
            record.destination_identity = self.core.identity(route.target, snap)
        conn_id = self.core.registry.add(record, cancel_current_task())
        clean = False
        try:
            if route.kind == "hbone":
                await self._hbone(client, route, record, src_ip)
            elif route.kind == "local":
                await self._local(client, route, record, src_ip, conn_id)
            else:
                await self._passthrough(client, route, record)
            clean = True
        except (OSError, TunnelError, Refused) as e:
            log.debug("outbound %s -> %s ended: %s", record.source, record.destination, e)
        finally:
            self.core.registry.remove(conn_id)
            if clean:
                client.close()
            else:
                sockets.abort(client)

    async def _hbone(
        self, client: socket.socket, route: Route, record: ConnectionRecord, src_ip: str
    ) -> None:
        assert record.source_identity and record.destination_identity
        key = PoolKey(
            record.source_identity,
            record.destination_identity,
            route.ip,
            self.core.settings.hbone_port,
        )
        try:
            stream = await self.pool.open(key, _addr(route.ip, route.port), src_ip)
        except TunnelError as e:
            self.core.registry.reject("tunnel_refused", f"{record.destination} via HBONE: {e}")
            raise
        except (OSError, TimeoutError) as e:
            self.core.registry.reject(
                "tunnel_unreachable",
                f"cannot reach {route.ip}:{key.port} for {record.destination}: {e}; is HBONE port "
                f"{key.port} blocked between the nodes (firewall, NetworkPolicy)?",
            )
            raise OSError(str(e)) from e
        record.security = SECURITY_MTLS
        await relay_tunnel(client, stream, record, outbound=True)

    async def _local(
        self,
        client: socket.socket,
        route: Route,
        record: ConnectionRecord,
        src_ip: str,
        conn_id: int,
    ) -> None:
        assert route.target is not None
        if route.port in self.core.settings.proxy_ports:
            self.core.registry.reject("proxy_port", f"{record.destination} is a proxy port")
            raise Refused(record.destination)
        request = Request(src_ip, route.ip, route.port, record.source_identity)
        where = f"{record.source} -> {record.destination} (same node)"
        if not self.core.authorize(request, route.target, where, self.core.snapshot()):
            raise Refused(where)
        self.core.registry.authorized(conn_id, request, route.target)
        upstream = await self._connect(route, record, src_ip)
        try:
            await relay_sockets(client, upstream, record)
        finally:
            upstream.close()

    async def _passthrough(
        self, client: socket.socket, route: Route, record: ConnectionRecord
    ) -> None:
        upstream = await self._connect(route, record, None)
        try:
            await relay_sockets(client, upstream, record)
        finally:
            upstream.close()

    async def _connect(
        self, route: Route, record: ConnectionRecord, source_ip: str | None
    ) -> socket.socket:
        s = self.core.settings
        try:
            return await sockets.connect(
                (route.ip, route.port), mark=s.mark, timeout=s.connect_timeout, source_ip=source_ip
            )
        except (OSError, TimeoutError) as e:
            self.core.registry.reject(
                "upstream_unreachable", f"{record.destination} -> {route.ip}:{route.port}: {e!r}"
            )
            raise OSError(str(e)) from e
