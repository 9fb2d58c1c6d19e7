"""The node proxy as a component of ``nodemesh agent`` (see ``agent.app``).

It serves the three listeners (``handle(conn, listener)``), follows policy changes from its
``start`` on, and drains in the agent's two steps (``NodeProxy.begin_drain``, then
``NodeProxy.close``). It also names what the agent's metrics and admin API read from the proxy,
so that they depend on these few methods and not on the proxy's inner structure.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping

from agent.base.component import Component
from agent.base.constants import Listener
from agent.policy.routes.model import RouteKey
from agent.proxy import sockets
from agent.proxy.records import Registry
from agent.proxy.server import NodeProxy
from agent.proxy.splice import Splicer
from agent.state import Snapshot


class ProxyComponent(Component):
    name = "proxy"

    def __init__(self, proxy: NodeProxy) -> None:
        self.proxy = proxy
        self._handlers = self.proxy.handlers()

    async def handle(self, conn: socket.socket, listener: Listener) -> asyncio.Future[None] | None:
        """Serve ``conn``; a returned future is where it goes on without this task (it owns
        ``conn`` then: see ``agent.app.ConnectionHandler``)."""
        sockets.accepted(conn)
        return await self._handlers[listener](conn)

    def use_splicer(self, splicer: Splicer) -> None:
        """Let the kernel move same-node bytes from now on (the datapath's splice maps)."""
        self.proxy.core.splicer = splicer

    async def start(self) -> None:
        self.proxy.start()

    def begin_drain(self) -> None:
        self.proxy.begin_drain()

    async def stop(self) -> None:
        self.proxy.close()

    # -- what metrics and the admin API read -------------------------------------------------
    @property
    def connections(self) -> Registry:
        """Live connections, rejections and denials; observers are told of each record."""
        return self.proxy.core.registry

    def pool_size(self) -> int:
        """Outbound HBONE connections held in the pool."""
        return len(self.proxy.pool.connections())

    def inbound_tunnels(self) -> int:
        """Inbound HBONE connections from peers."""
        return len(self.proxy.inbound.connections)

    def hbone_budget(self) -> dict[str, int | None]:
        """The HBONE buffer budget: limit, held and promised bytes (``HboneBudget.snapshot``)."""
        return self.proxy.core.hbone_budget.snapshot()

    def routed(self) -> Mapping[tuple[RouteKey, int, str], int]:
        """Requests sent per (route, rule, backend Service) (``HttpRouter.routed``)."""
        return self.proxy.outbound.http.router.routed

    def traffic(self, snap: Snapshot) -> dict[str, object]:
        """Traffic control's view (``TrafficControl.describe``) for the admin API."""
        return self.proxy.outbound.balanced.traffic.describe(snap)
