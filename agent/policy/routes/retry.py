"""Whether one HTTP request is tried again, per a route rule's ``retry`` (GEP-1731).

Why here and sans-IO: the decision is a function of the rule, the outcome of the last try and
what the proxy still holds of the request, and it must be testable without sockets. Rules:

* Only a request the proxy can send again exactly is retried (``replayable``): its body was
  read completely and held under the buffer limit (a request without a body always is). A
  request whose body streamed past the limit, or that the endpoint answered before its body
  ended, is not (counted ``unsafe``).
* Retried outcomes: a status in ``codes``, and a try that got no response head — the session
  reset or closed, or its ``backendRequest`` timeout expired — as GEP-1731 asks
  implementations to retry connection errors when a rule has ``retry``.
* At most ``attempts`` retries; each one is also spent from the backend Service's retry budget
  (``agent.policy.traffic.budget``: a share of the Service's requests plus a floor per
  second), so retries cannot multiply an outage; the caller checks the budget last.
* Backoff grows exponentially from ``backoff`` (default 25 ms, Envoy's base interval) and is
  capped at ten times it; each wait is jittered *upward* by up to half (``backoff`` is the
  specification's minimum wait between tries), so clients that failed together do not retry in
  lockstep.
"""

from __future__ import annotations

import random

from agent.policy.routes.model import Retry

DEFAULT_BACKOFF = 0.025
MAX_BACKOFF_FACTOR = 10.0

# Outcomes (the ``outcome`` label of the retry metric; ``attempted`` is counted by the caller
# once the budget allowed it).
ATTEMPTED = "attempted"
BUDGET_EXHAUSTED = "budget_exhausted"
ATTEMPTS_EXHAUSTED = "attempts_exhausted"
UNSAFE = "unsafe"


class RequestRetry:
    """The retry state of one request under one rule's ``retry``."""

    def __init__(self, retry: Retry, rng: random.Random) -> None:
        self.retry = retry
        self.rng = rng
        self.used = 0

    def retryable(self, status: int | None) -> bool:
        """Does the rule retry this outcome (``None``: no response head came)?"""
        return status is None or status in self.retry.codes

    def refusal(self, replayable: bool) -> str | None:
        """Why a retryable outcome is not retried (an outcome name), or ``None`` if it may be
        (the budget still to be asked)."""
        if self.used >= self.retry.attempts:
            return ATTEMPTS_EXHAUSTED
        if not replayable:
            return UNSAFE
        return None

    def spend(self) -> float:
        """Count one retry; the seconds to wait before it."""
        self.used += 1
        base = self.retry.backoff if self.retry.backoff is not None else DEFAULT_BACKOFF
        wait = min(base * MAX_BACKOFF_FACTOR, base * 2 ** (self.used - 1))
        return wait * (1.0 + 0.5 * self.rng.random())
