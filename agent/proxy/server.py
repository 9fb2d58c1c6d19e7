"""The node proxy: the three listeners' handlers, the HBONE dialer, and graceful drain.

``NodeProxy.handlers()`` gives, per listener, the coroutine that serves one accepted socket; the
agent owns the listeners, the accept loops and the connections' tasks (``agent.app``). Drain
has two steps because the agent's has: ``begin_drain`` when it stops accepting sends GOAWAY on
every HBONE connection (peers open no new streams here, open ones finish, idle tunnels close now
instead of holding the drain for their idle timeout); ``close`` after the drain deadline cuts
whatever HBONE connection is still open.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from agent.base.conncaps import ConnectionCaps
from agent.base.constants import Listener
from agent.proxy import sockets
from agent.proxy.contexts import ALPN
from agent.proxy.core import Core
from agent.proxy.hbone import HboneConnection
from agent.proxy.inbound import InboundHbone
from agent.proxy.outbound import Outbound
from agent.proxy.plaintext import InboundPlaintext
from agent.proxy.pool import HbonePool, PoolKey
from agent.proxy.tunnel import HboneProtocol, TunnelError

log = logging.getLogger(__name__)

# A handler returns the future a connection goes on in once its task ended (a relay's), or None.
Handler = Callable[[socket.socket], Awaitable[asyncio.Future[None] | None]]


class NodeProxy:
    """The listeners' paths over one ``Core``; the core carries node, state, identities and
    settings, so they are given once, where they are used, and not threaded through here."""

    def __init__(self, core: Core) -> None:
        self.core = core
        s = core.settings
        self.pool = HbonePool(self._dial, idle_timeout=s.pool_idle_timeout)
        self.outbound = Outbound(self.core, self.pool)
        self.inbound = InboundHbone(self.core)
        self.plaintext = InboundPlaintext(self.core)
        self._unsubscribe: Callable[[], None] | None = None

    def handlers(self) -> dict[Listener, Handler]:
        return {
            Listener.OUTBOUND: self.outbound.handle,
            Listener.INBOUND: self.plaintext.handle,
            Listener.HBONE: self.inbound.handle,
        }

    def count_in(self, caps: ConnectionCaps) -> None:
        """Charge to ``caps`` the sockets a connection opens beyond its own upstream: each
        inbound HBONE stream's pod socket (``InboundHbone.count_in``) and each socket an h2
        source session opens to an endpoint (``H2SourceSession._upstream``). Before the accept
        loops start."""
        self.inbound.count_in(caps)  # ``core.caps``, which the h2 source sessions read too

    def start(self) -> None:
        """Follow policy changes (closing live connections they deny)."""
        self._unsubscribe = self.core.watch_policies(asyncio.get_running_loop())

    async def _dial(self, key: PoolKey, on_idle: Callable[[HboneProtocol], None]) -> HboneProtocol:
        s = self.core.settings
        ctx = await self.core.contexts.client(key.source_id, key.destination_id)
        sock = await sockets.connect(
            (key.destination_ip, key.port), mark=s.mark, timeout=s.connect_timeout
        )
        codec = HboneConnection(client_side=True, settings=s.hbone, budget=self.core.hbone_budget)
        proto = HboneProtocol(codec, on_idle=on_idle)
        try:
            transport, _ = await asyncio.get_running_loop().create_connection(
                lambda: proto,
                sock=sock,
                ssl=ctx,
                server_hostname="",
                ssl_handshake_timeout=s.handshake_timeout,
            )
        except BaseException:
            sockets.disown(sock)  # the loop closed it (see sockets.disown)
            raise
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN:
            transport.abort()
            raise TunnelError(f"{key.destination_ip}:{key.port} did not negotiate ALPN {ALPN!r}")
        proto.start_keepalive()
        return proto

    def begin_drain(self) -> None:
        """GOAWAY on every HBONE connection, both directions, and to every HTTP/2 client of a
        session here (source or destination: ``H2Core.drain``); idle HTTP upstream sessions
        are closed (their streams would otherwise keep the connections from draining)."""
        self.outbound.http.sessions.close_all()
        self.core.registry.drain()
        self.inbound.goaway_all()
        self.pool.goaway_all()

    def close(self) -> None:
        """Stop following policy changes and cut every HBONE connection still open."""
        if self._unsubscribe:
            self._unsubscribe()
            self._unsubscribe = None
        cut = 0
        for proto in self.pool.connections() + list(self.inbound.connections):
            if proto.transport is not None:
                proto.transport.abort()
                cut += 1
        log.info("proxy closed (%d HBONE connection(s) cut)", cut)
