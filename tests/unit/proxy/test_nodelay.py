"""Every TCP socket the node proxy relays on sends without Nagle: the accepted sockets of all
three listeners (outbound, plaintext inbound, HBONE) and every socket it opens (pods, peer
nodes' HBONE), so a small response never waits for the peer's delayed ACK. The same sockets
bound what their send queue holds unsent (``TCP_NOTSENT_LOWAT``: ``sockets.limit_unsent``)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast

import pytest

from agent.base.constants import Listener
from agent.proxy import sockets
from agent.proxy.component import ProxyComponent
from agent.proxy.server import NodeProxy


def options(sock: socket.socket) -> tuple[int, int]:
    """(TCP_NODELAY, TCP_NOTSENT_LOWAT) of ``sock``."""
    nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    return nodelay, sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)


class _Proxy:
    def __init__(self) -> None:
        self.seen: list[tuple[Listener, int, int]] = []

    def handlers(self) -> dict[Listener, Any]:
        def handler(listener: Listener) -> Any:
            async def handle(conn: socket.socket) -> None:
                self.seen.append((listener, *options(conn)))

            return handle

        return {listener: handler(listener) for listener in Listener}


@pytest.mark.parametrize("listener", list(Listener))
def test_accepted_sockets_of_every_listener(listener: Listener) -> None:
    proxy = _Proxy()
    component = ProxyComponent(cast(NodeProxy, proxy))
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with client, conn:
            assert options(conn) == (0, 0)
            asyncio.run(component.handle(conn, listener))
    assert proxy.seen == [(listener, 1, sockets.UNSENT_LOWAT)]


def test_sockets_the_proxy_opens() -> None:
    with sockets.upstream_socket(0) as sock:
        assert options(sock) == (1, sockets.UNSENT_LOWAT)
