"""maxPendingRequests: HTTP requests over maxConnections wait in a bounded queue, sans-IO."""

from __future__ import annotations

import pytest

from agent.policy.schema import PolicyError
from agent.policy.traffic.attempts import Attempts
from agent.policy.traffic.config import TrafficConfig, compile_policy
from agent.policy.traffic.service import Rejected
from tests.unit.traffic.test_traffic_service import service
from tests.unit.traffic.traffic_helpers import traffic_policy

QUEUE = TrafficConfig(max_connections=1, max_pending_requests=2)


def _admitted(attempts: Attempts, log: list[str], name: str) -> None:
    attempts.on_admitted = lambda: log.append(name)


def test_requests_over_the_limit_wait_in_order_and_the_queue_overflows_with_a_reason() -> None:
    t, _ = service(QUEUE)
    first = t.admit("c", may_queue=True)
    assert not first.queued and t.active == 1
    log: list[str] = []
    second, third = t.admit("c", may_queue=True), t.admit("c", may_queue=True)
    assert second.queued and third.queued and t.active == 1
    _admitted(second, log, "second")
    _admitted(third, log, "third")
    with pytest.raises(Rejected) as e:
        t.admit("c", may_queue=True)
    assert e.value.reason == "max_pending_requests"
    assert t.counters["rejected_max_pending_requests"] == 1 and t.counters["queued"] == 2
    first.finish()
    assert log == ["second"] and not second.queued and t.active == 1 and len(t.queue) == 1
    assert second.next_endpoint() is not None  # admitted: it goes on like any request
    second.finish()
    assert log == ["second", "third"] and (t.active, len(t.queue)) == (1, 0)
    third.finish()
    assert (t.active, t.pending) == (0, 0)


def test_a_request_that_stops_waiting_leaves_the_queue_without_a_slot() -> None:
    t, _ = service(QUEUE)
    first = t.admit("c", may_queue=True)
    waiting = t.admit("c", may_queue=True)
    waiting.finish()  # its timeout, or its client left
    assert (t.active, len(t.queue), t.counters["dequeued"]) == (1, 0, 1)
    first.finish()
    assert (t.active, t.pending) == (0, 0)


def test_connections_and_requests_without_queueing_are_refused_at_once() -> None:
    t, _ = service(QUEUE)
    t.admit("c", may_queue=True)
    with pytest.raises(Rejected) as e:
        t.admit("c")  # an L4 connection, or an HTTP/2 request: never queued
    assert e.value.reason == "max_connections"
    t2, _ = service(TrafficConfig(max_connections=1))
    t2.admit("c", may_queue=True)
    with pytest.raises(Rejected) as e:
        t2.admit("c", may_queue=True)  # no maxPendingRequests: no queue
    assert e.value.reason == "max_connections"


def test_a_raised_limit_admits_waiting_requests_at_once() -> None:
    t, _ = service(QUEUE)
    t.admit("c", may_queue=True)
    waiting = t.admit("c", may_queue=True)
    log: list[str] = []
    _admitted(waiting, log, "waiting")
    t.reconfigure(TrafficConfig(max_connections=2, max_pending_requests=2))
    assert log == ["waiting"] and t.active == 2


def test_max_pending_requests_needs_max_connections() -> None:
    # Refused at validation (``lab apply``, the sources), naming the field and the fix.
    with pytest.raises(PolicyError, match=r"maxPendingRequests: .*set connectionPool.maxConn"):
        traffic_policy({"connectionPool": {"maxPendingRequests": 5}})
    both = compile_policy(
        traffic_policy({"connectionPool": {"maxConnections": 3, "maxPendingRequests": 5}})
    )
    assert (both.max_connections, both.max_pending_requests) == (3, 5)
