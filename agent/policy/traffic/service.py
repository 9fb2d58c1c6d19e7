"""Traffic control for one Service: admission, the endpoints to choose from, accounting.

The outbound proxy drives one ``Attempts`` (``attempts``) per client connection, sans-IO::

    attempts = traffic.admit(source_ip, source_labels, source_node)   # or raises Rejected
    (apply attempts.fault: sleep, or abort the client)
    while (ip := attempts.next_endpoint()) is not None:
        connect with timeout attempts.try_timeout()
        ok   -> attempts.connected(ip, rtt); relay; attempts.finish(reset_before_data=...)
        fail -> attempts.failed(ip, cause); if not attempts.may_retry(cause): give up
    attempts.finish()

``admit`` applies the connection limits at once (over the limit is a counted rejection, never a
queue: a queue in a transparent proxy only turns overload into timeouts). HTTP requests are the
exception, as in Envoy's ``max_pending_requests``: with ``maxPendingRequests`` (and
``maxConnections``, which bounds the requests in flight), ``admit(may_queue=True)`` returns a
*queued* ``Attempts`` while that many or fewer wait, admitted oldest first as requests end
(``slot_freed`` calls its ``on_admitted``); beyond it the request is rejected
(``max_pending_requests``). A request that gives up waiting is dropped from the queue by its
``finish``. The proxy bounds the wait by the request's own timeout. ``next_endpoint``
applies, in order: the weighted split (a subset), outlier detection (available endpoints),
locality preference, then the balancer; endpoints this connection already tried are avoided
while others remain. When no endpoint is available at all (every one ejected), all are
candidates again ("panic", counted): a guess beats a certain failure.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from agent.policy.traffic.attempts import Attempts
from agent.policy.traffic.balancer import EndpointLoad, make_balancer
from agent.policy.traffic.budget import RetryBudget
from agent.policy.traffic.config import TrafficConfig
from agent.policy.traffic.fault import NO_FAULT, decide
from agent.policy.traffic.outlier import OutlierDetector, OutlierSettings
from agent.policy.traffic.split import Splitter

_NONE: frozenset[str] = frozenset()

# Told about every counted event: (service, event, detail), e.g. ("default/server", "retries",
# ""), ("default/server", "outlier", "ejected"); the proxy turns them into metrics.
Observer = Callable[[str, str, str], None]


class Rejected(Exception):
    """A connection refused before any attempt; ``reason`` is the counted rejection reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    ip: str
    labels: Mapping[str, str] = field(default_factory=dict)
    node: str = ""
    zone: str | None = None


class ServiceTraffic:
    def __init__(
        self,
        name: str,
        config: TrafficConfig,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        observer: Observer | None = None,
    ) -> None:
        self.name = name
        self.observer = observer
        self.clock = clock
        self.rng = rng
        self.endpoints: dict[str, EndpointInfo] = {}
        self.loads: dict[str, EndpointLoad] = {}
        self.subset_by_ip: dict[str, str | None] = {}
        self.where: dict[str, tuple[str, str | None]] = {}
        self._all: list[EndpointLoad] = []
        self._groups: dict[str | None, list[EndpointLoad]] = {}
        self.active = 0
        self.pending = 0
        self.queue: deque[Attempts] = deque()  # HTTP requests waiting for a slot, oldest first
        self.counters: Counter[str] = Counter()
        self.config = config
        self.outlier = OutlierDetector(self._outlier_settings(config), rng)
        self._apply(config)

    @staticmethod
    def _outlier_settings(c: TrafficConfig) -> OutlierSettings:
        return OutlierSettings(
            c.consecutive_failures, c.base_ejection, c.max_ejection, c.max_ejection_percent
        )

    def _apply(self, c: TrafficConfig) -> None:
        self.config = c
        self.balancer = make_balancer(c.balancer, self.rng)
        self.outlier.settings = self._outlier_settings(c)
        self.budget = RetryBudget(
            percent=c.budget_percent,
            min_per_second=c.min_retries_per_second,
            window=c.budget_window,
        )
        self.splitter = Splitter(c.subsets, sticky=c.sticky, rng=self.rng)
        self._index()

    def _index(self) -> None:
        """Per endpoint, facts that change only with the policy or the endpoints (so a
        connection does not recompute them): its subset, and its (node, zone) for locality."""
        subset_of = self.splitter.subset_of
        self.subset_by_ip = {ip: subset_of(e.labels) for ip, e in self.endpoints.items()}
        self.where = {ip: (e.node, e.zone) for ip, e in self.endpoints.items()}
        self._all = [self.loads[ip] for ip in self.endpoints]
        self._groups = {}
        for load in self._all:
            self._groups.setdefault(self.subset_by_ip[load.ip], []).append(load)

    def count(self, event: str, detail: str = "") -> None:
        """Count one event (``counters["<event>_<detail>"]``) and tell the observer."""
        self.counters[f"{event}_{detail}" if detail else event] += 1
        if self.observer is not None:
            self.observer(self.name, event, detail)

    def _outlier_failure(self, ip: str, now: float | None = None) -> None:
        """Count a failure of ``ip`` at ``now`` (the caller's reading of the failure's
        instant, or read here)."""
        verdict = self.outlier.failure(ip, self.clock() if now is None else now)
        if verdict is not None and self.observer is not None:
            self.observer(self.name, "outlier", verdict)

    def reconfigure(self, config: TrafficConfig) -> None:
        """A changed policy takes effect for new connections; endpoint history is kept."""
        if config != self.config:
            decisions = self.splitter.decisions
            self._apply(config)
            self.splitter.decisions.update(decisions)
            self.slot_freed()  # a higher limit (or none) admits waiting requests at once

    def sync(self, endpoints: Sequence[EndpointInfo]) -> None:
        """Follow the Service's ready endpoints (keeping the history of those that stay)."""
        now = self.clock()
        self.endpoints = {e.ip: e for e in sorted(endpoints, key=lambda e: e.ip)}
        self.loads = {ip: self.loads.get(ip) or EndpointLoad(ip, now) for ip in self.endpoints}
        self.outlier.sync(self.endpoints)
        self._index()

    def admit(
        self,
        source_ip: str,
        source_labels: Mapping[str, str] | None = None,
        source_node: tuple[str, str | None] = ("", None),
        *,
        may_queue: bool = False,
    ) -> Attempts:
        """Start one client connection (or HTTP request), or raise ``Rejected`` (counted) over
        a limit; with ``may_queue`` (an HTTP request) and ``maxPendingRequests``, a request over
        ``maxConnections`` waits in the queue instead while there is room (``queued``)."""
        c = self.config
        full = c.max_connections is not None and self.active >= c.max_connections
        waits = may_queue and c.max_pending_requests is not None
        if full and waits and len(self.queue) >= (c.max_pending_requests or 0):
            self._reject(
                "max_pending_requests",
                f"{self.active} in flight and {len(self.queue)} waiting, "
                f"limits {c.max_connections} and {c.max_pending_requests}",
            )
        if full and not waits:
            self._reject("max_connections", f"{self.active} open, limit {c.max_connections}")
        if not full and c.max_pending is not None and self.pending >= c.max_pending:
            self._reject("max_pending", f"{self.pending} connecting, limit {c.max_pending}")
        fault = NO_FAULT if c.fault is None else decide(c.fault, source_labels, self.rng)
        if fault is not NO_FAULT:
            if fault.delay:
                self.count("fault", "delay")
            if fault.abort:
                self.count("fault", f"abort_{fault.abort.lower()}")
        now = self.clock()  # the admission's instant: the connect deadline and the budget's
        attempts = Attempts(self, source_ip, source_node, fault, now + fault.delay)
        if full:
            attempts.queued = True
            self.queue.append(attempts)
            self.count("queued")
            return attempts
        self._start(attempts, now)
        return attempts

    def _start(self, attempts: Attempts, now: float | None = None) -> None:
        """Count ``attempts`` in flight (admitted now, or taken from the queue). ``now``:
        ``admit``'s clock reading, the same instant (nothing waits in between), so the
        request is admitted with one read; a request taken from the queue reads it here."""
        self.active += 1
        self.pending += 1
        self.counters["connections"] += 1  # ``count`` inline: once per request on HTTP ports
        if self.observer is not None:
            self.observer(self.name, "connections", "")
        if now is None:
            now = self.clock()
        self.budget.request(now)
        attempts.deadline = now + attempts.fault.delay + self.config.connect_timeout

    def slot_freed(self) -> None:
        """A request or connection ended (or the limit changed): admit the oldest waiting
        requests while there is room, telling each (``on_admitted``)."""
        limit = self.config.max_connections
        while self.queue and (limit is None or self.active < limit):
            attempts = self.queue.popleft()
            attempts.queued = False
            self._start(attempts)
            if attempts.on_admitted is not None:
                attempts.on_admitted()

    def dequeue(self, attempts: Attempts) -> None:
        """``attempts`` stopped waiting before it was admitted."""
        self.queue.remove(attempts)
        self.count("dequeued")

    def _reject(self, reason: str, detail: str) -> None:
        self.count("rejected", reason)
        raise Rejected(reason, f"service {self.name}: {detail}")

    def candidates(
        self, source_ip: str, avoid: Collection[str], now: float
    ) -> Sequence[EndpointLoad]:
        """The endpoints the balancer may choose from at ``now`` (the pick's instant, read
        once by ``Attempts.next_endpoint``), in IP order; ``avoid``: the endpoints tried.

        Cheap in the common case (nothing ejected, first attempt): the precomputed lists are
        used as they are, so the cost does not grow with the number of endpoints.
        """
        out = self.outlier.out
        blocked = {ip for ip in out if not self.outlier.available(ip, now)} if out else _NONE
        if blocked and len(blocked) == len(self.endpoints):
            self.count("panic")
            blocked = set()
        if self.splitter.subsets:
            nonempty = {
                g
                for g, members in self._groups.items()
                if g is not None and any(m.ip not in blocked for m in members)
            }
            chosen = self.splitter.choose(nonempty, source_ip)
            if chosen is not None and self.observer is not None:
                self.observer(self.name, "split", chosen)
            pool = self._groups.get(chosen, []) if chosen is not None else []
        else:
            pool = self._all
        if blocked:
            pool = [load for load in pool if load.ip not in blocked]
        if avoid:
            pool = [load for load in pool if load.ip not in avoid] or pool
        return pool

    def describe(self) -> dict[str, object]:
        now = self.clock()
        endpoints = []
        for ip, info in sorted(self.endpoints.items()):
            load, health = self.loads[ip], self.outlier.health[ip]
            endpoints.append(
                {
                    "ip": ip,
                    "node": info.node,
                    "subset": self.subset_by_ip[ip],
                    "active": load.active,
                    "rtt_estimate_ms": round(load.estimate * 1000.0, 3),
                    **health.describe(now),
                }
            )
        return {
            "policy": self.config.describe(),
            "active": self.active,
            "pending": self.pending,
            "queued": len(self.queue),
            "endpoints": endpoints,
            "counters": dict(self.counters),
            "ejections": dict(self.outlier.events),
            "retry_budget": dict(
                zip(("requests", "retries"), self.budget.totals(now), strict=True)
            ),
            "split_decisions": dict(self.splitter.decisions),
        }
