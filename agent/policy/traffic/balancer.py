"""Choosing one endpoint of a Service for a new connection.

The default is **peak-EWMA with power of two choices** (the Finagle / linkerd / tower design):
each endpoint keeps a round-trip estimate; the cost of an endpoint is ``estimate x (active + 1)``,
so both slowness and queued work count; two distinct endpoints are drawn at random and the cheaper
one wins. Drawing two instead of scanning for the minimum avoids the herd: every proxy sending to
the one endpoint that *looked* best a moment ago.

The estimate is a *peak* EWMA. A sample above the current estimate replaces it at once (an
endpoint that slows down is avoided from its first slow connect); a sample below it moves the
estimate toward it with weight ``1 - exp(-Δt / DECAY)``, and with no sample at all the estimate
decays toward zero with the same time constant, so an endpoint avoided after a slow spell is
tried again (and, if still slow, avoided again) instead of being starved forever.
``DECAY`` is 10 s and a new endpoint starts at ``INITIAL_ESTIMATE`` = 30 ms (linkerd's values): a
new replica is tried soon but not flooded before its first sample. Samples are connect times
(for a tunnelled connection: until the far node answered the CONNECT, which includes its connect
to the pod). A failed attempt is sampled as ``max(elapsed, FAILURE_SAMPLE)``, so an endpoint that
refuses looks slow before the outlier detector ejects it.

``ROUND_ROBIN``, ``LEAST_CONNECTIONS`` (ties broken at random) and ``RANDOM`` are the simple
alternatives. Everything here is sans-IO: the caller passes the time and owns the RNG.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from math import exp as _exp

DECAY = 10.0
INITIAL_ESTIMATE = 0.030
FAILURE_SAMPLE = 1.0
NO_LOCALITY = "NONE"


@dataclass
class EndpointLoad:
    """What the balancers know about one endpoint: open connections and the RTT estimate."""

    ip: str
    stamp: float
    active: int = 0
    estimate: float = INITIAL_ESTIMATE

    def observe(self, rtt: float, now: float) -> None:
        """Record one connect time (seconds): the peak EWMA's step (module docstring). Its
        arithmetic inline, each ``max`` as the test ``max`` makes, so the estimates (and so the
        picks) are the same to the bit: it runs two or three times per request."""
        estimate, stamp = self.estimate, self.stamp
        if rtt > estimate:
            self.estimate = rtt
        else:
            elapsed = now - stamp
            if not elapsed > 0.0:  # ``max(0.0, elapsed)``, as a test, not a call
                elapsed = 0.0
            weight = _exp(-elapsed / DECAY)
            self.estimate = estimate * weight + rtt * (1.0 - weight)
        if now > stamp:
            self.stamp = now

    def observe_failure(self, elapsed: float, now: float) -> None:
        self.observe(FAILURE_SAMPLE if elapsed < FAILURE_SAMPLE else elapsed, now)

    def cost(self, now: float) -> float:
        """``estimate x (active + 1)`` with the estimate decayed to ``now`` (a sample of 0)."""
        self.observe(0.0, now)
        return self.estimate * (self.active + 1)


class PeakEwma:
    name = "PEAK_EWMA"

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, candidates: Sequence[EndpointLoad], now: float) -> EndpointLoad:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.sample(candidates, 2)
        return a if a.cost(now) <= b.cost(now) else b


class RoundRobin:
    name = "ROUND_ROBIN"

    def __init__(self, rng: random.Random) -> None:
        self._next = rng.randrange(1 << 16)  # proxies on different nodes start apart

    def pick(self, candidates: Sequence[EndpointLoad], now: float) -> EndpointLoad:
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return chosen


class LeastConnections:
    name = "LEAST_CONNECTIONS"

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, candidates: Sequence[EndpointLoad], now: float) -> EndpointLoad:
        fewest = min(c.active for c in candidates)
        return self.rng.choice([c for c in candidates if c.active == fewest])


class Random:
    name = "RANDOM"

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, candidates: Sequence[EndpointLoad], now: float) -> EndpointLoad:
        return self.rng.choice(candidates)


Balancer = PeakEwma | RoundRobin | LeastConnections | Random
_BY_NAME: dict[str, type[Balancer]] = {
    cls.name: cls for cls in (PeakEwma, RoundRobin, LeastConnections, Random)
}


def make_balancer(name: str, rng: random.Random) -> Balancer:
    """The balancer called ``name`` (one of the CRD's ``loadBalancer.type`` values)."""
    try:
        return _BY_NAME[name](rng)
    except KeyError as e:
        raise ValueError(
            f"unknown load balancer {name!r}; use one of {', '.join(sorted(_BY_NAME))}"
        ) from e


def prefer_local(
    candidates: Sequence[EndpointLoad],
    locality: str,
    client: tuple[str, str | None],
    where: dict[str, tuple[str, str | None]],
) -> Sequence[EndpointLoad]:
    """The candidates in the client's node (``SAME_NODE``) or zone (``SAME_ZONE``), if any.

    ``where`` maps endpoint IP → (node, zone). With no local candidate, all candidates stay:
    locality is a preference, never a reason to fail a connection.
    """
    if locality == NO_LOCALITY:
        return candidates
    index = 0 if locality == "SAME_NODE" else 1
    mine = client[index]
    if mine is None:
        return candidates
    local = [c for c in candidates if where.get(c.ip, ("", None))[index] == mine]
    return local or candidates
