"""The node proxy: the three listeners' handlers, the HBONE dialer, and graceful drain.

``NodeProxy.handlers()`` gives, per listener slot, the coroutine that serves one accepted socket
(the contract ``agent.app`` uses for the datapath's listeners); ``serve(listeners)`` runs the
accept loops itself. ``drain(deadline)`` stops accepting, sends GOAWAY on every HBONE connection
(peers open no new streams, open ones finish), waits for live connections to end, and closes
whatever is left when the deadline passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable

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

Handler = Callable[[socket.socket], Awaitable[None]]
OUTBOUND, PLAINTEXT, HBONE = "outbound", "inbound", "hbone"


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
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting: list[asyncio.Task[None]] = []
        self._unsubscribe: Callable[[], None] | None = None

    def handlers(self) -> dict[str, Handler]:
        return {
            OUTBOUND: self.outbound.handle,
            PLAINTEXT: self.plaintext.handle,
            HBONE: self.inbound.handle,
        }

    def start(self) -> None:
        """Follow policy changes (closing live connections they deny)."""
        self._unsubscribe = self.core.watch_policies(asyncio.get_running_loop())

    async def serve(self, listeners: dict[str, socket.socket]) -> None:
        """Accept on each listener (keyed as in ``handlers()``) until ``drain``."""
        self.start()
        handlers = self.handlers()
        self._accepting = [
            asyncio.create_task(self._accept(sock, handlers[slot]), name=f"proxy-accept-{slot}")
            for slot, sock in listeners.items()
        ]
        await asyncio.gather(*self._accepting, return_exceptions=True)

    async def _accept(self, listener: socket.socket, handler: Handler) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as e:
                log.warning("accept failed on %s: %s", listener.getsockname(), e)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            sockets.nodelay(conn)
            self.spawn(handler(conn))

    def spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dial(self, key: PoolKey, on_idle: Callable[[HboneProtocol], None]) -> HboneProtocol:
        s = self.core.settings
        ctx = await self.core.contexts.client(key.source_id, key.destination_id)
        sock = await sockets.connect(
            (key.destination_ip, key.port), mark=s.mark, timeout=s.connect_timeout
        )
        proto = HboneProtocol(HboneConnection(client_side=True, settings=s.hbone), on_idle=on_idle)
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

    async def drain(self, deadline: float) -> None:
        """Stop accepting, GOAWAY, wait up to ``deadline`` seconds, then cut what is left."""
        for task in self._accepting:
            task.cancel()
        if self._unsubscribe:
            self._unsubscribe()
        self.inbound.goaway_all()
        self.pool.goaway_all()
        end = time.monotonic() + deadline
        while self._tasks and time.monotonic() < end:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, end - time.monotonic()))
        left = len(self._tasks)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for proto in self.pool.connections() + list(self.inbound.connections):
            if proto.transport is not None:
                proto.transport.abort()
        log.info("proxy drained (%d connection(s) cut at the deadline)", left)
