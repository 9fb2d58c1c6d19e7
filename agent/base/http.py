"""A minimal asyncio HTTP/1.1 server for the agent's small JSON/text endpoints.

Why not a framework: readiness (15021), metrics (15020) and the admin API (15000) answer a
handful of GETs and two POSTs from probes, Prometheus and the CLI; one request per connection
(``Connection: close``) is all they need. Serving them on the agent's own event loop is the
point: a 200 proves that the loop which moves the traffic is turning, and handlers read the
proxy's live state without locks. Requests are bounded (8 KiB head, no body read, 5 s to send
it), so a slow or hostile client costs one task and a few bytes. So are the answers and the
clients: readiness and metrics listen on the node's addresses, and a client that asked for
``/metrics`` (or the admin API's ``/connections``) and never read held the whole answer for as
long as it stayed connected, so any number of them held any amount. Now an answer must be
taken within the same 5 s, else the connection is aborted with what it still held, and at most
``MAX_CONNECTIONS`` are served at once per server; past that a new one is closed unread
(``refused``, logged at the 1st, 2nd, 4th, 8th ... refusal). Probes, scrapes and the CLI make a
few at once. Both are counted in ``nodemesh_http_server_refusals_total{cause}``
(``connection_limit``, ``answer_not_taken``).

One source address may hold at most ``MAX_PER_SOURCE`` of them (8 of 64) on readiness and
metrics. Why: with the total alone, a client outside the mesh that held 64 idle connections to
15021 made every kubelet probe fail (the agent reported not ready, a DaemonSet rollout stalled)
while the agent served traffic fine. The head timeout alone cannot stop that: the client
reconnects as fast as its connections time out, each costing it one round trip, so the server
stays full whatever the timeout (hyper, ztunnel's HTTP stack, allows 30 s; Envoy's
``request_headers_timeout`` and Go's ``ReadHeaderTimeout`` are off by default). A per-address
limit is what the proxy's own listeners do (``agent.base.conncaps.SourceLimit``, 15006 and 15008
per peer) and nginx's ``limit_conn`` on ``$binary_remote_addr``: one address then holds an
eighth, and the kubelet (from the node's own address) and Prometheus (from its pod's) keep the
rest; starving them takes 8 addresses. Past it a connection is closed unread, counted as
``source_connection_limit`` and logged once while that source stays at its limit
(``conncaps.PeerSlots``, as the proxy's listeners log). The admin API has no such limit
(``per_source=None``): it listens on 127.0.0.1, so every client (the CLI, tap long-polls) is one
address and a per-address limit would only lower the total.

Ports move between agents without a gap during an upgrade: every agent binds with
``SO_REUSEPORT``, so a successor binds while its predecessor still listens, and then attaches a
one-instruction classic BPF program to the port's reuseport group that picks socket 1, the
member that joined last (``newest_wins``). From that moment every new connection (a kubelet probe,
a scrape, the CLI) reaches the successor; the predecessor's socket gets none, so when it closes
there is nothing queued on it to reset. With one member left, index 1 is out of range and the
kernel falls back to its hash, i.e. that member. Tested in
``tests/unit/admin/test_http_handover.py``; the lab test of upgrades probes the ports throughout.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from agent.base.conncaps import PeerSlots
from agent.base.metrics import counter

log = logging.getLogger(__name__)

REFUSALS = counter(
    "nodemesh_http_server_refusals_total",
    "Connections the agent's metrics, readiness and admin servers closed: over their limit "
    "at once, or an answer the client did not take in time",
    ["cause"],
)

HEAD_LIMIT = 8192
REQUEST_TIMEOUT = 5.0  # seconds to send the head, and again to take the answer
MAX_CONNECTIONS = 64  # served at once, per server; more are closed unread
MAX_PER_SOURCE = 8  # of them from one source address (readiness, metrics)
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Response:
    """An answer; a large body may come as ``parts`` (``body`` then empty), written one after
    the other with the loop let run between them, never joined: ``/metrics`` of 1,000 label
    sets is 46 MB, and joining it (then prefixing the head) held the loop about 30 ms each."""

    status: int
    body: bytes
    content_type: str = "application/json"
    parts: tuple[bytes, ...] = ()

    def chunks(self) -> tuple[bytes, ...]:
        """The body in the order it is sent."""
        return self.parts or (self.body,)

    @classmethod
    def json(cls, status: int, value: object) -> Response:
        return cls(status, json.dumps(value, indent=1, default=_plain).encode() + b"\n")


def _plain(value: object) -> object:
    """JSON for the read-only containers the state uses (mapping proxies, frozensets)."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


Handler = Callable[[Request], Response | Awaitable[Response]]

SO_ATTACH_REUSEPORT_CBPF = 51  # <asm-generic/socket.h>; not exported by Python
BPF_RET_K = 0x06  # BPF_RET | BPF_K


def newest_wins(sock: socket.socket) -> None:
    """Make the reuseport group of ``sock`` (bound, listening) send every new connection to
    its newest member (see the module docstring)."""
    program = (ctypes.c_uint8 * 8).from_buffer_copy(struct.pack("HBBI", BPF_RET_K, 0, 0, 1))
    fprog = struct.pack("HxxxxxxP", 1, ctypes.addressof(program))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def parse_request_line(head: bytes) -> Request | None:
    """``GET /path?a=b HTTP/1.1`` → Request; None when the line is not HTTP."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    url = urlsplit(parts[1])
    query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
    return Request(parts[0].upper(), url.path or "/", query)


async def _send(writer: asyncio.StreamWriter, response: Response) -> None:
    """Write ``response``, a part at a time: each ``drain`` lets the loop run while the
    client takes what was written (the caller bounds the whole answer by its timeout)."""
    chunks = response.chunks()
    reason = REASONS.get(response.status, "")
    writer.write(
        f"HTTP/1.1 {response.status} {reason}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {sum(map(len, chunks))}\r\nConnection: close\r\n\r\n".encode()
        + (chunks[0] if len(chunks) == 1 else b"")
    )
    if len(chunks) > 1:
        for chunk in chunks:
            await writer.drain()
            writer.write(chunk)
    await writer.drain()


class HttpServer:
    """Serves ``handler(request)`` on one address; one request per connection, at most
    ``max_connections`` at once and ``per_source`` of them from one source address (None: no
    such limit), each given ``timeout`` seconds to send its head and again to take the answer."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_connections: int = MAX_CONNECTIONS,
        per_source: int | None = MAX_PER_SOURCE,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._max_connections, self._timeout = max_connections, timeout
        self.per_source = per_source  # None: no per-source bookkeeping at all (the admin API)
        self.sources = PeerSlots()  # connections being served per source address
        self.active = 0  # connections being served
        self.refused = 0  # connections closed unread because ``active`` was at the limit
        self.refused_per_source = 0  # ... because their source held ``per_source`` already

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port``; returns the bound port (``port=0`` picks one)."""
        self._server = await asyncio.start_server(
            self._serve, host, port, reuse_address=True, reuse_port=True, limit=HEAD_LIMIT
        )
        for sock in self._server.sockets:
            newest_wins(sock)
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _respond(self, head: bytes) -> Response:
        request = parse_request_line(head)
        if request is None:
            return Response.json(400, {"error": "expected an HTTP/1.x request line"})
        try:
            result = self._handler(request)
            return await result if isinstance(result, Awaitable) else result
        except Exception as e:  # a handler bug must not kill the server: answer 500, log it
            log.exception("%s %s failed", request.method, request.path)
            return Response.json(500, {"error": f"{type(e).__name__}: {e}"})

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= self._max_connections:
            self._refuse(writer)
            return
        source = None
        if self.per_source is not None:
            peer = writer.get_extra_info("peername")  # None if it was reset before this ran
            source = str(peer[0]) if peer else "?"
            if not self.sources.take_within(source, self.per_source):
                self._refuse_source(writer, source, self.per_source)
                return
        self.active += 1
        try:
            await self._exchange(reader, writer)
        finally:
            self.active -= 1
            if source is not None:
                self.sources.release(source)

    def _refuse_source(self, writer: asyncio.StreamWriter, source: str, limit: int) -> None:
        """Closed unread: ``source`` holds its limit already; logged once while it stays there."""
        self.refused_per_source += 1
        REFUSALS.labels(cause="source_connection_limit").inc()
        if self.sources.first_refusal(source):
            log.warning(
                "HTTP server on port %s: %d connections from %s at once, the limit per source "
                "address; its new ones are closed unread (counted, not logged, until one ends)",
                writer.get_extra_info("sockname", ("", "?"))[1],
                limit,
                source,
            )
        writer.transport.abort()

    def _refuse(self, writer: asyncio.StreamWriter) -> None:
        self.refused += 1
        REFUSALS.labels(cause="connection_limit").inc()
        if self.refused & (self.refused - 1) == 0:  # the 1st, 2nd, 4th ...: a flood logs little
            log.warning(
                "HTTP server on port %s: %d connections at once, the limit; a new one was "
                "closed unread (%d so far)",
                writer.get_extra_info("sockname", ("", "?"))[1],
                self._max_connections,
                self.refused,
            )
        writer.transport.abort()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head: bytes | None = None
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._timeout)
            response = await self._respond(head)
            await asyncio.wait_for(_send(writer, response), self._timeout)
        except TimeoutError:
            if head is not None:  # the answer was not taken (an unsent head is no refusal)
                REFUSALS.labels(cause="answer_not_taken").inc()
            writer.transport.abort()  # ``close`` would go on holding the answer to flush it
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
