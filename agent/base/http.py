"""A minimal asyncio HTTP/1.1 server for the agent's small JSON/text endpoints.

Why not a framework: readiness (15021), metrics (15020) and the admin API (15000) answer a
handful of GETs and two POSTs from probes, Prometheus and the CLI; one request per connection
(``Connection: close``) is all they need. Serving them on the agent's own event loop is the
point: a 200 proves that the loop which moves the traffic is turning, and handlers read the
proxy's live state without locks. Requests are bounded (8 KiB head, no body read, 5 s to send
it), so a slow or hostile client costs one task and a few bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

HEAD_LIMIT = 8192
REQUEST_TIMEOUT = 5.0
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
    status: int
    body: bytes
    content_type: str = "application/json"

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


def parse_request_line(head: bytes) -> Request | None:
    """``GET /path?a=b HTTP/1.1`` → Request; None when the line is not HTTP."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    url = urlsplit(parts[1])
    query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
    return Request(parts[0].upper(), url.path or "/", query)


class HttpServer:
    """Serves ``handler(request)`` on one address; one request per connection."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port``; returns the bound port (``port=0`` picks one)."""
        self._server = await asyncio.start_server(
            self._serve, host, port, reuse_address=True, limit=HEAD_LIMIT
        )
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
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            response = await self._respond(head)
            reason = REASONS.get(response.status, "")
            writer.write(
                f"HTTP/1.1 {response.status} {reason}\r\n"
                f"Content-Type: {response.content_type}\r\n"
                f"Content-Length: {len(response.body)}\r\nConnection: close\r\n\r\n".encode()
                + response.body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass
        finally:
            writer.close()
