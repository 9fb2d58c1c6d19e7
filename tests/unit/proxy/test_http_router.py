"""Per-request routing on a Service's HTTP port, sans-IO (agent.proxy.http_router)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from agent.policy.traffic.control import TrafficControl
from agent.policy.traffic.outlier import EJECTED
from agent.proxy.http1 import RequestHead
from agent.proxy.http_router import (
    FAULT_INJECTED,
    NO_HEALTHY_UPSTREAM,
    UPSTREAM_OVERFLOW,
    HttpRouter,
    Unroutable,
)
from agent.proxy.resolve import ServiceTarget
from agent.state import Endpoint, Service, ServicePort, StateStore, Workload
from tests.unit.traffic.traffic_helpers import FakeClock, traffic_policy

VIP = "10.96.0.11"
PODS = ("10.244.2.2", "10.244.2.3")
HEAD = RequestHead("GET", "/a", "web", "rid")


def _store(*endpoints: str) -> StateStore:
    store = StateStore()
    with store.update() as tx:
        for i, ip in enumerate(endpoints):
            labels = {"app": "server"}
            tx.put_workload(
                Workload(f"default/s{i}", f"s{i}", "default", "server", "node2", (ip,), labels)
            )
        tx.put_service(
            Service(
                "web",
                "default",
                (VIP,),
                (ServicePort(80, 9080, name="http", app_protocol="http"),),
                {"app": "server"},
                tuple(Endpoint(ip, f"default/s{i}") for i, ip in enumerate(endpoints)),
            )
        )
    return store


def _router(clock: FakeClock | None = None) -> HttpRouter:
    return HttpRouter(TrafficControl(clock=clock or FakeClock(), rng=random.Random(7)))


def _target(store: StateStore) -> ServiceTarget:
    service = store.snapshot().services[("default", "web")]
    return ServiceTarget(service, service.ports[0], VIP)


def _policy(store: StateStore, spec: dict[str, object]) -> None:
    with store.update() as tx:
        tx.put_policy(traffic_policy({**spec, "targetRef": {"kind": "Service", "name": "web"}}))


def _admit(router: HttpRouter, store: StateStore):  # type: ignore[no-untyped-def]
    return router.admit(store.snapshot(), _target(store), HEAD, "10.244.1.5", None, ("node1", None))


def test_each_request_gets_its_own_endpoint_choice_over_the_dialled_service() -> None:
    store, router = _store(*PODS), _router()
    chosen: Counter[str] = Counter()
    for _ in range(200):
        plan = _admit(router, store)
        assert plan.backend == _target(store)  # no routes yet: the dialled Service serves
        ip = plan.attempts.next_endpoint()
        assert ip is not None
        plan.attempts.connected(ip, reused=True)
        chosen[ip] += 1
        plan.finish(200, 0.0, reset_before_response=False)
    assert set(chosen) == set(PODS) and min(chosen.values()) > 40


def test_consecutive_5xx_answers_eject_the_endpoint() -> None:
    store, router = _store(*PODS), _router()
    _policy(store, {"outlierDetection": {"consecutiveFailures": 3}})
    bad, answered = PODS[0], 0
    while answered < 3:  # 200s from the other endpoint do not reset ``bad``'s count
        plan = _admit(router, store)
        ip = plan.attempts.next_endpoint()
        assert ip is not None
        plan.attempts.connected(ip)
        plan.finish(503 if ip == bad else 200, 1000.0, reset_before_response=False)
        answered += ip == bad
    health = router.traffic.service(store.snapshot(), _target(store).service).outlier.health
    assert health[bad].state == EJECTED
    # Afterwards every request goes to the healthy one.
    for _ in range(20):
        plan = _admit(router, store)
        assert plan.attempts.next_endpoint() == PODS[1]
        plan.finish(200, 0.0, reset_before_response=False)


def test_a_4xx_answer_is_not_the_endpoints_failure() -> None:
    store, router = _store(PODS[0]), _router()
    _policy(store, {"outlierDetection": {"consecutiveFailures": 1}})
    plan = _admit(router, store)
    assert plan.attempts.next_endpoint() == PODS[0]
    plan.attempts.connected(PODS[0])
    plan.finish(404, 1000.0, reset_before_response=False)
    health = router.traffic.service(store.snapshot(), _target(store).service).outlier.health
    assert health[PODS[0]].consecutive_failures == 0


def test_a_service_without_endpoints_is_unroutable_uh() -> None:
    store, router = _store(), _router()
    with pytest.raises(Unroutable) as e:
        _admit(router, store)
    assert e.value.flags == NO_HEALTHY_UPSTREAM


def test_concurrent_requests_over_the_limit_are_uo_and_the_count_is_given_back() -> None:
    store, router = _store(*PODS), _router()
    _policy(store, {"connectionPool": {"maxConnections": 1}})
    first = _admit(router, store)
    with pytest.raises(Unroutable) as e:
        _admit(router, store)
    assert e.value.flags == UPSTREAM_OVERFLOW
    first.finish(200, 0.0, reset_before_response=False)
    _admit(router, store)  # the first one's slot is free again


def test_an_injected_abort_is_fi_and_holds_no_slot() -> None:
    store, router = _store(*PODS), _router()
    _policy(
        store,
        {
            "connectionPool": {"maxConnections": 1},
            "faultInjection": {"abort": {"percent": 100}},
        },
    )
    for _ in range(3):
        with pytest.raises(Unroutable) as e:
            _admit(router, store)
        assert e.value.flags == FAULT_INJECTED
