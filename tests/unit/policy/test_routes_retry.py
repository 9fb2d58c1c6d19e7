"""A route rule's retry decisions for one request (agent.policy.routes.retry), sans-IO."""

from __future__ import annotations

import random

from agent.policy.routes.model import Retry
from agent.policy.routes.retry import ATTEMPTS_EXHAUSTED, DEFAULT_BACKOFF, UNSAFE, RequestRetry


def test_retried_outcomes_are_the_codes_and_a_missing_response() -> None:
    r = RequestRetry(Retry(2, frozenset({502, 503})), random.Random(1))
    assert r.retryable(503) and r.retryable(None)
    assert not r.retryable(500) and not r.retryable(200)


def test_a_retry_needs_attempts_left_and_a_replayable_request() -> None:
    r = RequestRetry(Retry(1, frozenset({503})), random.Random(1))
    assert r.refusal(replayable=False) == UNSAFE
    assert r.refusal(replayable=True) is None
    r.spend()
    assert r.refusal(replayable=True) == ATTEMPTS_EXHAUSTED


def test_backoff_doubles_from_its_minimum_is_jittered_upward_and_capped() -> None:
    r = RequestRetry(Retry(8, frozenset({503}), backoff=0.1), random.Random(3))
    waits = [r.spend() for _ in range(8)]
    for k, wait in enumerate(waits):
        floor = min(1.0, 0.1 * 2**k)  # capped at ten times the backoff
        assert floor <= wait <= 1.5 * floor
    assert len(set(waits[-3:])) == 3  # jittered: retries of a burst spread out
    default = RequestRetry(Retry(1, frozenset({503})), random.Random(3)).spend()
    assert DEFAULT_BACKOFF <= default <= 1.5 * DEFAULT_BACKOFF
