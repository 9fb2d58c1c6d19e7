"""Routes per request on the HTTP/2 and gRPC source path, sans-IO (agent.proxy.h2route): a
GRPCRoute's matches and weights, its local answers, header edits on HTTP/2 header blocks and
the request's timeout."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import replace
from typing import cast

import pytest

from agent.policy.routes import GrpcRequest, HttpRequest
from agent.policy.traffic.service import ServiceTraffic
from agent.proxy.h2exchange import Choice, LocalAnswer, PickRequest
from agent.proxy.h2route import Endpoint, admitted, grpc_timeout, route_request
from agent.proxy.http1 import RequestHead
from agent.proxy.http_router import HttpRouter, RoutePlan
from agent.proxy.resolve import ServiceTarget
from agent.state import PolicyObject, RouteObject, ServicePort, StateStore
from tests.unit.proxy.test_http_router import PODS, _ref, _route, _router, _target
from tests.unit.proxy.test_http_router import _store as _http_store
from tests.unit.traffic.traffic_helpers import FakeClock, traffic_policy

CALL = "/pkg.Echo/Unary"


def _store(*endpoints: str) -> StateStore:
    """``web``, ``web-v1`` and ``web-v2`` (``test_http_router``'s) with port 80 declared gRPC."""
    store = _http_store(*endpoints)
    port = ServicePort(80, 9080, name="grpc", app_protocol="grpc")
    with store.update() as tx:
        for service in list(store.snapshot().services.values()):
            tx.put_service(replace(service, ports=(port,)))
    return store


def _grpc_route(store: StateStore, *rules: dict[str, object]) -> None:
    spec = {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}]}
    with store.update() as tx:
        tx.put_route(
            RouteObject("GRPCRoute", "default", "g", {**spec, "rules": list(rules)}, 1, "u")
        )


def _request(
    path: str = CALL, *headers: tuple[bytes, bytes], grpc: bool = True, target: str = ""
) -> PickRequest:
    head = RequestHead("POST" if grpc else "GET", path.split("?")[0], "web", "rid",
                       headers=list(headers))  # fmt: skip
    return PickRequest(head, target or path, grpc)


def _route_it(router: HttpRouter, store: StateStore, request: PickRequest) -> Choice | LocalAnswer:
    return route_request(
        router, store.snapshot(), _target(store), request, "10.244.1.5", None,
        ("node1", None), client_namespace="default",
    )  # fmt: skip


def _choice(router: HttpRouter, store: StateStore, request: PickRequest) -> Choice:
    choice = _route_it(router, store, request)
    assert isinstance(choice, Choice), choice
    return choice


def _done(choice: Choice) -> Endpoint:
    assert isinstance(choice.tag, RoutePlan) and isinstance(choice.key, Endpoint)
    choice.tag.finish(200, 0.0, reset_before_response=False)
    return choice.key


def _canary(store: StateStore, v1: int, v2: int) -> None:
    _grpc_route(
        store,
        {
            "matches": [
                {
                    "method": {"service": "pkg.Echo", "method": "Unary"},
                    "headers": [{"name": "x-canary", "value": "true"}],
                }
            ],
            "backendRefs": [_ref("web-v2")],
        },
        {
            "matches": [{"method": {"service": "pkg.Echo"}}],
            "backendRefs": [_ref("web-v1", v1), _ref("web-v2", v2)],
        },
    )


def test_a_grpc_call_is_routed_by_method_and_header_and_split_by_weight() -> None:
    store, router = _store(*PODS), _router()
    _canary(store, 90, 10)
    canary = _request(CALL, (b"x-canary", b"true"))
    keys = Counter(_done(_choice(router, store, canary)) for _ in range(50))
    assert [(k.service, k.port, k.ip) for k in keys] == [(("default", "web-v2"), 80, PODS[1])]
    assert next(iter(keys)).target.service.name == "web-v2"  # its route is resolved by it
    split = Counter(_done(_choice(router, store, _request())).service[1] for _ in range(2000))
    assert set(split) == {"web-v1", "web-v2"}
    assert 130 <= split["web-v2"] <= 270  # 10 % of 2000 = 200, sd 13.4: beyond 5 sd


def test_an_unmatched_method_is_answered_nr_and_no_grpcroute_means_the_dialled_service() -> None:
    store, router = _store(*PODS), _router()
    assert _done(_choice(router, store, _request())).service == ("default", "web")
    _canary(store, 1, 1)
    answer = _route_it(router, store, _request("/other.Svc/Do"))
    assert isinstance(answer, LocalAnswer) and (answer.status, answer.flags) == (404, "NR")


def test_a_plain_http2_request_on_the_port_takes_the_httproutes_not_the_grpcroutes() -> None:
    store, router = _store(*PODS), _router()
    _canary(store, 0, 1)
    _route(store, {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                   "backendRefs": [_ref("web-v1")]})  # fmt: skip
    plain = _request("/api/x?q=1", grpc=False)
    assert _done(_choice(router, store, plain)).service == ("default", "web-v1")
    answer = _route_it(router, store, _request("/other", grpc=False))
    assert isinstance(answer, LocalAnswer) and (answer.status, answer.flags) == (404, "NR")
    # A path that is not /service/method is no gRPC call: the HTTPRoutes see it.
    odd = _route_it(router, store, _request("/api/a/b"))
    assert isinstance(odd, Choice) and _done(odd).service == ("default", "web-v1")


@pytest.mark.parametrize("refs", [[_ref("web-v1", 0)], [_ref("missing")]])
def test_an_unusable_backend_is_a_500_local_answer(refs: list[dict[str, object]]) -> None:
    store, router = _store(*PODS), _router()
    _grpc_route(store, {"backendRefs": refs})
    answer = _route_it(router, store, _request())
    assert isinstance(answer, LocalAnswer) and answer.status == 500


def test_a_redirect_answer_carries_its_location_as_bytes() -> None:
    store, router = _store(*PODS), _router()
    redirect = {"type": "RequestRedirect", "requestRedirect": {"hostname": "new"}}
    _route(store, {"filters": [redirect]})
    answer = _route_it(router, store, _request("/a?q=1", grpc=False))
    assert isinstance(answer, LocalAnswer)
    assert (answer.status, answer.headers) == (302, ((b"location", b"http://new/a?q=1"),))


def test_the_rules_header_modifiers_edit_http2_header_blocks() -> None:
    store, router = _store(*PODS), _router()
    _grpc_route(
        store,
        {
            "filters": [
                {"type": "RequestHeaderModifier",
                 "requestHeaderModifier": {"set": [{"name": "x-env", "value": "canary"}],
                                           "remove": ["x-drop"]}},
                {"type": "ResponseHeaderModifier",
                 "responseHeaderModifier": {"add": [{"name": "x-routed", "value": "1"}]}},
            ],
        },
    )  # fmt: skip
    choice = _choice(router, store, _request())
    assert choice.edit_request is not None and choice.edit_response is not None
    block = [(b":method", b"POST"), (b":path", CALL.encode()), (b":authority", b"web"),
             (b"x-drop", b"1"), (b"te", b"trailers")]  # fmt: skip
    assert choice.edit_request(block) == [
        (b":method", b"POST"), (b":path", CALL.encode()), (b":authority", b"web"),
        (b"te", b"trailers"), (b"x-env", b"canary"),
    ]  # fmt: skip  # no ``host`` header appears in an HTTP/2 block
    response = [(b":status", b"200"), (b"grpc-status", b"0")]
    assert choice.edit_response(response) == [*response, (b"x-routed", b"1")]


def test_a_url_rewrite_moves_path_and_authority_pseudo_headers() -> None:
    store, router = _store(*PODS), _router()
    rewrite = {
        "type": "URLRewrite",
        "urlRewrite": {
            "hostname": "inner",
            "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"},
        },
    }
    _route(store, {"matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
                   "filters": [rewrite]})  # fmt: skip
    choice = _choice(router, store, _request("/v1/x?q=1", grpc=False))
    assert choice.edit_request is not None
    block = [(b":path", b"/v1/x?q=1"), (b":authority", b"web"), (b"a", b"1")]
    assert choice.edit_request(block) == [(b":path", b"/v2/x?q=1"), (b":authority", b"inner"),
                                          (b"a", b"1")]  # fmt: skip


def test_the_timeout_is_the_sooner_of_the_rules_and_the_calls_and_each_try_has_its_own() -> None:
    store, router = _store(*PODS), _router()
    assert _choice(router, store, _request()).timeout is None
    assert _choice(router, store, _request(CALL, (b"grpc-timeout", b"300m"))).timeout == 0.3
    _route(store, {"timeouts": {"request": "200ms", "backendRequest": "150ms"}})
    choice = _choice(router, store, _request(CALL, (b"grpc-timeout", b"1S")))
    assert (choice.timeout, choice.try_timeout) == (0.2, 0.15)  # backendRequest: per try
    assert _choice(router, store, _request(CALL, (b"grpc-timeout", b"100m"))).timeout == 0.1
    # A plain HTTP/2 request's grpc-timeout header means nothing.
    plain = _request("/a", (b"grpc-timeout", b"1m"), grpc=False)
    assert _choice(router, store, plain).timeout == 0.2


class _Field(bytes):
    """A received field name or value that counts its decodes to text."""

    decoded = 0

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        _Field.decoded += 1
        return super().decode(encoding, errors)


def test_a_call_no_route_reads_decodes_only_its_deadline_and_the_deadline_counts() -> None:
    """Routing decodes a request's fields to text only for a route that reads them; the
    call's ``grpc-timeout`` is found among the fields as received and only its value decoded
    (a repeated one is malformed, as its joined text was)."""
    store, router = _store(*PODS), _router()
    fields = [(_Field(n), _Field(v)) for n, v in
              ((b"content-type", b"application/grpc"), (b"te", b"trailers"),
               (b"grpc-timeout", b"250m"), (b"x-canary", b"true"))]  # fmt: skip
    _Field.decoded = 0
    assert _choice(router, store, _request(CALL, *fields)).timeout == 0.25
    assert _Field.decoded == 1  # the grpc-timeout value
    repeated = _request(CALL, (b"grpc-timeout", b"1S"), (b"grpc-timeout", b"2S"))
    assert _choice(router, store, repeated).timeout is None
    # A route matching on a header reads the fields as text: the canary header still matches.
    _canary(store, 100, 0)
    assert _done(_choice(router, store, _request(CALL, *fields))).service == ("default", "web-v2")
    assert _Field.decoded > 1


def _fault_ref() -> dict[str, object]:
    ref = {"group": "nodemesh.io", "kind": "HTTPFault", "name": "chaos"}
    return {"type": "ExtensionRef", "extensionRef": ref}


def _fault(store: StateStore, spec: dict[str, object]) -> None:
    with store.update() as tx:
        tx.put_policy(PolicyObject("HTTPFault", "default", "chaos", spec))


def test_an_injected_delay_holds_the_request_and_the_route_timeout_starts_after_it() -> None:
    store, router = _store(*PODS), _router()
    _fault(store, {"delay": {"fixedDelay": "1s", "percentage": 100}})
    _route(
        store,
        {"backendRefs": [_ref("web")], "filters": [_fault_ref()], "timeouts": {"request": "200ms"}},
    )
    choice = _choice(router, store, _request("/a", grpc=False))
    assert (choice.delay, choice.timeout) == (1.0, pytest.approx(1.2))
    assert isinstance(choice.tag, RoutePlan) and choice.tag.flags("-") == "DI"
    # A call's own deadline is the caller's: the delay counts toward it.
    call = _choice(router, store, _request(CALL, (b"grpc-timeout", b"500m")))
    assert (call.delay, call.timeout) == (1.0, 0.5)


def test_a_grpc_route_fault_aborts_with_its_grpc_status_and_flag_fi() -> None:
    store, router = _store(*PODS), _router()
    _fault(store, {"abort": {"grpcStatus": 8, "percentage": 100}})
    unary = {"method": {"service": "pkg.Echo", "method": "Unary"}}
    _grpc_route(store, {"matches": [unary], "backendRefs": [_ref("web")],
                        "filters": [_fault_ref()]})  # fmt: skip
    answer = _route_it(router, store, _request())
    assert isinstance(answer, LocalAnswer)
    assert (answer.status, answer.grpc_status, answer.flags) == (200, 8, "FI")
    # An HTTP status abort on a GRPCRoute: the call gets its gRPC mapping.
    _fault(store, {"abort": {"httpStatus": 503, "percentage": 100}})
    answer = _route_it(router, store, _request())
    assert isinstance(answer, LocalAnswer)
    assert (answer.status, answer.grpc_status, answer.flags) == (503, None, "FI")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("2S", 2.0), ("100m", 0.1), ("1H", 3600.0), ("5u", 5e-6), (None, None), ("", None),
     ("10", None), ("1.5S", None), ("123456789m", None), ("5x", None)],
)  # fmt: skip
def test_grpc_timeout_values(value: str | None, seconds: float | None) -> None:
    assert grpc_timeout(value) == (pytest.approx(seconds) if seconds else seconds)


def test_an_httproute_retry_is_asked_per_try_and_goes_to_the_other_endpoint() -> None:
    store, router = _store(*PODS), _router()
    _route(store, {"retry": {"attempts": 1, "codes": [503], "backoff": "10ms"}})
    choice = _choice(router, store, _request())
    retries = choice.retries
    assert retries is not None and isinstance(choice.key, Endpoint)
    assert retries.after(200, 0.0, replayable=True) is None  # not one of the codes
    backoff = retries.after(503, 0.0, replayable=True)
    assert backoff is not None and 0.01 <= backoff <= 0.015
    again = retries.next()
    assert isinstance(again, Choice) and isinstance(again.key, Endpoint)
    assert {choice.key.ip, again.key.ip} == set(PODS)  # never the endpoint that just failed
    assert again.tag is choice.tag
    assert retries.after(503, 0.0, replayable=True) is None  # its one attempt is spent
    plan = choice.tag
    assert isinstance(plan, RoutePlan) and plan.retries == 1
    service = store.snapshot().services[("default", "web")]
    assert router.traffic.service(store.snapshot(), service).active == 1
    plan.finish(200, 0.0, reset_before_response=False)
    assert router.traffic.service(store.snapshot(), service).active == 0


def test_no_retries_without_a_rule_retry_and_a_request_not_received_whole_is_not_retried() -> None:
    store, router = _store(*PODS), _router()
    assert _choice(router, store, _request()).retries is None
    _grpc_route(store, {})  # GRPCRoute has no retry field
    assert _choice(router, store, _request()).retries is None
    _route(store, {"retry": {"attempts": 2, "codes": [503]}})
    # the HTTPRoute applies to plain HTTP/2 (GRPCRoutes take the gRPC calls)
    retries = _choice(router, store, _request("/a", grpc=False)).retries
    assert retries is not None
    assert retries.after(None, 0.0, replayable=False) is None


def test_a_grpc_route_mirror_asks_the_proxy_for_a_copy_and_names_the_mirror_service() -> None:
    store, router = _store(*PODS), _router()
    mirror = {"type": "RequestMirror",
              "requestMirror": {"backendRef": {"name": "web-v2", "port": 80}}}  # fmt: skip
    _grpc_route(store, {"backendRefs": [_ref("web-v1")], "filters": [mirror]})
    choice = _choice(router, store, _request())
    assert choice.mirror and isinstance(choice.tag, RoutePlan)
    assert [t.service.name for t in choice.tag.mirrors] == ["web-v2"]
    _grpc_route(store, {"backendRefs": [_ref("web-v1")]})
    assert not _choice(router, store, _request()).mirror


def test_a_request_over_max_connections_is_parked_and_admitted_when_a_slot_frees() -> None:
    store, router = _store(*PODS), _router()
    with store.update() as tx:
        tx.put_policy(traffic_policy({"targetRef": {"kind": "Service", "name": "web"},
                                      "connectionPool": {"maxConnections": 1,
                                                         "maxPendingRequests": 1}}))  # fmt: skip
    first = _choice(router, store, _request())
    parked = _choice(router, store, _request())
    assert first.key is not None and not first.parked
    assert parked.parked and parked.key is None
    answer = _route_it(router, store, _request())  # the queue is full
    assert isinstance(answer, LocalAnswer) and (answer.status, answer.flags) == (503, "UO")
    plan = parked.tag
    assert isinstance(plan, RoutePlan) and plan.attempts.queued
    turns: list[bool] = []
    plan.attempts.on_admitted = lambda: turns.append(True)
    _done(first)
    assert turns == [True] and isinstance(admitted(plan), Endpoint)


def _traffic(store: StateStore, router: HttpRouter) -> ServiceTraffic:
    service = store.snapshot().services[("default", "web")]
    return router.traffic.service(store.snapshot(), service)


def test_a_try_never_processed_goes_to_the_other_endpoint_by_the_services_retries() -> None:
    store, router = _store(*PODS), _router()
    with store.update() as tx:
        retries = {"attempts": 1, "perTryTimeout": "300ms"}
        tx.put_policy(traffic_policy({"targetRef": {"kind": "Service", "name": "web"},
                                      "retries": retries}))  # fmt: skip
    choice = _choice(router, store, _request())
    assert isinstance(choice.key, Endpoint) and choice.resend is not None
    assert choice.key.connect_timeout == pytest.approx(0.3)  # the tunnel waits one try's time
    again = choice.resend.unprocessed("refused", replayable=True)
    assert isinstance(again, Choice) and isinstance(again.key, Endpoint)
    assert {choice.key.ip, again.key.ip} == set(PODS) and again.tag is choice.tag
    svc = _traffic(store, router)
    assert (svc.counters["failed_refused"], svc.counters["retries"]) == (1, 1)
    assert (svc.active, svc.pending) == (1, 0)
    # its one attempt is spent: the failure is counted, the request not sent again
    assert again.resend is None
    assert choice.resend.unprocessed("connect-failure", replayable=True) is None
    assert (svc.counters["failed_connect-failure"], svc.counters["retries"]) == (1, 1)
    assert (svc.active, svc.pending) == (1, 1)  # no endpoint holds it any more
    plan = choice.tag
    assert isinstance(plan, RoutePlan)
    plan.finish(503, 0.0, reset_before_response=True)
    assert (svc.active, svc.pending) == (0, 0)
    assert svc.counters["failed_reset-before-data"] == 0  # counted once, as a refusal
    assert [e["active"] for e in svc.describe()["endpoints"]] == [0, 0]


def test_the_services_retries_keep_to_retry_on_and_a_request_they_cannot_replay() -> None:
    store, router = _store(*PODS), _router()
    with store.update() as tx:
        tx.put_policy(traffic_policy({"targetRef": {"kind": "Service", "name": "web"},
                                      "retries": {"retryOn": ["connect-failure"]}}))  # fmt: skip
    choice = _choice(router, store, _request())
    assert choice.resend is not None
    assert choice.resend.unprocessed("refused", replayable=True) is None  # not in retryOn
    choice = _choice(router, store, _request())
    assert choice.resend is not None
    assert choice.resend.unprocessed("connect-failure", replayable=False) is None
    svc = _traffic(store, router)
    assert (svc.counters["failed_refused"], svc.counters["failed_connect-failure"]) == (1, 1)
    assert svc.counters["retries"] == 0
    choice = _choice(router, store, _request())
    assert choice.resend is not None
    tried = choice.resend.unprocessed("connect-failure", replayable=True)
    assert isinstance(tried, Choice)
    # the Service lost its endpoints meanwhile: the failure is the answer
    _traffic(store, router).sync([])
    left = choice.resend.unprocessed("connect-failure", replayable=True)
    assert isinstance(left, LocalAnswer) and (left.status, left.flags) == (503, "UF")


def test_a_calls_request_compares_and_hashes_by_its_fields_as_a_frozen_one_did() -> None:
    """``GrpcRequest`` (one per call) is no longer frozen: equal by its four fields, equal
    hashes, and no hash while its headers are a list (as a frozen one would fail to hash)."""
    call = GrpcRequest.from_path(CALL, (("x", "1"),), authority="web")
    same = GrpcRequest("pkg.Echo", "Unary", (("x", "1"),), "web")
    assert call == same and hash(call) == hash(same) and len({call, same}) == 1
    assert call != GrpcRequest("pkg.Echo", "Unary", (("x", "2"),), "web")
    assert call != GrpcRequest("pkg.Echo", "Unary", (("x", "1"),), "other")
    with pytest.raises(TypeError):
        hash(GrpcRequest("pkg.Echo", "Unary", [("x", "1")]))


class _CountedClock(FakeClock):
    """A fake clock that counts its readings."""

    reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


def test_a_call_reads_the_clock_three_times_to_be_routed_and_sent() -> None:
    """A call to a VIP without routes: the admission, the pick, and the try sent (its connect
    sample and its timeout at one reading, ``Attempts.sent``; they were two)."""
    clock, store = _CountedClock(), _store(*PODS)
    router = _router(clock)
    _done(_choice(router, store, _request()))  # the Service's traffic state made
    clock.reads = 0
    choice = _choice(router, store, _request())
    assert clock.reads == 3
    assert isinstance(choice.key, Endpoint) and choice.key.connect_timeout is not None


def test_a_try_sent_at_one_reading_counts_as_connect_and_try_timeout_at_that_reading() -> None:
    """``Attempts.sent`` leaves the balancer's estimate and stamp, the Service's counts, and
    the try's timeout as ``connected`` then ``try_timeout`` did at the same instant (with a
    connect sample of 3 ms, and with an expired connect deadline)."""
    for waited in (0.003, 30.0):
        outcomes = []
        for one_reading in (False, True):
            clock, store = FakeClock(), _store(*PODS)
            router = _router(clock)
            plan = router.admit(store.snapshot(), _target(store), HttpRequest.from_target(
                "POST", CALL, (), authority="web"), "10.244.1.5", None, ("node1", None),
                client_namespace="default")  # fmt: skip
            ip = plan.attempts.next_endpoint()
            assert ip is not None
            clock.advance(waited)
            if one_reading:
                timeout = plan.attempts.sent(ip)
            else:
                plan.attempts.connected(ip)
                timeout = plan.attempts.try_timeout()
            svc, load = plan.attempts.service, plan.attempts._load
            assert load is not None
            outcomes.append((timeout, svc.pending, load.estimate, load.stamp, load.active))
        assert outcomes[0] == outcomes[1]
        assert outcomes[1][0] == (0.0 if waited > 10 else pytest.approx(10.0 - waited))


def test_an_endpoint_key_is_hashed_and_compared_in_c_by_service_port_and_ip() -> None:
    """``Endpoint`` is looked up three times a call (the session's routes and records, the
    proxy's upstreams): equal and hashed alike by (service, port, IP) whatever its backend
    target and connect timeout, unequal when any of the three differs, and each look-up makes
    no Python call (a dataclass's ``__hash__`` and ``__eq__`` made two)."""
    target, other_target = cast(ServiceTarget, object()), cast(ServiceTarget, object())
    first = Endpoint(("default", "web"), 8080, "10.0.0.1", target, 0.3)
    again = Endpoint(("default", "web"), 8080, "10.0.0.1", other_target, None)
    assert first == again and hash(first) == hash(again)
    assert (first.service, first.port, first.ip) == (("default", "web"), 8080, "10.0.0.1")
    assert (first.target, first.connect_timeout, again.connect_timeout) == (target, 0.3, None)
    assert str(first) == "default/web:8080@10.0.0.1"
    others = [
        Endpoint(("default", "api"), 8080, "10.0.0.1", target),
        Endpoint(("other", "web"), 8080, "10.0.0.1", target),
        Endpoint(("default", "web"), 8081, "10.0.0.1", target),
        Endpoint(("default", "web"), 8080, "10.0.0.2", target),
    ]
    assert all(first != other for other in others)
    kept = {first: "upstream", **{other: "else" for other in others}}
    calls = 0

    def profile(_frame: object, event: str, _arg: object) -> None:
        nonlocal calls
        calls += event == "call"

    sys.setprofile(profile)
    try:
        found = kept.get(again)
    finally:
        sys.setprofile(None)
    assert found == "upstream"
    assert calls == 0
