"""The node proxy as a component of ``nodemesh agent`` (see ``agent.app``).

It serves the three listeners (``handle(conn, listener)``), follows policy changes from its
``start`` on, and drains in two steps: ``begin_drain`` when the agent stops accepting (GOAWAY on
every HBONE connection, so peers stop opening streams here and idle tunnels close now instead of
holding the drain for their idle timeout), then ``stop`` after the agent's drain deadline (cuts
whatever is left).
"""

from __future__ import annotations

import socket

from agent.datapath.layout import Listener
from agent.proxy import sockets
from agent.proxy.server import HBONE, OUTBOUND, PLAINTEXT, NodeProxy

_SLOTS = {Listener.OUTBOUND: OUTBOUND, Listener.INBOUND: PLAINTEXT, Listener.HBONE: HBONE}


class ProxyComponent:
    name = "proxy"

    def __init__(self, proxy: NodeProxy) -> None:
        self.proxy = proxy
        self._handlers = self.proxy.handlers()

    async def handle(self, conn: socket.socket, listener: Listener) -> None:
        sockets.nodelay(conn)
        await self._handlers[_SLOTS[listener]](conn)

    async def start(self) -> None:
        self.proxy.start()

    def not_ready(self) -> list[str]:
        return []

    def begin_drain(self) -> None:
        self.proxy.inbound.goaway_all()
        self.proxy.pool.goaway_all()

    async def stop(self) -> None:
        await self.proxy.drain(0.0)
