"""The HBONE connection pool: streams share TLS connections per (source id, destination id, IP).

Why these rules:

* the key includes the source identity because the client certificate *is* the source's
  identity, and the destination identity because the server's certificate is checked against it;
* a connection carries at most ``max_streams`` (and never more than the peer's
  MAX_CONCURRENT_STREAMS) streams, so one connection's window and one TLS session's CPU are
  shared by a bounded number of flows;
* at most one dial per key is in flight: when a hundred connections start at once they wait for
  that dial and share its connection instead of opening a hundred TLS handshakes (a connect
  storm); a full connection makes the next opener dial one more;
* a connection with no streams for ``idle_timeout`` is closed;
* a CONNECT the peer never processed (refused, or above the last stream id of its GOAWAY: a
  draining agent, e.g. during an upgrade) is opened again on another connection, up to
  ``UNPROCESSED_RETRIES`` times, so a peer's drain never fails a new connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from agent.base.constants import HBONE_PORT
from agent.proxy.tunnel import HboneProtocol, TunnelError, TunnelStream

log = logging.getLogger(__name__)

UNPROCESSED_RETRIES = 3


class PoolKey(NamedTuple):
    """Which connections a stream may share. A tuple, hashed and compared in C: the pool looks
    its key up for every stream opened (a frozen dataclass's ``__hash__`` and ``__eq__`` were
    Python-level calls each time)."""

    source_id: str
    destination_id: str
    destination_ip: str
    port: int = HBONE_PORT


Dial = Callable[[PoolKey, Callable[[HboneProtocol], None]], Awaitable[HboneProtocol]]


class HbonePool:
    def __init__(self, dial: Dial, *, idle_timeout: float = 300.0) -> None:
        self._dial = dial
        self.idle_timeout = idle_timeout
        self._conns: dict[PoolKey, list[HboneProtocol]] = {}
        self._dialing: dict[PoolKey, asyncio.Future[HboneProtocol]] = {}
        self._idle_timers: dict[int, asyncio.TimerHandle] = {}  # at most one per connection
        self._idle_since: dict[int, float] = {}  # loop time each idle connection went idle
        self.dials = 0

    async def open(
        self, key: PoolKey, authority: str, client_ip: str | None, service: str | None = None
    ) -> TunnelStream:
        """A new tunnel stream to ``authority`` through a pooled connection for ``key``;
        ``service`` names the dialled Service on the CONNECT (telemetry labels only)."""
        retries = UNPROCESSED_RETRIES
        while True:
            conn = self._usable(key)
            if conn is not None:
                self._cancel_idle(conn)
                try:
                    return await conn.open(authority, client_ip, service)
                except TunnelError as e:
                    if not e.unprocessed or retries == 0:
                        raise
                    retries -= 1
                    log.debug("HBONE stream to %s not processed (%s): opening it again", key, e)
                    continue
            pending = self._dialing.get(key)
            if pending is not None:
                await asyncio.shield(pending)
                continue
            await self._dial_one(key)

    def _usable(self, key: PoolKey) -> HboneProtocol | None:
        conns = self._conns.get(key)
        if not conns:
            return None
        for c in conns:  # not ``any(...)``: a generator made per stream opened
            if c.closed.done():
                conns[:] = [c for c in conns if not c.closed.done()]
                break
        for c in conns:
            if c.codec.can_open_stream():
                return c
        return None

    async def _dial_one(self, key: PoolKey) -> None:
        fut: asyncio.Future[HboneProtocol] = asyncio.get_running_loop().create_future()
        self._dialing[key] = fut
        try:
            self.dials += 1
            conn = await self._dial(key, self._on_idle)
            self._conns.setdefault(key, []).append(conn)
            fut.set_result(conn)
        except BaseException as e:
            # A dial cancelled by its opener's timeout must not look like cancellation to the
            # other openers waiting for it: they get a connection error they can retry.
            shared = (
                e
                if isinstance(e, Exception)
                else ConnectionAbortedError(
                    f"dial to {key.destination_ip}:{key.port} was cancelled"
                )
            )
            fut.set_exception(shared)
            fut.exception()  # retrieved here; the waiters re-raise it themselves
            raise
        finally:
            del self._dialing[key]

    def _on_idle(self, conn: HboneProtocol) -> None:
        """``conn`` has no stream left: close it once it stayed so for ``idle_timeout``. The
        time is noted and one timer per connection checks it (``_close_idle``): a connection
        that goes idle after every stream (one client connection at a time) no longer makes
        a timer at each stream's end and cancels it at the next stream's open."""
        self._idle_since[id(conn)] = conn.loop.time()
        if id(conn) not in self._idle_timers:
            self._idle_timers[id(conn)] = conn.loop.call_later(
                self.idle_timeout, self._close_idle, conn
            )

    def _cancel_idle(self, conn: HboneProtocol) -> None:
        """A stream opens on ``conn``: it is no longer idle (its timer, if any, finds that)."""
        self._idle_since.pop(id(conn), None)

    def _close_idle(self, conn: HboneProtocol) -> None:
        del self._idle_timers[id(conn)]
        since = self._idle_since.get(id(conn))
        if since is None:  # busy again: its next idle arms a timer
            return
        left = since + self.idle_timeout - conn.loop.time()
        if left > 0:  # busy and idle again meanwhile: idle for less than the timeout yet
            self._idle_timers[id(conn)] = conn.loop.call_later(left, self._close_idle, conn)
            return
        del self._idle_since[id(conn)]
        if not conn.streams and conn.transport is not None:
            log.debug("closing idle HBONE connection")
            conn.goaway()
            conn.transport.close()

    def connections(self) -> list[HboneProtocol]:
        return [c for conns in self._conns.values() for c in conns if not c.closed.done()]

    def goaway_all(self) -> None:
        """Drain: no new streams on existing connections (new opens would dial)."""
        for conn in self.connections():
            conn.goaway()
            if not conn.streams and conn.transport is not None:
                conn.transport.close()
