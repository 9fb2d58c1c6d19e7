"""The connect attempts of one client connection to a Service (see ``service``).

Why a separate object per connection: it remembers which endpoints this connection tried (a
retry goes elsewhere), the overall connect deadline (each per-try timeout is cut to it), and the
``EndpointLoad`` it counted an attempt on, so every count it made is undone exactly once, on the
right object, however the connection ends (connected, failed, reset, cancelled).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from agent.policy.traffic.balancer import NO_LOCALITY, EndpointLoad, prefer_local
from agent.policy.traffic.fault import FaultDecision

if TYPE_CHECKING:
    from agent.policy.traffic.service import ServiceTraffic

# Causes of a failed attempt (the CRD's retryOn values) and what the outlier detector counts.
CONNECT_FAILURE = "connect-failure"  # timeout or unreachable
REFUSED = "refused"
RESET_BEFORE_DATA = "reset-before-data"
SERVER_ERROR = "5xx"  # an HTTP request answered 5xx by the endpoint (outlier detection only)


# The candidates a caller prefers among those allowed (``Attempts.narrow``, called with
# ``Attempts.narrow_key`` and the candidates): a non-empty subset of them, or them all. The h2
# source's, when the descriptor budget is full: those that need no new socket
# (``agent.proxy.h2outbound``). Applied after the subset split and before the locality
# preference and the balancer, so it never moves a request to another subset. A key beside the
# callable, not a ``partial`` made per request: it is set on every h2 request, and with room
# the preference costs a pick 2.5k instructions this way, 3.0k with a partial (callgrind,
# docs/performance/connection-cost.md).
Narrow = Callable[[Any, Sequence[EndpointLoad]], Sequence[EndpointLoad]]


class Attempts:
    """The connect attempts of one client connection (see the module docstring).

    It keeps the ``EndpointLoad`` it counted an attempt on, so the count is undone on that very
    object even if the endpoint left the Service (and came back) meanwhile; outlier accounting
    is skipped for endpoints that are gone.
    """

    def __init__(
        self,
        service: ServiceTraffic,
        source_ip: str,
        source_node: tuple[str, str | None],
        fault: FaultDecision,
        start: float,
    ) -> None:
        self.service = service
        self.source_ip = source_ip
        self.source_node = source_node
        self.fault = fault
        self.deadline = start + service.config.connect_timeout
        self.tried: list[str] = []
        self.current: str | None = None
        self._load: EndpointLoad | None = None
        self._started = 0.0
        self._connected = False
        self._finished = False
        # Waiting for a slot of the Service's max_connections (``ServiceTraffic.admit`` with
        # ``may_queue``): not counted in flight yet; ``on_admitted`` is called when it is.
        self.queued = False
        self.on_admitted: Callable[[], None] | None = None
        # Set by a caller that prefers some candidates (``Narrow``); None: the balancer's.
        self.narrow: Narrow | None = None
        self.narrow_key: Any = None

    def next_endpoint(self) -> str | None:
        """The endpoint for the next attempt, or None if the Service has none.

        The clock is read once, for the instant of the pick: which ejected endpoints are
        past their penalty (``candidates``), the balancer's costs, and the attempt's start
        (its connect time is measured from it) all want that one instant, and nothing in
        between waits. ``tried`` (a few IPs at most) is passed as it is, not copied."""
        svc = self.service
        now = svc.clock()
        pool = svc.candidates(self.source_ip, self.tried, now)
        if not pool:
            svc.count("no_endpoints")
            return None
        if self.narrow is not None:
            pool = self.narrow(self.narrow_key, pool)
        if svc.config.locality != NO_LOCALITY:
            pool = prefer_local(pool, svc.config.locality, self.source_node, svc.where)
        load = svc.balancer.pick(pool, now)
        load.active += 1
        svc.outlier.attempt(load.ip)
        self.tried.append(load.ip)
        self.current, self._load, self._started = load.ip, load, now
        return load.ip

    def try_timeout(self) -> float:
        """Seconds this attempt may take: the per-try timeout, cut to the overall deadline."""
        remaining = self.deadline - self.service.clock()
        return max(0.0, min(self.service.config.per_try_timeout, remaining))

    def _live(self) -> bool:
        """Is the current endpoint still one of the Service's (outlier state is kept)?"""
        return self.current is not None and self.current in self.service.endpoints

    def connected(self, ip: str, *, reused: bool = False, now: float | None = None) -> None:
        """The current attempt (to ``ip``) connected (at ``now``, the caller's clock reading,
        else the clock's); ``reused``: an HTTP request got a pooled upstream session, whose
        zero connect time is no latency sample (its time to first byte, given to ``finish``,
        is): the clock is read only for a sample."""
        svc = self.service
        if self._load is not None and not reused:
            if now is None:
                now = svc.clock()
            self._load.observe(now - self._started, now)
        # Only an endpoint out of rotation (``outlier.out``) can be on probation.
        if ip in svc.outlier.out and self._live() and svc.outlier.probing(ip):
            svc.outlier.success(ip)  # the probe connected: back in; its end may still count
            if svc.observer is not None:
                svc.observer(svc.name, "outlier", "returned")
        svc.pending -= 1
        self._connected = True

    def sent(self, ip: str) -> float:
        """An HTTP/2 try to ``ip``, queued on its endpoint's connection, counts as connected
        (``agent.proxy.h2route``): ``connected`` and ``try_timeout`` at one clock reading, the
        instant it was sent (its connect sample's end and its timeout's start: nothing waits
        in between, so two readings only differed by the Python between them). Returns the
        try's timeout."""
        svc = self.service
        now = svc.clock()
        self.connected(ip, now=now)
        return max(0.0, min(svc.config.per_try_timeout, self.deadline - now))

    def failed(self, ip: str, cause: str) -> None:
        """The current attempt (to ``ip``) failed with ``cause`` (one of the retryOn values).
        An HTTP/2 request counts as connected once it is queued on its endpoint's connection
        (``agent.proxy.h2route``), before that connection is open: its failure makes the
        request a pending attempt again. One clock read: the failure's instant, for the
        balancer's sample and the outlier detector alike."""
        svc = self.service
        now = svc.clock()
        if self._load is not None:
            self._load.observe_failure(now - self._started, now)
            self._load.active -= 1
        if self._live():
            svc._outlier_failure(ip, now)  # an ejection's penalty starts at the same instant
        svc.count("failed", cause)
        self.current, self._load = None, None
        if self._connected:
            svc.pending += 1
            self._connected = False

    def may_retry(self, cause: str) -> bool:
        """Is another attempt allowed (attempts left, cause retryable, time left, budget)?
        The deadline and the budget are asked at one instant, the decision's (one clock
        read)."""
        svc = self.service
        c = svc.config
        if cause not in c.retry_on or len(self.tried) > c.retries:
            return False
        now = svc.clock()
        if self.deadline - now <= 0:
            svc.count("retry_deadline")
            return False
        if not svc.budget.try_retry(now):
            svc.count("retry_budget_exhausted")
            return False
        svc.count("retries")
        return True

    def finish(
        self,
        *,
        reset_before_data: bool = False,
        first_byte_at: float = 0.0,
        server_error: bool = False,
    ) -> None:
        """The client connection (or HTTP request) ended; a reset before any upstream byte
        counts as a failure, and so does an HTTP request the endpoint answered 5xx
        (``server_error``: Envoy's consecutive 5xx outlier detection).

        Success is recorded here rather than at connect, so an endpoint that accepts and then
        resets every connection accrues consecutive failures like one that refuses.
        ``first_byte_at`` (clock time of the first upstream byte, 0 if none) gives the balancer
        a second latency sample: time to first byte, which sees a server slow to answer even
        when its kernel accepts at once.
        """
        if self._finished:
            return
        self._finished = True
        svc = self.service
        if self.queued:  # never admitted (the client left, the request timed out): no slot
            svc.dequeue(self)
            return
        svc.active -= 1
        if not self._connected:
            svc.pending -= 1
        self._settle(reset_before_data, first_byte_at, server_error)
        if svc.queue:
            svc.slot_freed()

    def again(
        self,
        *,
        reset_before_data: bool = False,
        first_byte_at: float = 0.0,
        server_error: bool = False,
    ) -> None:
        """The current attempt of an HTTP request ended without an answer for the client (a
        retryable status, a reset before the response, a per-try timeout): account it against
        its endpoint as ``finish`` would, and let the request make another attempt (still one
        request in flight for the limits; ``next_endpoint`` avoids the endpoints tried). One
        clock read: the try's end, when an ejection's penalty and the renewed connect deadline
        both start."""
        if self._finished:
            return
        now = self.service.clock()
        self._settle(reset_before_data, first_byte_at, server_error, now)
        self.deadline = now + self.service.config.connect_timeout
        if self._connected:
            self.service.pending += 1
            self._connected = False
        self.current, self._load = None, None

    def _settle(
        self,
        reset_before_data: bool,
        first_byte_at: float,
        server_error: bool,
        now: float | None = None,
    ) -> None:
        """Account the current try against its endpoint; ``now``: the caller's reading of
        the try's end (``finish`` has none: the clock is read only for an outlier failure)."""
        svc = self.service
        load, ip = self._load, self.current
        if load is None or ip is None:
            return
        if self._connected and first_byte_at:
            load.observe(first_byte_at - self._started, first_byte_at)
        load.active -= 1
        if reset_before_data:
            svc.count("failed", RESET_BEFORE_DATA)
        elif server_error:
            svc.count("failed", SERVER_ERROR)
        if ip not in svc.endpoints:  # ``_live`` inline (``ip`` is the current one): gone
            return
        if reset_before_data or server_error:
            svc._outlier_failure(ip, now)
        elif self._connected:
            svc.outlier.success(ip)
        else:
            svc.outlier.abandon(ip)
