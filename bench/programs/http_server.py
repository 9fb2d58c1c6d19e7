"""HTTP/1.1 keep-alive server for the HTTP workload: every request is answered ``200`` ``ok``.

Why not ``http.server``: at tens of thousands of requests per second a threaded Python server
would be the bottleneck on every path, and the table would compare the server, not the paths.
This one is an asyncio Protocol on uvloop that frames requests itself (``Framer``: a head ends at
an empty line; a ``Content-Length`` body is skipped) and answers each with the same response, so
its per-request cost is small and identical on every path. It is a load target, not a general
server: a chunked request body is refused with ``501`` and the connection closed (h2load sends
bodiless GETs; the proxy re-frames what it forwards but keeps a bodiless request bodiless).

    python -m bench.programs.http_server --port 8000 --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import cast

import uvloop

from bench.programs import raise_nofile

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
REFUSED = b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
MAX_HEAD = 65536


class FramingError(Exception):
    """A request this server does not take (chunked body, bad length, oversized head)."""


class Framer:
    """Sans-IO request framing: bytes in, the number of complete requests out."""

    def __init__(self) -> None:
        self.buffer = b""
        self.body_left = 0  # bytes of the current request's body still to skip

    def feed(self, data: bytes) -> int:
        self.buffer += data
        done = 0
        while True:
            if self.body_left:
                skipped = min(self.body_left, len(self.buffer))
                self.buffer = self.buffer[skipped:]
                self.body_left -= skipped
                if self.body_left:
                    return done
                done += 1
                continue
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    raise FramingError(f"request head over {MAX_HEAD} bytes")
                return done
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            self.body_left = _body_length(head)
            if not self.body_left:
                done += 1


def _body_length(head: bytes) -> int:
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            raise FramingError("chunked request bodies are not supported by this load target")
        if name == b"content-length":
            try:
                length = int(value.strip())
            except ValueError as e:
                raise FramingError(f"bad Content-Length {value!r}") from e
    return length


class Server(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.framer = Framer()

    def data_received(self, data: bytes) -> None:
        try:
            count = self.framer.feed(data)
        except FramingError:
            self.transport.write(REFUSED)
            self.transport.close()
            return
        if count:
            self.transport.write(RESPONSE * count)

    def eof_received(self) -> bool:
        return False  # close our side too


async def serve(ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(Server, "0.0.0.0", port, backlog=4096, reuse_address=True)
        for port in ports
    ]
    await asyncio.gather(*(server.serve_forever() for server in servers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, action="append", required=True, help="repeatable")
    args = parser.parse_args()
    raise_nofile()
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
