"""The default handler of captured connections: a plain relay to the original destination.

Until the node proxy (``agent.proxy``) takes the listeners over, the agent still has to serve
what the programs capture; dropping it would break meshed pods. This relay connects to the
original destination (``getsockname()`` of the accepted socket) from a socket carrying the
proxy mark, and copies bytes both ways, half-close included. It adds no encryption or policy:
it is passthrough, exactly what the proxy also does for destinations outside the mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from agent.datapath.layout import Listener
from agent.datapath.listeners import marked_socket

log = logging.getLogger(__name__)

CHUNK = 65536


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


class PassthroughRelay:
    """Serves accepted connections of every listener the same way: to the original
    destination (``await relay.handle(sock, listener)`` for each)."""

    def __init__(self, mark: int, connect_timeout: float = 10.0) -> None:
        self.mark = mark
        self.connect_timeout = connect_timeout
        self.active = 0

    async def handle(self, client: socket.socket, listener: Listener) -> None:
        loop = asyncio.get_running_loop()
        dst_ip, dst_port = client.getsockname()[:2]
        upstream = marked_socket(self.mark)
        try:
            await asyncio.wait_for(
                loop.sock_connect(upstream, (dst_ip, dst_port)), self.connect_timeout
            )
        except (OSError, TimeoutError) as e:
            log.info("relay: %s:%d unreachable: %s", dst_ip, dst_port, e)
            upstream.close()
            client.close()
            return
        self.active += 1
        try:
            c_reader, c_writer = await asyncio.open_connection(sock=client)
            u_reader, u_writer = await asyncio.open_connection(sock=upstream)
            await asyncio.gather(_pump(c_reader, u_writer), _pump(u_reader, c_writer))
            for w in (c_writer, u_writer):
                w.close()
                with contextlib.suppress(ConnectionError, OSError):
                    await w.wait_closed()
        finally:
            self.active -= 1
