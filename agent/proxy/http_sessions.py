"""Upstream sessions of the source's HTTP/1.1 path, and the pool that keeps the idle ones.

A request to a Service VIP port declared HTTP travels on an *upstream session*: an HBONE stream
to the chosen endpoint, or a plain TCP connection for an endpoint on this node or one that is
not meshed (``http_outbound``). Sessions are pooled per (path, client IP, endpoint, port,
Service): the client IP is part of the key because the far node authorizes and reports each
stream as that client. A session is reused when both halves of its last exchange completed; at
most ``MAX_IDLE_PER_ENDPOINT`` idle per key and ``MAX_IDLE`` in all are kept, each closed after
``IDLE_TIMEOUT`` unused; one that the far side closed meanwhile is dropped at checkout, never
handed to a request. Kept apart from the shell because the pool has its own life (one sweep
timer per pool, drain) and its own tests, and the shell is large enough without it.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from agent.proxy import sockets
from agent.proxy.http1_codec import DEFAULT_MAX_FIELDS
from agent.proxy.http_outbound_codec import new_upstream
from agent.proxy.httpshell import READ_SIZE, try_send
from agent.proxy.tunnel import TunnelStream

IDLE_TIMEOUT = 30.0  # an unused pooled session is closed after this many seconds
MAX_IDLE_PER_ENDPOINT = 16
MAX_IDLE = 512


class SessionKey(NamedTuple):
    """Which idle sessions may carry a request (a tuple: one is made per request, and a frozen
    dataclass's ``__init__`` cost several times a tuple's)."""

    kind: str  # hbone, local, passthrough
    client_ip: str
    ip: str
    port: int
    service: str  # namespace/name of the Service named on the CONNECT


class UpstreamSession:
    """One upstream connection carrying HTTP/1.1 requests, one at a time: an HBONE stream or a
    TCP socket, with the codec's client half (``UpstreamHalf``) that lives as long as it does."""

    def __init__(
        self,
        key: SessionKey,
        conn: TunnelStream | socket.socket,
        max_fields: int = DEFAULT_MAX_FIELDS,
    ) -> None:
        self.key = key
        self.conn = conn
        # A same-node pod is answered for as its destination proxy would (``direct``).
        self.codec = new_upstream(
            direct=key.kind == "local", peer=key.kind == "hbone", max_fields=max_fields
        )
        self.reusable: bool | None = None  # set when the codec released it

    async def read(self) -> bytes:
        """The next bytes; ``b""`` at the end of stream; raises on a reset."""
        if isinstance(self.conn, TunnelStream):
            chunk = await self.conn.read()
            if chunk is None:
                return b""
            self.conn.consumed(len(chunk))
            return chunk
        return await asyncio.get_running_loop().sock_recv(self.conn, READ_SIZE)

    def try_write(self, data: bytes) -> int:
        """Write what goes out without waiting; how many bytes did (0 also when the connection
        failed: the awaited ``write`` of the rest then raises). On an HBONE connection whose
        only stream this is, the bytes go to the TLS transport now (``write_now``), not in the
        loop's next pass (``flush_soon``): the shell writes a request once per callback, so
        nothing of its could join the record, and what the callback does after the write
        (settling sessions, reporting the exchange before) no longer delays it."""
        conn = self.conn
        if isinstance(conn, TunnelStream):
            # At most what the queue budget lets one write add: the rest waits in the backlog.
            return conn.write_some(data)
        return try_send(conn, data)

    async def write(self, data: bytes) -> None:
        if isinstance(self.conn, TunnelStream):
            await self.conn.write(data)
        else:
            await asyncio.get_running_loop().sock_sendall(self.conn, data)

    def alive(self) -> bool:
        """Still usable while idle: not closed or reset by the far side, nothing unasked."""
        if isinstance(self.conn, TunnelStream):
            return not self.conn.unread
        try:
            self.conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True  # nothing to read: open and quiet
        except OSError:
            return False
        return False  # closed (b"") or bytes nobody asked for

    def close(self) -> None:
        if isinstance(self.conn, TunnelStream):
            self.conn.proto.finish(self.conn)
        else:
            sockets.abort(self.conn)


class SessionPool:
    """Idle upstream sessions by key, bounded and idle-timed-out (see the module docstring).

    One timer per pool, not per idle session: a session is put back and taken again for
    every request, so each keeps the time it went idle and ``_sweep`` closes the expired
    ones at the oldest's expiry (oldest first in each key's order)."""

    def __init__(
        self,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        max_per_key: int = MAX_IDLE_PER_ENDPOINT,
        max_idle: int = MAX_IDLE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.max_per_key = max_per_key
        self.max_idle = max_idle
        self.clock = clock
        self._idle: dict[SessionKey, OrderedDict[UpstreamSession, float]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.size = 0
        self.opened = 0  # sessions ever opened (tests, admin)
        self.draining = False  # the agent drains: sessions are closed, not kept

    def take(self, key: SessionKey) -> UpstreamSession | None:
        """An idle live session for ``key`` (the most recently used), or None."""
        idle = self._idle.get(key)
        while idle:
            session, _since = idle.popitem(last=True)
            self.size -= 1
            if session.alive():
                if not idle:
                    del self._idle[key]
                return session
            session.close()
        self._idle.pop(key, None)
        return None

    def put(self, session: UpstreamSession) -> None:
        """Keep ``session`` for reuse, or close it when over a bound."""
        idle = self._idle.get(session.key)
        if self.draining or self.size >= self.max_idle or (idle and len(idle) >= self.max_per_key):
            session.close()
            return
        if idle is None:  # (not setdefault: that would build a dict for every put)
            idle = self._idle[session.key] = OrderedDict()
        idle[session] = self.clock()
        self.size += 1
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self.idle_timeout, self._sweep)

    def _sweep(self) -> None:
        """Close the sessions idle for ``idle_timeout``; run again at the next one's expiry."""
        self._sweeper = None
        deadline = self.clock() - self.idle_timeout
        oldest: float | None = None
        for key in list(self._idle):
            idle = self._idle[key]
            while idle:
                session, since = next(iter(idle.items()))
                if since > deadline:
                    oldest = since if oldest is None else min(oldest, since)
                    break
                del idle[session]
                self.size -= 1
                session.close()
            if not idle:
                del self._idle[key]
        if oldest is not None:
            delay = max(0.0, oldest + self.idle_timeout - self.clock())
            self._sweeper = asyncio.get_running_loop().call_later(delay, self._sweep)

    def close_all(self) -> None:
        """Drain: close the idle sessions, and every session released from now on."""
        self.draining = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for session in idle:
                session.close()
        self._idle.clear()
        self.size = 0
