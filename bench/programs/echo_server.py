"""Echo server: every byte received is sent back; a half-close is answered with a close.

Serves the request/response, connection-rate, idle-connection and marker clients on one port.
asyncio Protocol on uvloop: no per-connection task or buffer copy, so 10,000 idle connections cost
the server little and its per-request overhead is the same on every path.

    python -m bench.programs.echo_server --port 7000
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import cast

import uvloop

from bench.programs import raise_nofile


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close our side too


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "0.0.0.0", port, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    raise_nofile()
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
