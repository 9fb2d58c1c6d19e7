"""Per-request routing on a Service's HTTP port, sans-IO (agent.proxy.http_router): the
Service's traffic control per request, and the HTTPRoutes attached to it."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.base.metrics import REGISTRY
from agent.policy.routes import HttpRequest
from agent.policy.routes.model import HttpMatch
from agent.policy.routes.retry import ATTEMPTS_EXHAUSTED, BUDGET_EXHAUSTED, UNSAFE
from agent.policy.traffic.control import TrafficControl
from agent.policy.traffic.outlier import EJECTED
from agent.proxy import http_router, trafficmetrics
from agent.proxy.http_router import (
    FAULT_INJECTED,
    NO_HEALTHY_UPSTREAM,
    NO_ROUTE,
    UPSTREAM_OVERFLOW,
    HttpRouter,
    LocalResponse,
    RoutePlan,
    Unroutable,
)
from agent.proxy.resolve import ServiceTarget
from agent.state import (
    Endpoint,
    PolicyObject,
    RouteObject,
    Service,
    ServicePort,
    StateStore,
    Workload,
)
from tests.unit.traffic.traffic_helpers import FakeClock, traffic_policy

VIP = "10.96.0.11"
PODS = ("10.244.2.2", "10.244.2.3")
HEAD = HttpRequest("GET", "/a", (("host", "web"),), authority="web")


def _service(name: str, endpoints: tuple[str, ...], selector: dict[str, str]) -> Service:
    return Service(
        name,
        "default",
        (VIP,) if name == "web" else (),
        (ServicePort(80, 9080, name="http", app_protocol="http"),),
        selector,
        tuple(Endpoint(ip, f"default/s{PODS.index(ip)}") for ip in endpoints),
    )


def _store(*endpoints: str) -> StateStore:
    """``web`` over ``endpoints``; ``web-v1``/``web-v2`` over the first/second pod."""
    store = StateStore()
    with store.update() as tx:
        for i, ip in enumerate(endpoints):
            labels = {"app": "server", "version": f"v{i + 1}"}
            tx.put_workload(
                Workload(f"default/s{i}", f"s{i}", "default", "server", "node2", (ip,), labels)
            )
        tx.put_service(_service("web", endpoints, {"app": "server"}))
        for i, ip in enumerate(endpoints):
            tx.put_service(_service(f"web-v{i + 1}", (ip,), {"version": f"v{i + 1}"}))
    return store


def _route(store: StateStore, *rules: dict[str, object]) -> None:
    spec = {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}]}
    with store.update() as tx:
        tx.put_route(
            RouteObject("HTTPRoute", "default", "canary", {**spec, "rules": list(rules)}, 1, "u")
        )


def _ref(name: str, weight: int = 1, port: int = 80) -> dict[str, object]:
    return {"name": name, "port": port, "weight": weight}


def _router(clock: FakeClock | None = None) -> HttpRouter:
    return HttpRouter(TrafficControl(clock=clock or FakeClock(), rng=random.Random(7)))


def _target(store: StateStore) -> ServiceTarget:
    service = store.snapshot().services[("default", "web")]
    return ServiceTarget(service, service.ports[0], VIP)


def _policy(store: StateStore, spec: dict[str, object]) -> None:
    with store.update() as tx:
        tx.put_policy(traffic_policy({**spec, "targetRef": {"kind": "Service", "name": "web"}}))


def _admit(
    router: HttpRouter,
    store: StateStore,
    head: HttpRequest | Callable[[], HttpRequest] = HEAD,
) -> RoutePlan:
    return router.admit(
        store.snapshot(),
        _target(store),
        head,
        "10.244.1.5",
        None,
        ("node1", None),
        client_namespace="default",
    )


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


# -- HTTPRoute ---------------------------------------------------------------------------------
CANARY = HttpRequest("GET", "/a", (("host", "web"), ("x-canary", "true")), authority="web")


def _canary(store: StateStore, v1: int, v2: int) -> None:
    _route(
        store,
        {
            "matches": [{"headers": [{"name": "x-canary", "value": "true"}]}],
            "backendRefs": [_ref("web-v2")],
        },
        {"backendRefs": [_ref("web-v1", v1), _ref("web-v2", v2)]},
    )


def _served(router: HttpRouter, store: StateStore, head: HttpRequest, n: int) -> Counter[str]:
    out: Counter[str] = Counter()
    for _ in range(n):
        plan = _admit(router, store, head)
        out[plan.backend.service.name] += 1
        plan.finish(200, 0.0, reset_before_response=False)
    return out


def test_a_header_match_sends_every_request_to_v2_and_the_rest_splits_by_weight() -> None:
    store, router = _store(*PODS), _router()
    _canary(store, 90, 10)
    assert _served(router, store, CANARY, 100) == {"web-v2": 100}
    split = _served(router, store, HEAD, 2000)
    assert set(split) == {"web-v1", "web-v2"}
    assert 130 <= split["web-v2"] <= 270  # 10 % of 2000 = 200, sd 13.4: beyond 5 sd
    plan = _admit(router, store, CANARY)
    # The backend is resolved and balanced by its own traffic control: v2 has one endpoint.
    assert plan.backend.service.name == "web-v2" and plan.backend.port.port == 80
    assert plan.attempts.next_endpoint() == PODS[1]


def test_weights_changed_in_the_state_apply_to_the_next_request() -> None:
    store, router = _store(*PODS), _router()
    _canary(store, 100, 0)
    assert _served(router, store, HEAD, 50) == {"web-v1": 50}
    _canary(store, 0, 100)
    assert _served(router, store, HEAD, 50) == {"web-v2": 50}


def test_routes_attached_but_none_matching_is_404_nr() -> None:
    store, router = _store(*PODS), _router()
    _route(store, {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}]})
    with pytest.raises(LocalResponse) as e:
        _admit(router, store)
    assert (e.value.status, e.value.flags) == (404, NO_ROUTE)
    ok = HttpRequest("GET", "/api/x", (("host", "web"),), authority="web")
    assert _admit(router, store, ok).backend == _target(store)  # the parent Service serves


@pytest.mark.parametrize(
    "refs",
    [
        [_ref("web-v1", 0), _ref("web-v2", 0)],  # every weight zero
        [_ref("missing")],  # a Service that does not exist
        [_ref("web-v1", port=8080)],  # a port the Service lacks
    ],
)
def test_an_unusable_backend_is_500_and_holds_no_slot(refs: list[dict[str, object]]) -> None:
    store, router = _store(*PODS), _router()
    _route(store, {"backendRefs": refs})
    with pytest.raises(LocalResponse) as e:
        _admit(router, store)
    assert e.value.status == 500
    for name in ("web", "web-v1"):
        service = store.snapshot().services[("default", name)]
        assert router.traffic.service(store.snapshot(), service).active == 0


def test_a_redirect_is_answered_here_with_its_location() -> None:
    store, router = _store(*PODS), _router()
    redirect = {
        "type": "RequestRedirect",
        "requestRedirect": {"hostname": "new", "statusCode": 301},
    }
    _route(store, {"filters": [redirect]})
    head = HttpRequest("GET", "/a", (("host", "web"),), "q=1", authority="web")
    with pytest.raises(LocalResponse) as e:
        _admit(router, store, head)
    assert (e.value.status, e.value.headers) == (301, (("location", "http://new/a?q=1"),))


def test_the_rules_filters_edit_the_forwarded_and_the_response_heads() -> None:
    store, router = _store(*PODS), _router()
    _route(
        store,
        {
            "matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
            "filters": [
                {
                    "type": "RequestHeaderModifier",
                    "requestHeaderModifier": {
                        "set": [{"name": "x-env", "value": "canary"}],
                        "remove": ["x-drop", "host"],
                    },
                },
                {
                    "type": "URLRewrite",
                    "urlRewrite": {
                        "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}
                    },
                },
                {
                    "type": "ResponseHeaderModifier",
                    "responseHeaderModifier": {"add": [{"name": "x-routed", "value": "1"}]},
                },
            ],
        },
    )
    head = HttpRequest("GET", "/old/p", (("host", "web"),), "q=1", authority="web")
    plan = _admit(router, store, head)
    assert plan.edit_request is not None and plan.edit_response is not None
    target, headers = plan.edit_request("/old/p?q=1", [("host", "web"), ("x-drop", "1")])
    # ``host`` is required by HTTP/1.1: a modifier removing it leaves the client's.
    assert (target, sorted(headers)) == ("/new/p?q=1", [("host", "web"), ("x-env", "canary")])
    assert plan.edit_response([("server", "s")]) == [("server", "s"), ("x-routed", "1")]


def test_timeouts_ride_on_the_plan() -> None:
    store, router = _store(*PODS), _router()
    _route(store, {"timeouts": {"request": "200ms", "backendRequest": "50ms"}})
    plan = _admit(router, store)
    assert (plan.request_timeout, plan.try_timeout) == (0.2, 0.05)
    _route(store, {})
    plan = _admit(router, store)
    assert (plan.request_timeout, plan.try_timeout, plan.retry) == (None, None, None)


def _retrying(attempts: int, backoff: str = "100ms") -> tuple[StateStore, HttpRouter]:
    store, router = _store(*PODS), _router()
    retry = {"attempts": attempts, "codes": [503], "backoff": backoff}
    _route(store, {"retry": retry})
    return store, router


def test_a_retry_goes_to_the_other_endpoint_after_a_jittered_backoff() -> None:
    store, router = _retrying(2)
    plan = _admit(router, store)
    first = plan.attempts.next_endpoint()
    assert first is not None
    plan.attempts.connected(first)
    assert plan.retry_after(404, 0.0, replayable=True) is None  # not one of the codes
    backoff = plan.retry_after(503, 0.0, replayable=True)
    assert backoff is not None and 0.1 <= backoff <= 0.15
    second = plan.attempts.next_endpoint()
    assert second is not None and second != first
    plan.attempts.connected(second)
    backoff = plan.retry_after(None, 0.0, replayable=True)  # reset before the response
    assert backoff is not None and 0.2 <= backoff <= 0.3  # exponential
    third = plan.attempts.next_endpoint()
    assert third is not None
    plan.attempts.connected(third)
    assert plan.retry_after(503, 0.0, replayable=True) is None  # two attempts spent
    plan.finish(503, 0.0, reset_before_response=False)
    traffic = router.traffic.service(store.snapshot(), _target(store).service)
    assert traffic.counters["http_retry_attempted"] == 2
    assert traffic.counters[f"http_retry_{ATTEMPTS_EXHAUSTED}"] == 1
    assert (traffic.active, traffic.pending) == (0, 0)  # every count given back
    assert all(load.active == 0 for load in traffic.loads.values())


def test_a_request_that_cannot_be_replayed_is_not_retried() -> None:
    store, router = _retrying(3)
    plan = _admit(router, store)
    ip = plan.attempts.next_endpoint()
    assert ip is not None
    plan.attempts.connected(ip)
    assert plan.retry_after(503, 0.0, replayable=False) is None
    traffic = router.traffic.service(store.snapshot(), _target(store).service)
    assert traffic.counters[f"http_retry_{UNSAFE}"] == 1


def test_the_retry_budget_bounds_retries_across_requests() -> None:
    store, router = _retrying(1)
    # Default budget: 20 % of the requests in the window plus 10 retries per second.
    _policy(store, {"retries": {"budgetPercent": 20, "minRetriesPerSecond": 1}})
    retried = 0
    for _ in range(100):
        plan = _admit(router, store)
        ip = plan.attempts.next_endpoint()
        assert ip is not None
        plan.attempts.connected(ip)
        retried += plan.retry_after(503, 0.0, replayable=True) is not None
        plan.finish(503, 0.0, reset_before_response=False)
    traffic = router.traffic.service(store.snapshot(), _target(store).service)
    window = traffic.config.budget_window
    assert retried == int(0.2 * 100 + 1 * window)
    assert traffic.counters[f"http_retry_{BUDGET_EXHAUSTED}"] == 100 - retried


def test_mirrors_are_rolled_by_percentage_and_resolved() -> None:
    store, router = _store(*PODS), _router()
    mirror = {"type": "RequestMirror", "requestMirror": {"backendRef": _mirror_ref("web-v2")}}
    quarter = {
        "type": "RequestMirror",
        "requestMirror": {"backendRef": _mirror_ref("web-v1"), "percent": 25},
    }
    missing = {"type": "RequestMirror", "requestMirror": {"backendRef": _mirror_ref("ghost")}}
    _route(store, {"filters": [mirror, quarter, missing]})
    copies: Counter[str] = Counter()
    for _ in range(400):
        plan = _admit(router, store)
        copies.update(t.service.name for t in plan.mirrors)
        plan.finish(200, 0.0, reset_before_response=False)
    assert copies["web-v2"] == 400 and "ghost" not in copies
    assert 50 <= copies["web-v1"] <= 150  # 25 % of 400 = 100, sd 8.7


def _mirror_ref(name: str) -> dict[str, object]:
    return {"name": name, "port": 80}


# -- HTTPFault (ExtensionRef) ------------------------------------------------------------------
def _faulty(store: StateStore, spec: dict[str, object] | None) -> None:
    ref = {"group": "nodemesh.io", "kind": "HTTPFault", "name": "chaos"}
    _route(
        store,
        {"backendRefs": [_ref("web")], "filters": [{"type": "ExtensionRef", "extensionRef": ref}]},
    )
    if spec is not None:
        with store.update() as tx:
            tx.put_policy(PolicyObject("HTTPFault", "default", "chaos", spec))


def test_an_http_fault_aborts_with_its_status_and_flag_fi_or_delays_with_di() -> None:
    store = _store(*PODS)
    router = HttpRouter(TrafficControl(clock=FakeClock(), rng=random.Random(7)), random.Random(11))
    _faulty(
        store,
        {
            "abort": {"httpStatus": 418, "percentage": 20},
            "delay": {"fixedDelay": "100ms", "percentage": 10},
        },
    )
    outcomes: Counter[str] = Counter()
    for _ in range(2000):
        try:
            plan = _admit(router, store)
        except LocalResponse as e:
            assert (e.status, e.flags, e.body) == (418, FAULT_INJECTED, b"fault filter abort\n")
            outcomes["abort"] += 1
            continue
        plan.finish(200, 0.0, reset_before_response=False)
        assert plan.flags("-") == ("DI" if plan.delay else "-")
        outcomes["delay" if plan.delay == 0.1 else "none"] += 1
    # A seeded draw: 20 % of 2000 aborted, 10 % of the rest delayed, each within 4 sigma.
    assert abs(outcomes["abort"] - 400) < 4 * (2000 * 0.2 * 0.8) ** 0.5
    rest = 2000 - outcomes["abort"]
    assert abs(outcomes["delay"] - rest * 0.1) < 4 * (rest * 0.1 * 0.9) ** 0.5


def test_a_delayed_request_keeps_other_flags_beside_di() -> None:
    store, router = _store(*PODS), _router()
    _faulty(store, {"delay": {"fixedDelay": "1s", "percentage": 100}})
    plan = _admit(router, store)
    assert plan.delay == 1.0 and plan.flags("UF") == "UF,DI"


def test_a_missing_http_fault_answers_500_never_the_unfaulted_backend() -> None:
    store, router = _store(*PODS), _router()
    _faulty(store, None)
    with pytest.raises(LocalResponse) as e:
        _admit(router, store)
    assert e.value.status == 500 and "HTTPFault default/chaos does not exist" in e.value.detail


# -- what is kept per route table ----------------------------------------------------------------
# One route with every kind of rule the router prepares once per table: header edits (the
# rule's and a backendRef's own), a rewrite, a weighted split with a retry and timeouts, a
# mirror rolled by percentage, an HTTPFault rolled by percentage, a redirect, a weight-zero
# backend, a backend that does not resolve; and requests that match none (404).
_CHAOS = {"group": "nodemesh.io", "kind": "HTTPFault", "name": "chaos"}
_EVERY_RULE: list[dict[str, object]] = [
    {
        "matches": [{"headers": [{"name": "x-canary", "value": "true"}]}],
        "filters": [
            {
                "type": "RequestHeaderModifier",
                "requestHeaderModifier": {"set": [{"name": "x-env", "value": "canary"}]},
            },
            {
                "type": "ResponseHeaderModifier",
                "responseHeaderModifier": {"add": [{"name": "x-routed", "value": "1"}]},
            },
        ],
        "backendRefs": [
            {
                **_ref("web-v2", 3),
                "filters": [
                    {
                        "type": "RequestHeaderModifier",
                        "requestHeaderModifier": {"add": [{"name": "x-v2", "value": "1"}]},
                    }
                ],
            },
            _ref("web-v1", 1),
            _ref("web-v1", 0),
        ],
    },
    {
        "matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
        "filters": [
            {
                "type": "URLRewrite",
                "urlRewrite": {
                    "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}
                },
            },
            {
                "type": "RequestMirror",
                "requestMirror": {"backendRef": _mirror_ref("web-v2"), "percent": 30},
            },
        ],
        "backendRefs": [_ref("web-v1", 9), _ref("web-v2", 1)],
        "retry": {"attempts": 2, "codes": [503], "backoff": "10ms"},
        "timeouts": {"request": "2s", "backendRequest": "500ms"},
    },
    {
        "matches": [{"path": {"type": "Exact", "value": "/chaos"}}],
        "filters": [{"type": "ExtensionRef", "extensionRef": _CHAOS}],
    },
    {
        "matches": [{"path": {"type": "Exact", "value": "/moved"}}],
        "filters": [{"type": "RequestRedirect", "requestRedirect": {"hostname": "new"}}],
    },
    {
        "matches": [{"path": {"type": "Exact", "value": "/ghost"}}],
        "backendRefs": [_ref("web-v1", 1), _ref("ghost", 1)],
    },
    {"matches": [{"method": "POST"}], "backendRefs": [_ref("web", 1)]},
]
_REQUESTS = st.builds(
    lambda method, path, canary: HttpRequest(
        method,
        path,
        (("host", "web"),) + ((("x-canary", canary),) if canary is not None else ()),
        "q=1",
        authority="web",
    ),
    st.sampled_from(["GET", "POST"]),
    st.sampled_from(["/", "/old", "/old/p", "/chaos", "/moved", "/ghost", "/other"]),
    st.sampled_from([None, "true", "false"]),
)


def _every_rule_store() -> StateStore:
    store = _store(*PODS)
    _route(store, *_EVERY_RULE)
    with store.update() as tx:
        fault = {
            "abort": {"httpStatus": 418, "percentage": 20},
            "delay": {"fixedDelay": "100ms", "percentage": 30},
        }
        tx.put_policy(PolicyObject("HTTPFault", "default", "chaos", fault))
    return store


def _outcome(router: HttpRouter, store: StateStore, head: HttpRequest) -> tuple[object, ...]:
    """What a request's plan says (or its local answer), in comparable values."""
    try:
        plan = _admit(router, store, head)
    except LocalResponse as e:
        return ("answered", e.status, e.flags, e.detail, e.body, e.headers)
    plan.finish(200, 0.0, reset_before_response=False)
    edited = plan.edit_request("/old/p?q=1", [("host", "web")]) if plan.edit_request else None
    response = plan.edit_response([("server", "s")]) if plan.edit_response else None
    return (
        plan.backend,
        plan.action,
        plan.delay,
        plan.request_timeout,
        plan.try_timeout,
        plan.retry.retry if plan.retry is not None else None,
        [m.service.key for m in plan.mirrors],
        edited,
        response,
    )


@settings(max_examples=30, deadline=None)
@given(st.lists(_REQUESTS, min_size=1, max_size=40), st.integers(0, 2**32))
def test_a_router_that_kept_its_decisions_plans_as_a_fresh_one_does(
    heads: list[HttpRequest], seed: int
) -> None:
    """Each request planned by one router (its decisions and rules kept from the requests
    before) and by a new router whose random source is in the same state: the same plan or
    the same answer, and the same draws taken."""
    store = _every_rule_store()
    kept = HttpRouter(TrafficControl(clock=FakeClock(), rng=random.Random(7)), random.Random(seed))
    for head in heads + heads:
        fresh = _router()
        fresh.rng.setstate(kept.rng.getstate())
        assert _outcome(kept, store, head) == _outcome(fresh, store, head)
        assert kept.rng.getstate() == fresh.rng.getstate()


def test_a_backend_service_changed_in_the_state_is_resolved_again_for_the_next_request() -> None:
    store, router = _store(*PODS), _router()
    _canary(store, 100, 0)
    assert _served(router, store, HEAD, 20) == {"web-v1": 20}
    with store.update() as tx:  # web-v1 loses port 80: its share is answered 500 at once
        service = store.snapshot().services[("default", "web-v1")]
        tx.put_service(replace(service, ports=(ServicePort(81, 9080, name="http"),)))
    with pytest.raises(LocalResponse) as e:
        _admit(router, store)
    assert e.value.status == 500 and "web-v1:80 does not resolve" in e.value.detail


def test_routing_counts_every_request_exactly() -> None:
    """The share each backend got (``routed``), each backend Service's admissions, and the
    agent's metric of them count every request once, with decisions kept."""
    store = _store(*PODS)
    router = HttpRouter(
        TrafficControl(clock=FakeClock(), rng=random.Random(7), observer=trafficmetrics.observe),
        random.Random(3),
    )
    _canary(store, 90, 10)

    def admitted(name: str) -> float:
        labels = {"service": f"default/{name}"}
        return REGISTRY.get_sample_value("nodemesh_service_connections_total", labels) or 0.0

    before = {name: admitted(name) for name in ("web-v1", "web-v2")}
    served = _served(router, store, HEAD, 300) + _served(router, store, CANARY, 50)
    rule = {name: router.routed[(("HTTPRoute", "default", "canary"), 1, f"default/{name}")]
            for name in ("web-v1", "web-v2")}  # fmt: skip
    assert sum(rule.values()) == 300 and rule["web-v2"] == served["web-v2"] - 50
    assert router.routed[(("HTTPRoute", "default", "canary"), 0, "default/web-v2")] == 50
    for name in ("web-v1", "web-v2"):
        service = store.snapshot().services[("default", name)]
        assert (
            router.traffic.service(store.snapshot(), service).counters["connections"]
            == served[name]
        )
        assert admitted(name) - before[name] == served[name]


def test_a_request_like_one_before_is_planned_without_matching_or_resolving_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Per route table, the rule chosen for a request shape and the chosen rule's backends are
    kept: the next such request walks no match and resolves no Service; a new table (the
    route changed) is matched and resolved again."""
    store, router = _store(*PODS), _router()
    _canary(store, 90, 10)
    calls: Counter[str] = Counter()
    matches, resolve = HttpMatch.matches, http_router._target

    def counted_matches(self: HttpMatch, request: HttpRequest) -> bool:
        calls["matches"] += 1
        return matches(self, request)

    def counted_target(*args: Any) -> ServiceTarget | None:
        calls["resolved"] += 1
        return resolve(*args)

    monkeypatch.setattr(HttpMatch, "matches", counted_matches)
    monkeypatch.setattr(http_router, "_target", counted_target)
    _served(router, store, HEAD, 1)
    first = dict(calls)
    assert first["matches"] > 0 and first["resolved"] > 0
    assert set(_served(router, store, HEAD, 100)) == {"web-v1", "web-v2"}  # drawn per request
    assert calls == first
    _canary(store, 0, 100)
    assert _served(router, store, HEAD, 1) == {"web-v2": 1}
    assert calls["matches"] > first["matches"] and calls["resolved"] > first["resolved"]


def test_a_request_is_made_only_when_a_route_on_the_port_may_read_it() -> None:
    """``admit`` takes the function that makes the request and calls it only when an HTTPRoute
    is attached to the dialled port (before, the shell made every request's fields, and a port
    without routes never read them); the plans are those of the request itself."""
    store, made = _store(*PODS), []

    def make() -> HttpRequest:
        made.append(HEAD)
        return HEAD

    lazy, eager = _router(), _router()
    for _ in range(3):
        plan = _admit(lazy, store, make)
        assert plan.backend == _admit(eager, store).backend == _target(store)
    assert made == []
    _route(
        store,
        {"matches": [{"headers": [{"name": "x-canary", "value": "true"}]}],
         "backendRefs": [_ref("web-v2")]},
        {"backendRefs": [_ref("web-v1")]},
    )  # fmt: skip
    for _ in range(3):
        plan = _admit(lazy, store, make)
        assert plan.backend.service.name == _admit(eager, store).backend.service.name == "web-v1"
    assert len(made) == 3
