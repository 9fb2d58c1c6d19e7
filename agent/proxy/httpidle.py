"""The Service's ``connectionPool.idleTimeout`` on client connections the source serves as HTTP.

On an L4 Service port the timeout resets a connection with no byte either way for that long
(``balanced``). On a port declared HTTP/1.1 or HTTP/2 the client's connection carries requests
to many endpoints, and what is idle is the connection *between requests*: as Envoy's
``idle_timeout`` (Istio's ``connectionPool.http.idleTimeout``), it is closed once it has had no
request in flight for the timeout, and never while one is (HTTP/1.1: the keep-alive connection
is closed between two exchanges; HTTP/2: GOAWAY, then closed, when no stream is open). A client
whose connection closed so is expected to open another for its next request, which is what
HTTP clients do with a keep-alive connection the server closed.

``IdleTimer`` is what both source shells (``http_outbound``, ``h2outbound``) share: one
``call_later`` per idle period at most, not one per request. A shell marks the connection busy
(``busy``: a request's first bytes) and idle again (``idle``, when its last request ended); a
request that came and went before the timer fired only moves ``since``, and the timer, when it
fires early, waits for the rest (the ``SessionPool`` sweep works alike). The shell's
``expired`` callback decides: close (``closed`` counts it, as the L4 idle close is counted:
``nodemesh_rejections_total{reason="idle_timeout"}`` and its INFO line) or, when a write to
the client still waits, time another period. ``ServiceIdleTimeout`` is the timeout each idle
period asks for, read from the TrafficPolicy again only when the snapshot changed.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable

from agent.policy.traffic.control import ServiceKey, TrafficControl
from agent.proxy.records import Registry
from agent.state import Snapshot


class IdleTimer:
    """Times one client connection's idle periods (module docstring)."""

    __slots__ = ("_expired", "_handle", "_loop", "since", "timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, expired: Callable[[], None]) -> None:
        self._loop = loop
        self._expired = expired
        self._handle: asyncio.TimerHandle | None = None
        self.since: float | None = None  # loop time the current idle period began; None: busy
        self.timeout: float | None = None

    def idle(self, timeout: float | None) -> None:
        """No request is in flight from now on: expire after ``timeout`` seconds (None: the
        Service has none) unless a request comes first. Callers call it only when ``since``
        is None (the transition), so looking ``timeout`` up costs once per idle period."""
        self.since = self._loop.time()
        self.timeout = timeout
        if timeout is not None and self._handle is None:
            self._arm(timeout)

    def busy(self) -> None:
        """A request began: the connection is not idle (the timer, if armed, finds that)."""
        self.since = None

    def again(self) -> None:
        """The shell could not close at expiry (a write waits): a new idle period starts."""
        self.since = None
        self.idle(self.timeout)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, delay: float) -> None:
        # In a context of its own: ``Registry.reject`` marks the record current in the
        # context it runs in, and the context this was armed from may be another
        # connection's (an HBONE connection's callback finishing a response).
        self._handle = self._loop.call_later(delay, self._fire, context=contextvars.Context())

    def _fire(self) -> None:
        self._handle = None
        since, timeout = self.since, self.timeout
        if since is None or timeout is None:
            return  # busy (``idle`` arms it again), or the Service's timeout was removed
        left = since + timeout - self._loop.time()
        if left > 0:
            self._arm(left)
            return
        self._expired()


def closed(registry: Registry, timeout: float | None, where: str) -> None:
    """Count and log a client connection closed for being idle, as the L4 path does."""
    registry.reject("idle_timeout", f"{where}: idle {timeout:g}s")


class ServiceIdleTimeout:
    """A Service's ``connectionPool.idleTimeout`` as of the current snapshot. Why kept: each
    idle period asks, which is after every request of a client that sends one at a time, and
    the TrafficPolicy's answer changes only with the snapshot."""

    __slots__ = ("_key", "_of", "_timeout", "_traffic")

    def __init__(self, traffic: TrafficControl, key: ServiceKey) -> None:
        self._traffic, self._key = traffic, key
        self._of: Snapshot | None = None
        self._timeout: float | None = None

    def get(self, snap: Snapshot) -> float | None:
        if snap is not self._of:
            self._traffic.update(snap)
            self._of, self._timeout = snap, self._traffic.config_for(self._key).idle_timeout
        return self._timeout
