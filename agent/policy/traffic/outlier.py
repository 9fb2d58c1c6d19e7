"""Outlier detection: stop sending to an endpoint that keeps failing, and let it back carefully.

States of one endpoint::

    HEALTHY --N consecutive failures--> EJECTED --penalty over--> PROBE (one connection allowed)
       ^                                    ^                        |
       +----------- probe succeeded --------|---- probe failed ------+

A failure is a failed connect (refused, timed out) or a connection reset before any byte came
back; any success resets the count. The penalty of the k-th ejection in a row is
``min(max, base x 2^(k-1))``, scaled by a random factor in [0.8, 1.0] so that proxies on many
nodes do not all probe at the same instant; a successful probe lowers k by one, so an endpoint
that flaps is kept out longer each time while a recovered one is soon back at the base penalty.

Ejecting is refused (and counted as ``capped``) when it would put more than
``max_ejection_percent`` of the endpoints out: if most endpoints fail, the problem is probably
not the endpoints, and ejecting them all would turn a partial outage into a total one.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

HEALTHY = "HEALTHY"
EJECTED = "EJECTED"
PROBE = "PROBE"
JITTER = 0.2


@dataclass
class Health:
    state: str = HEALTHY
    consecutive_failures: int = 0
    ejections: int = 0  # k: ejections in a row, lowered by successful probes
    until: float = 0.0  # end of the current penalty
    probing: bool = False  # the single probe connection is in flight

    def describe(self, now: float) -> dict[str, object]:
        # Past its penalty an ejected endpoint turns PROBE only when next asked (``available``);
        # shown as it will be treated, not as "EJECTED for 0s" long after the penalty ended.
        over = self.state == EJECTED and now >= self.until
        return {
            "state": PROBE if over else self.state,
            "consecutive_failures": self.consecutive_failures,
            "ejections_in_a_row": self.ejections,
            "ejected_for": round(max(0.0, self.until - now), 3) if self.state == EJECTED else 0.0,
        }


@dataclass(frozen=True, slots=True)
class OutlierSettings:
    consecutive_failures: int = 5
    base_ejection: float = 30.0
    max_ejection: float = 300.0
    max_ejection_percent: int = 50


class OutlierDetector:
    """Health of every endpoint of one Service; ``events`` counts ejections, returns, caps."""

    def __init__(self, settings: OutlierSettings, rng: random.Random) -> None:
        self.settings = settings
        self.rng = rng
        self.health: dict[str, Health] = {}
        self.out: set[str] = set()  # endpoints not HEALTHY (ejected or on probation)
        self.events: dict[str, int] = {"ejected": 0, "returned": 0, "capped": 0, "probe_failed": 0}

    def sync(self, ips: Iterable[str]) -> None:
        """Follow the Service's endpoint list: new ones start healthy, gone ones are forgotten."""
        current = set(ips)
        for ip in list(self.health):
            if ip not in current:
                del self.health[ip]
        self.out &= current
        for ip in current:
            self.health.setdefault(ip, Health())

    def available(self, ip: str, now: float) -> bool:
        """May a new connection go to ``ip``? (An ejected endpoint past its penalty: one probe.)"""
        h = self.health.setdefault(ip, Health())
        if h.state == EJECTED and now >= h.until:
            h.state, h.probing = PROBE, False
        return h.state == HEALTHY or (h.state == PROBE and not h.probing)

    def attempt(self, ip: str) -> None:
        """A connection to ``ip`` starts; if it is the probe, no other may start until it ends."""
        h = self.health.get(ip)  # not ``setdefault``: that makes a ``Health`` every call
        if h is None:
            h = self.health[ip] = Health()
        if h.state == PROBE:
            h.probing = True

    def probing(self, ip: str) -> bool:
        """Is a connection to ``ip`` its probe (ejected, penalty over, probe in flight)?"""
        h = self.health.get(ip)
        return h is not None and h.state == PROBE and h.probing

    def abandon(self, ip: str) -> None:
        """A connection ended without a verdict (cancelled): a probe may be tried again."""
        h = self.health.get(ip)
        if h is not None and h.state == PROBE:
            h.probing = False

    def success(self, ip: str) -> None:
        h = self.health.get(ip)
        if h is None:
            h = self.health[ip] = Health()
        h.consecutive_failures = 0
        if h.state == PROBE:
            h.state, h.probing = HEALTHY, False
            h.ejections = max(0, h.ejections - 1)
            self.out.discard(ip)
            self.events["returned"] += 1

    def failure(self, ip: str, now: float) -> str | None:
        """Count one failure; ``"ejected"`` or ``"capped"`` if it decided something, else None."""
        h = self.health.setdefault(ip, Health())
        h.consecutive_failures += 1
        if h.state == PROBE:
            self.events["probe_failed"] += 1
            self._eject(ip, h, now)
            return "ejected"
        if h.state != HEALTHY or h.consecutive_failures < self.settings.consecutive_failures:
            return None
        if not self._may_eject():
            self.events["capped"] += 1
            return "capped"
        self._eject(ip, h, now)
        return "ejected"

    def _may_eject(self) -> bool:
        return (len(self.out) + 1) * 100 <= len(self.health) * self.settings.max_ejection_percent

    def _eject(self, ip: str, h: Health, now: float) -> None:
        s = self.settings
        h.ejections += 1
        penalty = min(s.max_ejection, s.base_ejection * 2 ** (h.ejections - 1))
        h.until = now + penalty * self.rng.uniform(1.0 - JITTER, 1.0)
        h.state, h.probing = EJECTED, False
        self.out.add(ip)
        self.events["ejected"] += 1

    def ejected(self) -> list[str]:
        return sorted(self.out)
