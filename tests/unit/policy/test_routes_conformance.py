"""Gateway API conformance of nodemesh's mesh routes (GAMMA), sans-IO, one test per scenario.

Each test names the clause of the specification it checks: the API reference
(``apis/v1/httproute_types.go``, ``grpcroute_types.go``, ``shared_types.go``), the mesh
conformance tests (``conformance/tests/mesh/*``) or the mesh GEPs (GEP-1294 producer/consumer
routes, GEP-1686 the mesh conformance plan). Where nodemesh deliberately differs, the test says
so and pins nodemesh's documented behaviour. Cases whose effect only shows in the data path go
through the sans-IO source path: ``HttpRouter.admit`` (HTTP/1.1, as in
``tests/unit/proxy/test_http_router.py``) and ``h2route.route_request`` (HTTP/2 and gRPC, as in
``tests/unit/proxy/test_h2route.py``, whose fixtures the last tests borrow).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from agent.policy.routes import (
    Backend,
    GrpcRequest,
    HttpRequest,
    NoMatchingRule,
    Rejected,
    RouteAction,
    RouteTable,
    choose_backend,
    merged_parents,
    modify_headers,
    redirect_location,
    rewrite_request,
)
from agent.policy.routes.compile import FILTER_FIELDS, compile_route
from agent.policy.routes.filters import then
from agent.policy.routes.model import HeaderModifier, HttpMatch, Route
from agent.policy.routes.parents import ParentVerdict
from agent.policy.traffic.control import TrafficControl
from agent.proxy.h2exchange import Choice, LocalAnswer, PickRequest
from agent.proxy.h2route import Endpoint as H2Endpoint
from agent.proxy.h2route import route_request
from agent.proxy.http1 import RequestHead
from agent.proxy.http_router import HttpRouter, LocalResponse
from agent.proxy.resolve import ServiceTarget
from agent.state import Endpoint, RouteObject, StateStore
from tests.unit.policy.routes_fixtures import (
    NS,
    backend,
    mesh_services,
    route,
    snapshot,
    svc,
)
from tests.unit.proxy.test_h2route import _store as h2_store
from tests.unit.proxy.test_http_router import PODS, _ref
from tests.unit.proxy.test_http_router import _route as h2_http_route
from tests.unit.proxy.test_http_router import _target as h2_target
from tests.unit.traffic.traffic_helpers import FakeClock

ECHO = (NS, "echo")
OLD, NEW = "2025-01-01T00:00:00Z", "2026-01-01T00:00:00Z"


# -- helpers ---------------------------------------------------------------------------------
def _table(routes: list[RouteObject], services: list[Any] | None = None) -> RouteTable:
    return RouteTable.build(snapshot(services or mesh_services(), routes))


def _get(target: str, method: str = "GET", **headers: str) -> HttpRequest:
    return HttpRequest.from_target(method, target, [(k.lower(), v) for k, v in headers.items()])


def _to(table: RouteTable, request: HttpRequest, *, client: str = NS, port: int = 80) -> object:
    """Where a request goes: a backend name, 404 (no rule matched) or None (no route)."""
    decision = table.http(ECHO, port, request, client_namespace=client)
    if decision is None:
        return None
    if isinstance(decision, NoMatchingRule):
        return 404
    assert isinstance(decision, RouteAction)
    (only,) = decision.backends
    return only.name


def _one(name: str, match: dict[str, Any], to: str, created: str = NEW) -> RouteObject:
    return route(name, [{"matches": [match], "backendRefs": [backend(to)]}], created=created)


def _compiled(rules: list[dict[str, Any]], kind: str = "HTTPRoute") -> Route | Rejected:
    return compile_route(route("r", rules, kind=kind), {s.key: s for s in mesh_services()})


def _refused(rules: list[dict[str, Any]], kind: str = "HTTPRoute") -> str:
    """The field path of the refusal (the route must be refused)."""
    result = _compiled(rules, kind)
    assert isinstance(result, Rejected), f"accepted: {rules}"
    return result.error.path


def _verdict(r: RouteObject, services: list[Any] | None = None) -> ParentVerdict:
    (v,) = _table([r], services).verdicts[r.key]
    return v


def _filter(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, FILTER_FIELDS.get(kind, kind.lower()): body}


# -- HTTPRouteRule.matches and HTTPPathMatch -------------------------------------------------
@pytest.mark.parametrize(
    ("value", "path", "matches"),
    [
        ("/foo", "/foo", True),
        ("/foo", "/foo/", True),
        ("/foo", "/foo/bar", True),
        ("/foo", "/foobar", False),  # element-wise, not a string prefix
        ("/foo/", "/foo", True),  # "When specified, a trailing `/` is ignored"
        ("/foo/", "/foo/bar", True),
        ("/foo/", "/foobar", False),
        ("/", "/anything", True),
        ("/foo", "/FOO", False),  # "Matching is case-sensitive"
    ],
)
def test_path_prefix_matches_whole_path_elements(value: str, path: str, matches: bool) -> None:
    """PathMatchPathPrefix: "the paths /abc, /abc/, and /abc/def would all match the prefix
    /abc, but the path /abcd would not"."""
    table = _table([_one("r", {"path": {"type": "PathPrefix", "value": value}}, "echo-v1")])
    assert _to(table, _get(path)) == ("echo-v1" if matches else 404)


def test_exact_path_matches_the_path_and_nothing_else() -> None:
    """PathMatchExact: matches the full path, case-sensitively (no trailing-slash leniency)."""
    table = _table([_one("r", {"path": {"type": "Exact", "value": "/foo"}}, "echo-v1")])
    assert [_to(table, _get(p)) for p in ("/foo", "/foo/", "/foo/bar", "/Foo")] == [
        "echo-v1",
        404,
        404,
        404,
    ]


def test_the_matches_of_a_rule_are_ored_and_a_matchs_conditions_anded() -> None:
    """HTTPRouteRule.Matches: "this rule will be matched if **any** one of the matches is
    satisfied"; HTTPRouteMatch: its conditions are ANDed (the spec's own example)."""
    rules = [
        {
            "matches": [
                {"path": {"value": "/foo"}, "headers": [{"name": "version", "value": "v2"}]},
                {"path": {"value": "/v2/foo"}},
            ],
            "backendRefs": [backend("echo-v2")],
        }
    ]
    table = _table([route("r", rules)])
    assert _to(table, _get("/foo", version="v2")) == "echo-v2"
    assert _to(table, _get("/v2/foo")) == "echo-v2"
    assert _to(table, _get("/foo")) == 404  # the first match lacks its header
    assert _to(table, _get("/v3", version="v2")) == 404  # ... or its path


def test_a_rule_without_matches_matches_every_request() -> None:
    """HTTPRouteRule.Matches: "If no matches are specified, the default is a prefix path match
    on "/", which has the effect of matching every HTTP request"."""
    table = _table([route("r", [{"backendRefs": [backend("echo-v1")]}])])
    assert _to(table, _get("/any/path?x=1", "DELETE")) == "echo-v1"


def test_header_names_are_case_insensitive_and_the_first_equivalent_name_counts() -> None:
    """HTTPHeaderMatch.Name: "only the first entry with an equivalent name MUST be considered
    for a match ... "foo" and "Foo" are considered equivalent"; values are case-sensitive."""
    match = {
        "headers": [{"name": "X-Version", "value": "one"}, {"name": "x-version", "value": "2"}]
    }
    table = _table([_one("r", match, "echo-v1")])
    assert _to(table, _get("/", **{"x-version": "one"})) == "echo-v1"
    assert _to(table, _get("/", **{"x-version": "2"})) == 404
    assert _to(table, _get("/", **{"x-version": "ONE"})) == 404


def test_a_host_header_match_reads_the_http2_authority() -> None:
    """HTTPHeaderMatch on ``Host``: HTTP/2 sends the authority as ``:authority``, not a
    ``host`` field (RFC 9113 §8.3.1); the match must hold on either version, as it does in
    Envoy-based meshes, or a route would split HTTP/1.1 and HTTP/2 clients differently."""
    table = _table([_one("r", {"headers": [{"name": "Host", "value": "echo.example"}]}, "echo-v1")])
    http1 = HttpRequest("GET", "/", (("host", "echo.example"),), authority="echo.example")
    http2 = HttpRequest("GET", "/", (("user-agent", "grpc"),), authority="echo.example")
    assert (_to(table, http1), _to(table, http2)) == ("echo-v1", "echo-v1")
    other = HttpRequest("GET", "/", (), authority="other")
    assert _to(table, other) == 404
    grpc = GrpcRequest("pkg.Echo", "Unary", (), authority="echo.example")
    assert grpc.header("host") == "echo.example"


def test_query_param_names_are_exact_and_the_first_entry_counts() -> None:
    """HTTPQueryParamMatch.Name: "This must be an exact string match" (case-sensitive), and
    of equivalent names only the first entry is considered (MeshHTTPRouteQueryParamMatching)."""
    match = {
        "queryParams": [{"name": "animal", "value": "whale"}, {"name": "animal", "value": "x"}]
    }
    table = _table([_one("r", match, "echo-v1")])
    assert _to(table, _get("/?animal=whale")) == "echo-v1"
    assert _to(table, _get("/?ANIMAL=whale")) == 404
    assert _to(table, _get("/?animal=whaledolphin")) == 404
    assert _to(table, _get("/?animal=x")) == 404


@pytest.mark.parametrize(
    ("winner", "loser", "target", "headers", "method"),
    [
        (
            {"path": {"type": "Exact", "value": "/a/b"}},
            {"path": {"value": "/a/b"}},
            "/a/b",
            {},
            "GET",
        ),
        ({"path": {"value": "/a/b"}}, {"path": {"value": "/a"}}, "/a/b", {}, "GET"),
        (
            {"path": {"value": "/a"}, "method": "GET"},
            {"path": {"value": "/a"}, "headers": [{"name": "x", "value": "1"}]},
            "/a",
            {"x": "1"},
            "GET",
        ),
        (
            {"headers": [{"name": "x", "value": "1"}, {"name": "y", "value": "2"}]},
            {
                "headers": [{"name": "x", "value": "1"}],
                "queryParams": [{"name": "q", "value": "1"}],
            },
            "/?q=1",
            {"x": "1", "y": "2"},
            "GET",
        ),
        (
            {"queryParams": [{"name": "q", "value": "1"}]},
            {"path": {"value": "/"}},
            "/?q=1",
            {},
            "GET",
        ),
    ],
    ids=["exact>prefix", "longest-prefix", "method>headers", "headers>query", "query>none"],
)
def test_match_precedence_across_routes(
    winner: dict[str, Any],
    loser: dict[str, Any],
    target: str,
    headers: dict[str, str],
    method: str,
) -> None:
    """HTTPRouteRule.Matches: precedence "across all rules specified on applicable Routes":
    Exact path, longest prefix, method, most headers, most query params. The loser is the
    older route and sorts first by name, so only the criterion can decide."""
    table = _table([_one("z", winner, "echo-v1", NEW), _one("a", loser, "echo-v2", OLD)])
    assert _to(table, _get(target, method, **headers)) == "echo-v1"


def test_ties_go_to_the_oldest_route_then_by_name_then_the_first_rule() -> None:
    """HTTPRouteRule.Matches: remaining ties go to the oldest Route, then "{namespace}/{name}"
    alphabetically, then "the FIRST matching rule (in list order)"."""
    same: dict[str, Any] = {"path": {"value": "/"}}
    assert _to(
        _table([_one("b", same, "echo-v1", OLD), _one("a", same, "echo-v2")]), _get("/")
    ) == ("echo-v1")
    assert _to(_table([_one("b", same, "echo-v2"), _one("a", same, "echo-v1")]), _get("/")) == (
        "echo-v1"
    )
    in_order = route(
        "r",
        [
            {"matches": [same], "backendRefs": [backend("echo-v2")]},
            {"matches": [same], "backendRefs": [backend("echo-v1")]},
        ],
    )
    assert _to(_table([in_order]), _get("/")) == "echo-v2"


def test_regex_paths_rank_above_prefixes_as_documented() -> None:
    """HTTPRouteRule.Matches: "The precedence of RegularExpression path matches are
    implementation-specific"; nodemesh puts them below Exact and above every PathPrefix
    (README), so a catch-all "/" does not shadow them."""
    regex = {"path": {"type": "RegularExpression", "value": "/items/[0-9]+"}}
    table = _table(
        [
            _one("a", {"path": {"value": "/items"}}, "echo-v2", OLD),
            _one("b", regex, "echo-v1"),
            _one("c", {"path": {"type": "Exact", "value": "/items/7"}}, "echo"),
        ]
    )
    assert [_to(table, _get(p)) for p in ("/items/42", "/items/7", "/items/x")] == [
        "echo-v1",
        "echo",
        "echo-v2",
    ]


def test_routes_attached_but_none_matching_is_404() -> None:
    """HTTPRouteRule.Matches: "When no rules matching a request have been successfully
    attached to the parent a request is coming from, a HTTP 404 status code MUST be
    returned"; with no route attached the Service behaves as dialled (GAMMA request flow)."""
    table = _table([_one("r", {"path": {"value": "/api"}}, "echo-v1")])
    assert _to(table, _get("/web")) == 404
    assert table.http((NS, "echo-v1"), 80, _get("/web"), client_namespace=NS) is None


def test_a_rule_without_backend_refs_goes_to_the_parent_service() -> None:
    """GEP-1686 "Omitted backendRefs": requests are directed to the endpoints of the Service
    parentRef, on the port the client dialled."""
    parents = [{"group": "", "kind": "Service", "name": "echo"}]
    services = [svc("echo", (80, "http"), (8080, "http-alt"))]
    table = _table([route("r", [{}], parents=parents)], services)
    for port in (80, 8080):
        decision = table.http(ECHO, port, _get("/"), client_namespace=NS)
        assert isinstance(decision, RouteAction)
        assert decision.backends == (Backend(NS, "echo", port),)


def test_hostnames_are_not_matched_in_the_mesh() -> None:
    """MeshFrontendHostname: a mesh route applies by the Service dialled, not ``Host``."""
    r = route(
        "r",
        [{"backendRefs": [backend("echo-v1")]}],
        extra={"hostnames": ["other.example.com"]},
    )
    table = _table([r])
    request = HttpRequest.from_target("GET", "/", [("host", "echo-v2")], authority="echo-v2")
    assert _to(table, request) == "echo-v1"


def test_a_parent_port_scopes_the_route_to_that_service_port() -> None:
    """MeshPorts / ParentReference.Port: with a port only that Service port is routed; without
    one, every (HTTP) port of the Service is."""
    services = [svc("echo", (80, "http"), (8080, "http-alt")), svc("echo-v1")]
    pinned = route("r", [{"backendRefs": [backend("echo-v1")]}])
    table = _table([pinned], services)
    assert (_to(table, _get("/")), _to(table, _get("/"), port=8080)) == ("echo-v1", None)
    anyport = route(
        "r",
        [{"backendRefs": [backend("echo-v1")]}],
        parents=[{"group": "", "kind": "Service", "name": "echo"}],
    )
    table = _table([anyport], services)
    assert (_to(table, _get("/")), _to(table, _get("/"), port=8080)) == ("echo-v1", "echo-v1")


# -- producer and consumer routes ------------------------------------------------------------
CONSUMER_PARENT = [{"group": "", "kind": "Service", "name": "echo", "namespace": NS, "port": 80}]


def test_a_consumer_route_applies_only_to_its_namespaces_clients() -> None:
    """MeshConsumerRoute / GEP-1294: a route in another namespace than its Service affects only
    requests from that namespace, and (GEP-1686) has priority over the producer's routes. Its
    backendRefs may name Services of another namespace without a ReferenceGrant."""
    producer = route("producer", [{"backendRefs": [backend("echo-v1")]}])
    consumer = route(
        "consumer",
        [{"backendRefs": [{"name": "echo-v2", "namespace": NS, "port": 80}]}],
        namespace="client-ns",
        parents=CONSUMER_PARENT,
    )
    table = _table([producer, consumer])
    (verdict,) = table.verdicts[consumer.key]
    assert (verdict.accepted.status, verdict.resolved.status) == (True, True)
    action = table.http(ECHO, 80, _get("/"), client_namespace="client-ns")
    assert isinstance(action, RouteAction) and action.backends[0].resolved
    assert _to(table, _get("/"), client="client-ns") == "echo-v2"
    assert _to(table, _get("/"), client=NS) == "echo-v1"
    assert _to(table, _get("/"), client="third-ns") == "echo-v1"


def test_a_consumer_httproute_takes_its_namespaces_grpc_calls_over_a_producer_grpcroute() -> None:
    """GEP-1686: "Consumer routes have priority over producer routes", whatever their kind: a
    consumer HTTPRoute on a gRPC port (e.g. for its ``retry``) serves that namespace's calls
    even where the producer attached a GRPCRoute; other clients keep the GRPCRoute."""
    services = [svc("echo", (80, "grpc")), svc("echo-v1", (80, "grpc"))]
    producer = route("producer", [{"backendRefs": [backend("echo-v1")]}], kind="GRPCRoute")
    consumer = route(
        "consumer",
        [{"retry": {"attempts": 2, "codes": [503]}}],
        namespace="client-ns",
        parents=CONSUMER_PARENT,
    )
    table = _table([producer, consumer], services)
    call = GrpcRequest("pkg.Echo", "Unary")
    mine = table.grpc(ECHO, 80, call, client_namespace="client-ns")
    assert isinstance(mine, RouteAction) and mine.route == ("HTTPRoute", "client-ns", "consumer")
    theirs = table.grpc(ECHO, 80, call, client_namespace="third-ns")
    assert isinstance(theirs, RouteAction) and theirs.route == ("GRPCRoute", NS, "producer")


# -- backendRefs -----------------------------------------------------------------------------
def test_weights_split_and_a_zero_weight_backend_gets_nothing() -> None:
    """HTTPBackendRef.Weight: proportional; 0 means no requests; every weight 0 → no backend
    (the data path answers 500, HTTPRouteAllBackendsWeightZero)."""
    backends = (Backend(NS, "a", 80, 0), Backend(NS, "b", 80, 3), Backend(NS, "c", 80, 1))
    picks = [choose_backend(backends, i / 100) for i in range(100)]
    names = [pick.name if pick is not None else "" for pick in picks]
    assert (names.count("a"), names.count("b"), names.count("c")) == (0, 75, 25)
    assert choose_backend((Backend(NS, "a", 80, 0), Backend(NS, "b", 80, 0)), 0.5) is None


def test_a_missing_backend_keeps_the_route_and_its_share_is_unresolved() -> None:
    """HTTPRouteRule.BackendRefs: "the proportion of requests that would otherwise have been
    routed to an invalid backend MUST receive a 500"; ResolvedRefs=False, BackendNotFound."""
    r = route("r", [{"backendRefs": [backend("echo-v1"), backend("nope")]}])
    table = _table([r])
    verdict = table.verdicts[r.key][0]
    assert (verdict.accepted.status, verdict.resolved.status) == (True, False)
    assert verdict.resolved.reason == "BackendNotFound"
    action = table.http(ECHO, 80, _get("/"), client_namespace=NS)
    assert isinstance(action, RouteAction)
    assert [b.resolved for b in action.backends] == [True, False]


def test_a_backend_port_the_service_lacks_is_backend_not_found() -> None:
    """HTTPRouteRule.BackendRefs / RouteReasonBackendNotFound: a backendRef to a port its
    Service does not have cannot be sent to (the data path answers 500); status says why,
    as for a missing Service."""
    r = route("r", [{"backendRefs": [backend("echo-v1", port=8080)]}])
    table = _table([r])
    verdict = table.verdicts[r.key][0]
    assert (verdict.accepted.status, verdict.resolved.status) == (True, False)
    assert verdict.resolved.reason == "BackendNotFound"
    assert "port 8080 of Service" in verdict.resolved.message
    action = table.http(ECHO, 80, _get("/"), client_namespace=NS)
    assert isinstance(action, RouteAction) and not action.backends[0].resolved


def test_a_backend_of_another_kind_is_invalid_kind() -> None:
    """BackendObjectReference: a kind other than Service → InvalidKind."""
    import_ref = {"group": "multicluster.x-k8s.io", "kind": "ServiceImport", "name": "e"}
    assert _verdict(route("r", [{"backendRefs": [import_ref]}])).resolved.reason == "InvalidKind"


def test_backends_and_mirrors_may_name_any_namespace_without_a_reference_grant() -> None:
    """GEP-1294, "Namespace boundaries": "Routes of either type can send traffic to
    backendRefs in any namespace. Unlike Gateway bound routes, this is allowed without a
    ReferenceGrant", unless the mesh would reach a broader scope than the client could; in
    nodemesh the request keeps the client's identity and meets the backend's own policies, so
    no ReferenceGrant is asked for. A Service missing there is BackendNotFound, as here."""
    pod = Endpoint("10.244.9.9", "elsewhere/echo-v1-0")
    elsewhere = dataclasses.replace(svc("echo-v1", namespace="elsewhere"), endpoints=(pod,))
    ref = {"name": "echo-v1", "namespace": "elsewhere", "port": 80}
    mirror = _filter("RequestMirror", {"backendRef": ref})
    r = route("r", [{"backendRefs": [ref], "filters": [mirror]}])
    table = _table([r], [*mesh_services(), elsewhere])
    (verdict,) = table.verdicts[r.key]
    assert (verdict.accepted.status, verdict.resolved.status) == (True, True)
    action = table.http(ECHO, 80, _get("/"), client_namespace=NS)
    assert isinstance(action, RouteAction)
    assert action.backends == (Backend("elsewhere", "echo-v1", 80),)
    assert [m.backend.resolved for m in action.filters.mirrors] == [True]
    # The source path sends the request to that Service's endpoints.
    store = StateStore()
    with store.update() as tx:
        for s in [*mesh_services(), elsewhere]:
            tx.put_service(s)
        tx.put_route(r)
    service = store.snapshot().services[ECHO]
    router = HttpRouter(TrafficControl(clock=FakeClock(), rng=random.Random(3)))
    plan = router.admit(
        store.snapshot(),
        ServiceTarget(service, service.ports[0], "10.96.0.1"),
        _get("/"),
        "10.244.1.5",
        None,
        ("node1", None),
        client_namespace=NS,
    )
    assert plan.backend.service.key == ("elsewhere", "echo-v1")
    assert plan.attempts.next_endpoint() == pod.ip
    missing = route("m", [{"backendRefs": [ref]}])
    assert _verdict(missing).resolved.reason == "BackendNotFound"  # no Service there


def test_an_unresolved_mirror_backend_is_resolved_refs_false() -> None:
    """HTTPRequestMirrorFilter.BackendRef: "If the referent cannot be found ... set
    ResolvedRefs to status False and not configure this backend"; RequestMirror may repeat."""
    rules = [
        {
            "filters": [
                _filter("RequestMirror", {"backendRef": backend("echo-v1")}),
                _filter("RequestMirror", {"backendRef": backend("gone"), "percent": 50}),
            ]
        }
    ]
    result = _compiled(rules)
    assert isinstance(result, Route)
    mirrors = result.rules[0].filters.mirrors
    assert [(m.backend.name, m.backend.resolved, m.percent) for m in mirrors] == [
        ("echo-v1", True, 100.0),
        ("gone", False, 50.0),
    ]
    assert _verdict(route("r", rules)).resolved.reason == "BackendNotFound"


# -- filters ---------------------------------------------------------------------------------
def test_request_header_modifier_follows_the_specs_examples() -> None:
    """HTTPHeaderFilter: set overwrites (my-header: foo → bar); add appends to the existing
    values (foo → foo,bar,baz); remove drops names case-insensitively."""
    compiled = _compiled(
        [
            {
                "filters": [
                    _filter(
                        "RequestHeaderModifier",
                        {
                            "set": [{"name": "My-Header", "value": "bar"}],
                            "add": [{"name": "x-add", "value": "bar,baz"}],
                            "remove": ["My-Header1"],
                        },
                    )
                ]
            }
        ]
    )
    assert isinstance(compiled, Route)
    modifier = compiled.rules[0].filters.request_headers
    assert isinstance(modifier, HeaderModifier)
    out = HttpRequest(
        "GET",
        "/",
        modify_headers([("my-header", "foo"), ("x-add", "foo"), ("my-header1", "x")], modifier),
    )
    assert (out.header("my-header"), out.header("x-add"), out.header("my-header1")) == (
        "bar",
        "foo,bar,baz",
        None,
    )


@pytest.mark.parametrize(
    ("request_path", "prefix", "replacement", "expected"),
    [
        # The ReplacePrefixMatch table of HTTPPathModifier, row by row.
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
    ],
)
def test_replace_prefix_match_follows_the_specs_table(
    request_path: str, prefix: str, replacement: str, expected: str
) -> None:
    """HTTPPathModifier.ReplacePrefixMatch: the spec's table, compiled from a route (an empty
    replacement is valid), for URLRewrite and RequestRedirect alike."""
    path_modifier = {"type": "ReplacePrefixMatch", "replacePrefixMatch": replacement}
    for kind, body in (
        ("URLRewrite", {"path": path_modifier}),
        ("RequestRedirect", {"path": path_modifier}),
    ):
        rules = [{"matches": [{"path": {"value": prefix}}], "filters": [_filter(kind, body)]}]
        table = _table([route("r", rules)])
        action = table.http(ECHO, 80, _get(request_path), client_namespace=NS)
        assert isinstance(action, RouteAction) and isinstance(action.match, HttpMatch)
        request = HttpRequest.from_target("GET", request_path, authority="echo")
        filters = action.filters
        if filters.rewrite is not None:
            assert rewrite_request(request, filters.rewrite, action.match).path == expected
        else:
            assert filters.redirect is not None
            location = redirect_location(request, filters.redirect, action.match, service_port=80)
            assert location == f"http://echo{expected}"


def test_an_empty_replace_prefix_match_strips_the_prefix_in_the_data_path() -> None:
    """HTTPPathModifier.ReplacePrefixMatch "<empty string>" rows, end to end through the
    sans-IO router: the forwarded target loses the prefix and keeps the query."""
    store = StateStore()
    with store.update() as tx:
        tx.put_service(dataclasses.replace(svc("echo"), endpoints=(Endpoint("10.244.2.2"),)))
        tx.put_route(
            route(
                "r",
                [
                    {
                        "matches": [{"path": {"value": "/api"}}],
                        "filters": [
                            _filter(
                                "URLRewrite",
                                {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": ""}},
                            )
                        ],
                    }
                ],
            )
        )
    snap = store.snapshot()
    echo = snap.services[ECHO]
    router = HttpRouter(TrafficControl(clock=FakeClock(), rng=random.Random(1)))
    target = ServiceTarget(echo, echo.ports[0], "10.96.0.1")
    for path, forwarded in (("/api/v1/items?x=1", "/v1/items?x=1"), ("/api", "/")):
        head = HttpRequest.from_target("GET", path, [("host", "echo")], authority="echo")
        plan = router.admit(
            snap, target, head, "10.244.1.5", None, ("node1", None), client_namespace=NS
        )
        assert plan.edit_request is not None
        assert plan.edit_request(path, [("host", "echo")])[0] == forwarded


@pytest.mark.parametrize(
    ("redirect", "location"),
    [
        ({}, "http://echo/p?q=1"),  # defaults: the request's scheme, Host, path; 302
        ({"port": 8083}, "http://echo:8083/p?q=1"),
        ({"scheme": "https"}, "https://echo/p?q=1"),  # the scheme's well-known port, omitted
        ({"scheme": "https", "port": 8443}, "https://echo:8443/p?q=1"),
        ({"scheme": "http", "port": 80}, "http://echo/p?q=1"),
        ({"hostname": "example.org"}, "http://example.org/p?q=1"),
    ],
)
def test_redirect_location_follows_the_port_rules(redirect: dict[str, Any], location: str) -> None:
    """HTTPRequestRedirectFilter: unset parts keep the request's; "If redirect scheme is
    not-empty, the redirect port MUST be the well-known port ...  If redirect scheme is empty,
    the redirect port MUST be the [listener, here the Service] port"; ports 80 (http) and 443
    (https) are left out of Location. Default status 302 (MeshHTTPRouteRedirect*)."""
    result = _compiled([{"filters": [_filter("RequestRedirect", redirect)]}])
    assert isinstance(result, Route)
    filters = result.rules[0].filters
    assert filters.redirect is not None and filters.redirect.status == 302
    request = HttpRequest.from_target("GET", "/p?q=1", authority="echo:80")
    assert redirect_location(request, filters.redirect, None, service_port=80) == location


@pytest.mark.parametrize(
    ("rule", "field", "reason"),
    [
        (
            {
                "filters": [
                    _filter("RequestRedirect", {"statusCode": 301}),
                    _filter("URLRewrite", {"hostname": "x"}),
                ]
            },
            "spec.rules[0].filters",
            "IncompatibleFilters",
        ),
        (
            {"filters": [_filter("RequestRedirect", {})], "backendRefs": [backend("echo-v1")]},
            "spec.rules[0].backendRefs",
            "UnsupportedValue",
        ),
        (
            {
                "filters": [
                    _filter("RequestHeaderModifier", {"remove": ["a"]}),
                    _filter("RequestHeaderModifier", {"remove": ["b"]}),
                ]
            },
            "spec.rules[0].filters[1].type",
            "IncompatibleFilters",
        ),
        (
            {
                "matches": [{"path": {"type": "Exact", "value": "/a"}}],
                "filters": [
                    _filter(
                        "URLRewrite",
                        {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/b"}},
                    )
                ],
            },
            "spec.rules[0].filters",
            "UnsupportedValue",
        ),
        (
            {"filters": [_filter("URLRewrite", {"path": {"type": "ReplaceRegex"}})]},
            "spec.rules[0].filters[0].urlRewrite.path.type",
            "UnsupportedValue",
        ),
        (
            {"filters": [_filter("RequestRedirect", {"statusCode": 304})]},
            "spec.rules[0].filters[0].requestRedirect.statusCode",
            "UnsupportedValue",
        ),
        (
            {
                "filters": [
                    _filter(
                        "RequestMirror",
                        {
                            "backendRef": backend("echo-v1"),
                            "percent": 5,
                            "fraction": {"numerator": 1},
                        },
                    )
                ]
            },
            "spec.rules[0].filters[0].requestMirror",
            "UnsupportedValue",
        ),
        ({"filters": [_filter("CORS", {})]}, "spec.rules[0].filters[0].type", "UnsupportedValue"),
    ],
    ids=[
        "redirect+rewrite",
        "redirect+backendRefs",
        "repeated-modifier",
        "prefix-rewrite-on-exact",
        "unknown-path-modifier",
        "unknown-status",
        "mirror-percent+fraction",
        "unimplemented-filter",
    ],
)
def test_invalid_filter_combinations_refuse_the_route(
    rule: dict[str, Any], field: str, reason: str
) -> None:
    """HTTPRouteRule.Filters CEL rules and enums: RequestRedirect excludes URLRewrite and
    backendRefs; only RequestMirror may repeat; ReplacePrefixMatch needs a PathPrefix match;
    "Unknown values here must result in ... Accepted ... False, with a Reason of
    UnsupportedValue". A filter nodemesh does not implement (CORS) refuses the route too.
    Filters that exclude each other give the reason the spec offers for them,
    IncompatibleFilters."""
    assert _refused([rule]) == field
    (verdict,) = _table([route("r", [rule])]).verdicts[("HTTPRoute", NS, "r")]
    assert (verdict.accepted.status, verdict.accepted.reason) == (False, reason)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"hostname": "evil\r\nx-injected: 1"}, "hostname"),
        ({"hostname": "example.org\n"}, "hostname"),  # ``$`` alone matches before a last LF
        ({"hostname": "example.org:8080"}, "hostname"),
        ({"hostname": "*.example.org"}, "hostname"),
        ({"hostname": "Example.org"}, "hostname"),
        ({"path": {"type": "ReplaceFullPath", "replaceFullPath": "/a\r\nx: 1"}}, "path"),
        ({"path": {"type": "ReplaceFullPath", "replaceFullPath": "/a\n"}}, "path"),
        ({"path": {"type": "ReplaceFullPath", "replaceFullPath": "/a b"}}, "path"),
        ({"path": {"type": "ReplaceFullPath", "replaceFullPath": "/a?b=1"}}, "path"),
        ({"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "xyz"}}, "path"),
    ],
)
def test_redirect_and_rewrite_values_are_hostnames_and_paths(
    body: dict[str, Any], field: str
) -> None:
    """HTTPRequestRedirectFilter / HTTPURLRewriteFilter: ``hostname`` is a PreciseHostname (a
    DNS name: no port, no wildcard, lower case); a path modifier's value is a path. Both end
    up in a request head or ``Location``, so nothing else may pass (CR LF would inject a
    header)."""
    for kind in ("RequestRedirect", "URLRewrite"):
        path = _refused([{"filters": [_filter(kind, body)]}])
        inner = ".replaceFullPath" if "replaceFullPath" in str(body) else ""
        inner = ".replacePrefixMatch" if "replacePrefixMatch" in str(body) else inner
        assert path == f"spec.rules[0].filters[0].{FILTER_FIELDS[kind]}.{field}{inner}"


@pytest.mark.parametrize("name", ["x-a\n", "x-a\r\nx-b", "x a"])
def test_a_header_modifier_name_that_could_break_the_head_is_refused(name: str) -> None:
    """HTTPHeaderName is an RFC 7230 token. A name is written into the forwarded head as it
    stands, so a line break in it (a trailing LF, which a ``$`` anchor alone lets through)
    would inject a header."""
    for kind in ("RequestHeaderModifier", "ResponseHeaderModifier"):
        body = {"set": [{"name": name, "value": "1"}]}
        path = _refused([{"filters": [_filter(kind, body)]}])
        assert path == f"spec.rules[0].filters[0].{FILTER_FIELDS[kind]}.set[0].name"


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("/a%20b", True),
        ("/a/b.c~d", True),
        ("/a%2Fb", False),
        ("/a%2fb", False),
        ("/a/..", False),
        ("/a/.", False),
        ("/a b", False),
        ("/a?b", False),
        ("/a#b", False),
        ("/a//b", False),
        ("a", False),
    ],
)
def test_path_values_are_checked_as_the_spec_does(value: str, valid: bool) -> None:
    """HTTPPathMatch's CEL rules for Exact and PathPrefix: an absolute path of RFC 3986 path
    characters, no '//', '/./', '/../', '%2f', '%2F', '#', no trailing '/..' or '/.'. The
    lab applies manifests without the API server's checks, so nodemesh makes them itself."""
    for kind in ("Exact", "PathPrefix"):
        rules = [{"matches": [{"path": {"type": kind, "value": value}}]}]
        result = _compiled(rules)
        assert isinstance(result, Route) is valid, (kind, value)
        if not valid:
            assert _refused(rules) == "spec.rules[0].matches[0].path.value"


def test_list_sizes_are_bounded_as_the_api_bounds_them() -> None:
    """The API's MaxItems (and MinItems: an HTTPRoute has at least one rule): 16 rules, 64
    matches per rule and 128 in all (CEL), 16 headers, query parameters, filters and
    backendRefs, 32 parentRefs. They bound the sorted matches each request walks; the lab
    has no API server to enforce them."""
    assert _refused([{}] * 17) == "spec.rules"
    assert _refused([]) == "spec.rules"  # HTTPRoute rules: MinItems=1
    assert _refused([{"matches": [{}] * 65}]) == "spec.rules[0].matches"
    assert _refused([{"matches": [{}] * 64}] * 3) == "spec.rules"
    assert isinstance(_compiled([{"matches": [{}] * 64}] * 2), Route)
    many = [{"name": f"h{i}", "value": "1"} for i in range(17)]
    assert _refused([{"matches": [{"headers": many}]}]) == "spec.rules[0].matches[0].headers"
    refs = [backend("echo-v1")] * 17
    assert _refused([{"backendRefs": refs}]) == "spec.rules[0].backendRefs"
    parents = [{"group": "", "kind": "Service", "name": "echo", "port": 80}] * 33
    rejected = compile_route(route("r", [{}], parents=parents), {})
    assert isinstance(rejected, Rejected) and rejected.error.path == "spec.parentRefs"


def test_query_parameter_names_are_checked_like_header_names() -> None:
    """HTTPQueryParamMatch.Name is an HTTPHeaderName: a token, e.g. no space or '='."""
    bad = {"queryParams": [{"name": "a=b", "value": "1"}]}
    assert _refused([{"matches": [bad]}]) == "spec.rules[0].matches[0].queryParams[0].name"


def test_rule_names_are_section_names_unique_within_the_route() -> None:
    """HTTPRouteRule.Name (SectionName): "This name MUST be unique within a Route"."""
    ok = _compiled([{"name": "canary"}, {"name": "rest.v1"}])
    assert isinstance(ok, Route) and [r.name for r in ok.rules] == ["canary", "rest.v1"]
    assert _refused([{"name": "canary"}, {"name": "canary"}]) == "spec.rules[1].name"
    assert _refused([{"name": "Canary_1"}]) == "spec.rules[0].name"


# -- timeouts --------------------------------------------------------------------------------
def test_timeouts_request_and_backend_request() -> None:
    """HTTPRouteTimeouts: GEP-2257 durations; "0s" disables a timeout; backendRequest must be
    no more than request (CEL), unless request is "0s"."""
    result = _compiled([{"timeouts": {"request": "1m30s", "backendRequest": "500ms"}}])
    assert isinstance(result, Route)
    t = result.rules[0].timeouts
    assert (t.request, t.backend_request) == (90.0, 0.5)
    off = _compiled([{"timeouts": {"request": "0s", "backendRequest": "10s"}}])
    assert isinstance(off, Route)
    assert (off.rules[0].timeouts.request, off.rules[0].timeouts.backend_request) == (None, 10.0)
    refused = [{"timeouts": {"request": "1s", "backendRequest": "2s"}}]
    assert _refused(refused) == "spec.rules[0].timeouts.backendRequest"
    assert _refused([{"timeouts": {"request": "1.5s"}}]) == "spec.rules[0].timeouts.request"


@pytest.mark.parametrize("attempts", [0, -1, 1001, True, "2"])
def test_retry_attempts_below_one_or_not_an_integer_refuse_the_route(attempts: object) -> None:
    """HTTPRouteRetry.Attempts: ``+kubebuilder:validation:Minimum:=1`` (gateway-api #4892).
    The lab has no API server to refuse 0, so nodemesh does: the route is refused whole
    (``Accepted=False``, ``UnsupportedValue``) and its status names the field and the range."""
    rules = [{"retry": {"attempts": attempts, "codes": [503]}}]
    assert _refused(rules) == "spec.rules[0].retry.attempts"
    (verdict,) = _table([route("r", rules)]).verdicts[("HTTPRoute", NS, "r")]
    assert (verdict.accepted.status, verdict.accepted.reason) == (False, "UnsupportedValue")
    assert verdict.accepted.message.startswith("spec.rules[0].retry.attempts: ")
    assert "1 to 1000" in verdict.accepted.message
    if attempts == 0:
        assert "remove the rule's retry" in verdict.accepted.message


def test_retry_attempts_from_one_are_accepted() -> None:
    """The smallest valid HTTPRouteRetry.Attempts (1) and nodemesh's largest (1000)."""
    for attempts in (1, 1000):
        result = _compiled([{"retry": {"attempts": attempts}}])
        assert isinstance(result, Route)
        retry = result.rules[0].retry
        assert retry is not None and retry.attempts == attempts


# -- GRPCRoute -------------------------------------------------------------------------------
GRPC_SERVICES = [
    svc("echo", (80, "grpc")),
    svc("echo-v1", (80, "grpc")),
    svc("echo-v2", (80, "grpc")),
]


def _grpc_to(table: RouteTable, service: str, method: str) -> object:
    decision = table.grpc(ECHO, 80, GrpcRequest(service, method), client_namespace=NS)
    if isinstance(decision, NoMatchingRule):
        return "UNIMPLEMENTED"
    assert isinstance(decision, RouteAction)
    return decision.backends[0].name


def test_grpc_method_match_exact_method_only_and_regex() -> None:
    """GRPCMethodMatch: Exact service+method (Core), method without service, and
    RegularExpression (RE2 here); an unmatched call is UNIMPLEMENTED (404 for HTTP)."""
    rules = [
        {
            "matches": [{"method": {"service": "pkg.Echo", "method": "Unary"}}],
            "backendRefs": [backend("echo-v1")],
        },
        {"matches": [{"method": {"method": "Health"}}], "backendRefs": [backend("echo-v2")]},
        {
            "matches": [{"method": {"type": "RegularExpression", "service": "pkg\\.v[0-9]+\\..*"}}],
            "backendRefs": [backend("echo")],
        },
    ]
    table = _table([route("g", rules, kind="GRPCRoute")], GRPC_SERVICES)
    assert _grpc_to(table, "pkg.Echo", "Unary") == "echo-v1"
    assert _grpc_to(table, "pkg.echo", "Unary") == "UNIMPLEMENTED"  # Exact is case-sensitive
    assert _grpc_to(table, "any.Service", "Health") == "echo-v2"
    assert _grpc_to(table, "pkg.v2.Echo", "Stream") == "echo"
    assert _grpc_to(table, "pkg.Echo", "Stream") == "UNIMPLEMENTED"


def test_grpc_precedence_service_then_method_then_headers() -> None:
    """GRPCRouteRule.Matches: precedence to the most characters of a matching service, then
    of a matching method, then most header matches; then oldest route, then name."""
    table = _table(
        [
            route(
                "a",
                [
                    {
                        "matches": [{"method": {"method": "Unary"}}],
                        "backendRefs": [backend("echo-v2")],
                    }
                ],
                kind="GRPCRoute",
                created=OLD,
            ),
            route(
                "z",
                [
                    {
                        "matches": [{"method": {"service": "pkg.Echo"}}],
                        "backendRefs": [backend("echo-v1")],
                    }
                ],
                kind="GRPCRoute",
            ),
        ],
        GRPC_SERVICES,
    )
    assert _grpc_to(table, "pkg.Echo", "Unary") == "echo-v1"
    assert _grpc_to(table, "other.Svc", "Unary") == "echo-v2"


@pytest.mark.parametrize(
    ("method", "field"),
    [
        ({"service": "pkg.Echo/Unary"}, "service"),
        ({"service": "pkg..Echo"}, "service"),
        ({"service": "pkg.Echo", "method": "Un/ary"}, "method"),
        ({"method": "1Unary"}, "method"),
        ({"type": "Exact"}, None),
    ],
)
def test_grpc_exact_names_are_checked_as_the_spec_does(
    method: dict[str, Any], field: str | None
) -> None:
    """GRPCMethodMatch CEL: an Exact service must match ``^(?i)\\.?[a-z_][a-z_0-9]*(\\.[a-z_]
    [a-z_0-9]*)*$``, a method ``^[A-Za-z_][A-Za-z_0-9]*$``, and one of them must be set: a
    name with '/' could never equal a call's, and the route would silently match nothing."""
    path = _refused([{"matches": [{"method": method}]}], kind="GRPCRoute")
    assert path == "spec.rules[0].matches[0].method" + (f".{field}" if field else "")
    regex = {"type": "RegularExpression", "service": "pkg/.*"}
    assert isinstance(_compiled([{"matches": [{"method": regex}]}], kind="GRPCRoute"), Route)


def test_a_grpcroute_without_rules_answers_unimplemented_naming_the_route() -> None:
    """GRPCRouteSpec.Rules has no MinItems (an HTTPRoute's has 1): ``rules: []`` is valid, is
    attached, and matches no call, so every call is ``UNIMPLEMENTED``. The refusal names the
    route like any other (the proxy logs its detail), not an empty list."""
    empty = route("g", [], kind="GRPCRoute")
    assert isinstance(_compiled([], "GRPCRoute"), Route)
    table = _table([empty], GRPC_SERVICES)
    decision = table.grpc(ECHO, 80, GrpcRequest("pkg.Echo", "Unary"), client_namespace=NS)
    assert decision == NoMatchingRule((("GRPCRoute", NS, "g"),))
    store = StateStore()
    with store.update() as tx:
        for s in GRPC_SERVICES:
            tx.put_service(s)
        tx.put_route(empty)
    service = store.snapshot().services[ECHO]
    router = HttpRouter(TrafficControl(clock=FakeClock(), rng=random.Random(3)))
    with pytest.raises(LocalResponse) as e:
        router.admit(
            store.snapshot(),
            ServiceTarget(service, service.ports[0], "10.96.0.1"),
            GrpcRequest("pkg.Echo", "Unary"),
            "10.244.1.5",
            None,
            ("node1", None),
            client_namespace=NS,
        )
    assert e.value.status == 404 and e.value.detail == f"no rule of {NS}/g matched"


def test_httproutes_and_grpcroutes_are_not_merged() -> None:
    """GRPCRouteRule.Matches: "Merging MUST not be done between GRPCRoutes and HTTPRoutes": a
    gRPC call takes the port's GRPCRoutes when there are any (its HTTPRoutes otherwise, which
    see POST /service/method: README)."""
    grpc = route(
        "g",
        [{"matches": [{"method": {"service": "pkg.Echo"}}], "backendRefs": [backend("echo-v1")]}],
        kind="GRPCRoute",
    )
    http = route("h", [{"backendRefs": [backend("echo-v2")]}], created=OLD)
    table = _table([grpc, http], GRPC_SERVICES)
    assert _grpc_to(table, "pkg.Echo", "Unary") == "echo-v1"
    assert _grpc_to(table, "other.Svc", "Unary") == "UNIMPLEMENTED"  # not the HTTPRoute
    assert _to(table, _get("/"), client=NS) == "echo-v2"  # plain HTTP/2 takes the HTTPRoute
    alone = _table([http], GRPC_SERVICES)
    assert _grpc_to(alone, "other.Svc", "Unary") == "echo-v2"


# -- status ----------------------------------------------------------------------------------
def test_parent_conditions_and_their_reasons() -> None:
    """RouteConditionAccepted / ResolvedRefs reasons: Accepted; NoMatchingParent for a parent
    Service or port that does not exist; UnsupportedValue for a route refused whole (nodemesh
    does not take the PartiallyInvalid approaches: README)."""
    good = _verdict(route("r", [{"backendRefs": [backend("echo-v1")]}]))
    assert (good.accepted.reason, good.resolved.reason) == ("Accepted", "ResolvedRefs")
    gone = [{"group": "", "kind": "Service", "name": "gone"}]
    assert _verdict(route("r", [{}], parents=gone)).accepted.reason == "NoMatchingParent"
    port = [{"group": "", "kind": "Service", "name": "echo", "port": 81}]
    assert _verdict(route("r", [{}], parents=port)).accepted.reason == "NoMatchingParent"
    bad = _verdict(route("r", [{}, {"matches": [{"path": {"value": "/a%2F"}}]}]))
    assert (bad.accepted.status, bad.accepted.reason, bad.ports) == (
        False,
        "UnsupportedValue",
        (),
    )
    assert bad.accepted.message.startswith("spec.rules[1].matches[0].path.value: ")
    assert bad.accepted.message.endswith("never a part of it)")


def _our_entry(conditions: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "parentRef": {"group": "", "kind": "Service", "name": "echo", "port": 80},
        "controllerName": "nodemesh.io/mesh-controller",
        "conditions": conditions,
    }


def test_status_keeps_condition_types_it_does_not_own() -> None:
    """RouteParentStatus.Conditions: "Implementations MUST NOT remove or reorder Conditions
    that they are not directly responsible for" (e.g. ``special.io/SomeField``)."""
    verdict = _verdict(route("r", [{"backendRefs": [backend("echo-v1")]}]))
    foreign = {"type": "special.io/SomeField", "status": "True", "reason": "Set", "message": ""}
    stale = {"type": "Accepted", "status": "False", "reason": "Pending", "observedGeneration": 1}
    merged = merged_parents(
        [_our_entry([foreign, stale])],
        [verdict],
        route_namespace=NS,
        generation=2,
        now="2026-12-06T16:00:00Z",
    )
    assert merged is not None
    (entry,) = merged
    assert [c["type"] for c in entry["conditions"]] == [
        "special.io/SomeField",
        "Accepted",
        "ResolvedRefs",
    ]
    assert entry["conditions"][0] == foreign
    assert (entry["conditions"][1]["status"], entry["conditions"][1]["observedGeneration"]) == (
        "True",
        2,
    )


def test_status_leaves_a_condition_of_a_newer_generation_alone() -> None:
    """RouteParentStatus.Conditions: "If the observedGeneration of a Condition is greater than
    the value the implementation knows about, then it MUST NOT perform the update on that
    Condition": this agent's copy of the route is stale."""
    verdict = _verdict(route("r", [{"backendRefs": [backend("nope")]}]))  # ResolvedRefs=False
    newer = [
        {"type": "Accepted", "status": "True", "reason": "Accepted", "observedGeneration": 3},
        {
            "type": "ResolvedRefs",
            "status": "True",
            "reason": "ResolvedRefs",
            "observedGeneration": 3,
        },
    ]
    merged = merged_parents(
        [_our_entry(newer)], [verdict], route_namespace=NS, generation=2, now="t"
    )
    assert merged is None  # nothing to write: both conditions are newer than what we know


# -- end to end through the HTTP/2 source path (sans-IO: agent.proxy.h2route) ----------------
def _h2_route(
    store: StateStore, request: PickRequest, *, client: str = "default"
) -> Choice | LocalAnswer:
    router = HttpRouter(TrafficControl(clock=FakeClock(), rng=random.Random(3)))
    return route_request(
        router, store.snapshot(), h2_target(store), request, "10.244.1.5", None,
        ("node1", None), client_namespace=client,
    )  # fmt: skip


def _h2_service(choice: Choice | LocalAnswer) -> tuple[str, str]:
    assert isinstance(choice, Choice) and isinstance(choice.key, H2Endpoint), choice
    return choice.key.service


def test_http2_a_host_header_match_routes_by_authority_end_to_end() -> None:
    """HTTPHeaderMatch on ``Host`` over HTTP/2 (``:authority``, no ``host`` field), through
    the source path: the request goes where the same request over HTTP/1.1 would."""
    store = h2_store(*PODS)
    h2_http_route(
        store,
        {
            "matches": [{"headers": [{"name": "Host", "value": "web"}]}],
            "backendRefs": [_ref("web-v2")],
        },
        {"backendRefs": [_ref("web-v1")]},
    )
    head = RequestHead("GET", "/x", "web", "rid", headers=[(b"user-agent", b"curl")])
    assert _h2_service(_h2_route(store, PickRequest(head, "/x", False))) == ("default", "web-v2")


def test_http2_a_consumer_httproute_serves_its_namespaces_grpc_calls_end_to_end() -> None:
    """GEP-1686 consumer priority, through the source path: the consumer's HTTPRoute takes its
    namespace's gRPC calls; another namespace's calls keep the producer's GRPCRoute."""
    store = h2_store(*PODS)
    parent = {"group": "", "kind": "Service", "name": "web", "namespace": "default", "port": 80}
    grpc = {"parentRefs": [parent], "rules": [{"backendRefs": [_ref("web-v1")]}]}
    http = {"parentRefs": [parent], "rules": [{}]}  # no backendRefs: the parent Service
    with store.update() as tx:
        tx.put_route(RouteObject("GRPCRoute", "default", "producer", grpc, 1, "p"))
        tx.put_route(RouteObject("HTTPRoute", "client-ns", "consumer", http, 1, "c"))
    head = RequestHead("POST", "/pkg.Echo/Unary", "web", "rid")
    call = PickRequest(head, "/pkg.Echo/Unary", True)
    assert _h2_service(_h2_route(store, call, client="client-ns")) == ("default", "web")
    assert _h2_service(_h2_route(store, call, client="third-ns")) == ("default", "web-v1")


# -- backendRef filters (MeshHTTPRouteBackendRequestHeaderModification) -----------------------
def _modifier_filter(kind: str, name: str, value: str) -> dict[str, Any]:
    return _filter(kind, {"set": [{"name": name, "value": value}]})


def test_a_backend_refs_header_modifier_applies_only_to_requests_sent_to_it() -> None:
    """HTTPBackendRef.Filters: "Filters defined at this level should be executed if and only
    if the request is being forwarded to the backend defined here" (mesh conformance
    MeshHTTPRouteRequestHeaderModifier, backend manifest), through the sans-IO router: the
    rule's modifier first, then the backend's on the request; on the response the backend's
    first, then the rule's."""
    store = StateStore()
    with store.update() as tx:
        for i, name in enumerate(("echo", "echo-v1", "echo-v2")):
            endpoint = Endpoint(f"10.244.2.{i + 2}")
            tx.put_service(dataclasses.replace(svc(name), endpoints=(endpoint,)))
        v1 = {
            **backend("echo-v1"),
            "filters": [
                _modifier_filter("RequestHeaderModifier", "X-Header-Set", "backend"),
                _modifier_filter("ResponseHeaderModifier", "x-side", "backend"),
            ],
        }
        rule = {
            "backendRefs": [v1, backend("echo-v2")],
            "filters": [
                _modifier_filter("RequestHeaderModifier", "x-header-set", "rule"),
                _modifier_filter("ResponseHeaderModifier", "x-side", "rule"),
            ],
        }
        tx.put_route(route("r", [rule]))
    snap = store.snapshot()
    echo = snap.services[ECHO]
    router = HttpRouter(TrafficControl(clock=FakeClock(), rng=random.Random(5)))
    target = ServiceTarget(echo, echo.ports[0], "10.96.0.1")
    seen: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]]]] = {}
    for _ in range(40):
        head = HttpRequest.from_target("GET", "/", [("host", "echo")], authority="echo")
        plan = router.admit(
            snap, target, head, "10.244.1.5", None, ("node1", None), client_namespace=NS
        )
        assert plan.edit_request is not None and plan.edit_response is not None
        _, sent = plan.edit_request("/", [("host", "echo"), ("x-header-set", "client")])
        seen[plan.backend.service.name] = (sent, plan.edit_response([]))
        plan.finish(200, 0.0, reset_before_response=False)
    assert seen["echo-v1"] == (
        [("host", "echo"), ("x-header-set", "backend")],
        [("x-side", "rule")],
    )
    assert seen["echo-v2"] == ([("host", "echo"), ("x-header-set", "rule")], [("x-side", "rule")])


def test_backend_ref_filters_other_than_header_modifiers_are_refused() -> None:
    """HTTPBackendRef.Filters: nodemesh applies the header modifiers there and refuses the
    others (README), naming the field; a repeated one is IncompatibleFilters."""
    mirror = _filter("RequestMirror", {"backendRef": backend("echo-v2")})
    ref = {**backend("echo-v1"), "filters": [mirror]}
    assert _refused([{"backendRefs": [ref]}]) == "spec.rules[0].backendRefs[0].filters[0].type"
    twice = [_modifier_filter("RequestHeaderModifier", "a", "1")] * 2
    r = route("r", [{"backendRefs": [{**backend("echo-v1"), "filters": twice}]}])
    (verdict,) = _table([r]).verdicts[r.key]
    assert (verdict.accepted.status, verdict.accepted.reason) == (False, "IncompatibleFilters")
    grpc_ref = {
        **backend("echo-v1"),
        "filters": [_modifier_filter("ResponseHeaderModifier", "a", "1")],
    }
    grpc = _compiled([{"backendRefs": [grpc_ref]}], kind="GRPCRoute")
    assert isinstance(grpc, Route) and grpc.rules[0].backends[0].response_headers is not None


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (HeaderModifier(set=(("a", "1"),)), HeaderModifier(add=(("a", "2"),))),
        (HeaderModifier(add=(("a", "1"),)), HeaderModifier(set=(("a", "2"),))),
        (HeaderModifier(set=(("a", "1"),), add=(("b", "1"),)), HeaderModifier(remove=("a", "b"))),
        (HeaderModifier(remove=("a",)), HeaderModifier(add=(("a", "2"),))),
        (HeaderModifier(add=(("a", "1"),)), HeaderModifier(add=(("a", "2"),), remove=("c",))),
    ],
)
def test_composed_header_modifiers_do_what_the_two_do_in_turn(
    first: HeaderModifier, second: HeaderModifier
) -> None:
    """``filters.then``: the rule's modifier then the backendRef's, as one."""
    headers = [("a", "0"), ("b", "0"), ("c", "0")]
    composed = then(first, second)
    assert composed is not None
    assert sorted(modify_headers(headers, composed)) == sorted(
        modify_headers(modify_headers(headers, first), second)
    )
