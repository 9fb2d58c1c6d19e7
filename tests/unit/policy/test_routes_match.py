"""Route matching and precedence, following the Gateway API's mesh conformance cases."""

from __future__ import annotations

from typing import Any

import pytest

from agent.policy.routes import (
    Backend,
    GrpcRequest,
    HttpRequest,
    NoMatchingRule,
    RouteAction,
    RouteTable,
    RouteTableCache,
    choose_backend,
)
from agent.state import Namespace, StateStore
from tests.unit.policy.routes_fixtures import (
    NS,
    backend,
    mesh_services,
    route,
    snapshot,
    svc,
)

ECHO = (NS, "echo")


def _backend_of(table: RouteTable, request: HttpRequest, *, client: str = NS) -> str | int:
    """The single backend a request goes to, or 404 when no rule matches."""
    decision = table.http(ECHO, 80, request, client_namespace=client)
    if isinstance(decision, NoMatchingRule):
        return 404
    assert isinstance(decision, RouteAction)
    assert len(decision.backends) == 1
    return decision.backends[0].name


def _get(target: str, **headers: str) -> HttpRequest:
    return HttpRequest.from_target("GET", target, [(k.lower(), v) for k, v in headers.items()])


# MeshHTTPRouteMatching: a path prefix and a header rule for two backends.
MATCHING = [
    {
        "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
        "backendRefs": [backend("echo-v1")],
    },
    {
        "matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
        "backendRefs": [backend("echo-v2")],
    },
    {
        "matches": [{"headers": [{"name": "version", "value": "two"}]}],
        "backendRefs": [backend("echo-v2")],
    },
]


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (_get("/"), "echo-v1"),
        (_get("/example"), "echo-v1"),
        (_get("/", Version="one"), "echo-v1"),
        (_get("/v2"), "echo-v2"),
        (_get("/v2/example"), "echo-v2"),
        (_get("/", Version="two"), "echo-v2"),
        (_get("/v2/"), "echo-v2"),
        (_get("/v2example"), "echo-v1"),  # not a path-segment prefix of /v2
        (_get("/foo/v2/example"), "echo-v1"),
    ],
)
def test_mesh_httproute_matching(request_: HttpRequest, expected: str) -> None:
    table = RouteTable.build(snapshot(mesh_services(), [route("mesh-split", MATCHING)]))
    assert _backend_of(table, request_) == expected


# MeshHTTPRouteQueryParamMatching.
QUERY = [
    {
        "matches": [{"queryParams": [{"name": "animal", "value": "whale"}]}],
        "backendRefs": [backend("echo-v1")],
    },
    {
        "matches": [{"queryParams": [{"name": "animal", "value": "dolphin"}]}],
        "backendRefs": [backend("echo-v2")],
    },
    {
        "matches": [
            {"path": {"value": "/path1"}, "queryParams": [{"name": "animal", "value": "whale"}]}
        ],
        "backendRefs": [backend("echo-v1")],
    },
    {
        "matches": [
            {
                "headers": [{"name": "version", "value": "one"}],
                "queryParams": [{"name": "animal", "value": "whale"}],
            }
        ],
        "backendRefs": [backend("echo-v2")],
    },
    {
        "matches": [
            {"path": {"value": "/path3"}, "queryParams": [{"name": "animal", "value": "shark"}]},
            {
                "path": {"value": "/path4"},
                "headers": [{"name": "version", "value": "three"}],
                "queryParams": [{"name": "animal", "value": "kraken"}],
            },
        ],
        "backendRefs": [backend("echo-v1")],
    },
    {
        "matches": [
            {"path": {"value": "/path5"}},  # longer prefix wins over more query matches
        ],
        "backendRefs": [backend("echo-v1")],
    },
    {
        "matches": [
            {"queryParams": [{"name": "animal", "value": "hydra"}, {"name": "x", "value": "y"}]}
        ],
        "backendRefs": [backend("echo-v2")],
    },
]


@pytest.mark.parametrize(
    ("target", "headers", "expected"),
    [
        ("/?animal=whale", {}, "echo-v1"),
        ("/?animal=dolphin", {}, "echo-v2"),
        ("/?animal=whale&otherparam=irrelevant", {}, "echo-v1"),
        ("/?animal=dolphin&color=yellow", {}, "echo-v2"),
        ("/?color=blue", {}, 404),
        ("/?animal=dog", {}, 404),
        ("/?animal=whaledolphin", {}, 404),
        ("/", {}, 404),
        ("/path1?animal=whale", {}, "echo-v1"),
        ("/?animal=whale", {"version": "one"}, "echo-v2"),  # a header match outranks none
        ("/path3?animal=shark", {}, "echo-v1"),  # matches are OR'd
        ("/path4?animal=kraken", {"version": "three"}, "echo-v1"),
        ("/?animal=shark", {}, 404),  # conditions of one match are AND'd
        ("/path4?animal=kraken", {}, 404),
        ("/path5?animal=hydra&x=y", {}, "echo-v1"),
    ],
)
def test_mesh_httproute_query_param_matching(
    target: str, headers: dict[str, str], expected: str | int
) -> None:
    table = RouteTable.build(snapshot(mesh_services(), [route("query", QUERY)]))
    assert _backend_of(table, _get(target, **headers)) == expected


def _one_rule(name: str, match: dict[str, Any], to: str, **kw: Any) -> Any:
    return route(name, [{"matches": [match], "backendRefs": [backend(to)]}], **kw)


@pytest.mark.parametrize(
    ("a", "b", "target", "headers", "method"),
    [
        # Exact beats any prefix, however long.
        ({"path": {"type": "Exact", "value": "/a"}}, {"path": {"value": "/a"}}, "/a", {}, "GET"),
        # The longest prefix wins.
        ({"path": {"value": "/a/b"}}, {"path": {"value": "/a"}}, "/a/b/c", {}, "GET"),
        # Same path: a method match wins.
        ({"path": {"value": "/a"}, "method": "GET"}, {"path": {"value": "/a"}}, "/a", {}, "GET"),
        # Same path and method: more header matches win over query matches.
        (
            {"headers": [{"name": "h1", "value": "1"}, {"name": "h2", "value": "2"}]},
            {
                "headers": [{"name": "h1", "value": "1"}],
                "queryParams": [{"name": "q", "value": "1"}, {"name": "r", "value": "1"}],
            },
            "/?q=1&r=1",
            {"h1": "1", "h2": "2"},
            "GET",
        ),
        # Then more query matches.
        (
            {"queryParams": [{"name": "q", "value": "1"}, {"name": "r", "value": "1"}]},
            {"queryParams": [{"name": "q", "value": "1"}]},
            "/?q=1&r=1",
            {},
            "GET",
        ),
        # A method match outranks header matches (method comes first in the spec's order).
        ({"method": "POST"}, {"headers": [{"name": "h", "value": "1"}]}, "/", {"h": "1"}, "POST"),
        # A regex path outranks a catch-all prefix (implementation-specific; documented).
        (
            {"path": {"type": "RegularExpression", "value": "/items/[0-9]+"}},
            {"path": {"value": "/"}},
            "/items/42",
            {},
            "GET",
        ),
    ],
)
def test_precedence_between_routes(
    a: dict[str, Any], b: dict[str, Any], target: str, headers: dict[str, str], method: str
) -> None:
    """``a`` outranks ``b`` whichever route is older or sorts first by name."""
    request = HttpRequest.from_target(method, target, list(headers.items()))
    for a_created, b_created in (
        ("2026-01-02T00:00:00Z", "2026-01-01T00:00:00Z"),
        ("2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"),
    ):
        routes = [
            _one_rule("z-a", a, "echo-v1", created=a_created),
            _one_rule("a-b", b, "echo-v2", created=b_created),
        ]
        table = RouteTable.build(snapshot(mesh_services(), routes))
        assert _backend_of(table, request) == "echo-v1"


def test_ties_go_to_the_oldest_route_then_namespace_name_then_rule_order() -> None:
    same = {"path": {"value": "/"}}
    older = _one_rule("zz", same, "echo-v1", created="2025-01-01T00:00:00Z")
    newer = _one_rule("aa", same, "echo-v2", created="2026-01-01T00:00:00Z")
    table = RouteTable.build(snapshot(mesh_services(), [older, newer]))
    assert _backend_of(table, _get("/")) == "echo-v1"

    by_name = [_one_rule("b", same, "echo-v2"), _one_rule("a", same, "echo-v1")]
    table = RouteTable.build(snapshot(mesh_services(), by_name))
    assert _backend_of(table, _get("/")) == "echo-v1"

    in_order = route(
        "r",
        [
            {"matches": [same], "backendRefs": [backend("echo-v2")]},
            {"matches": [same], "backendRefs": [backend("echo-v1")]},
        ],
    )
    table = RouteTable.build(snapshot(mesh_services(), [in_order]))
    assert _backend_of(table, _get("/")) == "echo-v2"


def test_header_names_are_case_insensitive_values_are_not_and_regex_is_whole() -> None:
    rules = [
        {
            "matches": [{"headers": [{"name": "X-Canary", "value": "true"}]}],
            "backendRefs": [backend("echo-v2")],
        },
        {
            "matches": [
                {"headers": [{"type": "RegularExpression", "name": "x-user", "value": "ad[a-z]+"}]}
            ],
            "backendRefs": [backend("echo-v1")],
        },
    ]
    table = RouteTable.build(snapshot(mesh_services(), [route("h", rules)]))
    assert _backend_of(table, _get("/", **{"x-canary": "true"})) == "echo-v2"
    assert _backend_of(table, _get("/", **{"x-canary": "TRUE"})) == 404
    assert _backend_of(table, _get("/", **{"x-user": "admin"})) == "echo-v1"
    assert _backend_of(table, _get("/", **{"x-user": "xadmin"})) == 404


def test_no_route_means_none_and_a_rule_without_backends_goes_to_the_parent() -> None:
    table = RouteTable.build(snapshot(mesh_services(), [route("r", [{}])]))
    decision = table.http(ECHO, 80, _get("/"), client_namespace=NS)
    assert isinstance(decision, RouteAction)
    assert decision.backends == (Backend(NS, "echo", 80),)
    assert table.http((NS, "echo-v1"), 80, _get("/"), client_namespace=NS) is None
    assert table.http(ECHO, 81, _get("/"), client_namespace=NS) is None


def test_parent_port_scopes_the_route() -> None:
    services = [svc("echo", (80, "http"), (8080, "http-alt")), svc("echo-v1")]
    r = route("r", [{"backendRefs": [backend("echo-v1")]}])
    table = RouteTable.build(snapshot(services, [r]))
    assert table.routed(ECHO, 80)
    assert not table.routed(ECHO, 8080)
    everywhere = route(
        "r",
        [{"backendRefs": [backend("echo-v1")]}],
        parents=[{"group": "", "kind": "Service", "name": "echo"}],
    )
    table = RouteTable.build(snapshot(services, [everywhere]))
    assert table.routed(ECHO, 80) and table.routed(ECHO, 8080)


def test_consumer_routes_replace_producer_routes_for_their_namespace() -> None:
    """MeshConsumerRoute: a route in the client's namespace applies to its clients only."""
    producer = route("producer", [{"backendRefs": [backend("echo-v1")]}])
    consumer = route(
        "consumer",
        [
            {
                "filters": [
                    {
                        "type": "ResponseHeaderModifier",
                        "responseHeaderModifier": {"set": [{"name": "x-consumer", "value": "1"}]},
                    }
                ]
            }
        ],
        namespace="client-ns",
        parents=[{"group": "", "kind": "Service", "name": "echo", "namespace": NS, "port": 80}],
    )
    table = RouteTable.build(snapshot(mesh_services(), [producer, consumer]))
    mine = table.http(ECHO, 80, _get("/"), client_namespace="client-ns")
    assert isinstance(mine, RouteAction) and mine.route == ("HTTPRoute", "client-ns", "consumer")
    assert mine.backends == (Backend(NS, "echo", 80),)  # the parent, in its own namespace
    for other in (NS, "third-ns"):
        decision = table.http(ECHO, 80, _get("/"), client_namespace=other)
        assert isinstance(decision, RouteAction) and decision.route[2] == "producer"


def test_grpc_precedence_and_fallback_to_httproutes() -> None:
    services = [
        svc("echo", (80, "grpc")),
        svc("echo-v1", (80, "grpc")),
        svc("echo-v2", (80, "grpc")),
    ]
    rules = [
        {"matches": [{"method": {"service": "grpc.Echo"}}], "backendRefs": [backend("echo-v1")]},
        {
            "matches": [{"method": {"service": "grpc.Echo", "method": "Ping"}}],
            "backendRefs": [backend("echo-v2")],
        },
        {
            "matches": [
                {"method": {"type": "RegularExpression", "service": "grpc\\..*", "method": "Ping"}}
            ],
            "backendRefs": [backend("echo-v1")],
        },
    ]
    table = RouteTable.build(snapshot(services, [route("g", rules, kind="GRPCRoute")]))

    def to(path: str) -> str | int:
        call = GrpcRequest.from_path(path)
        assert call is not None
        decision = table.grpc(ECHO, 80, call, client_namespace=NS)
        if isinstance(decision, NoMatchingRule):
            return 404
        assert isinstance(decision, RouteAction)
        return decision.backends[0].name

    assert to("/grpc.Echo/Ping") == "echo-v2"  # more service+method characters
    assert to("/grpc.Echo/Other") == "echo-v1"
    assert to("/grpc.Other/Ping") == "echo-v1"  # the regex rule
    assert to("/other.Svc/Ping") == 404
    assert GrpcRequest.from_path("/not-grpc") is None

    http_only = route(
        "h",
        [
            {
                "matches": [{"path": {"type": "Exact", "value": "/grpc.Echo/Ping"}}],
                "backendRefs": [backend("echo-v2")],
            }
        ],
    )
    table = RouteTable.build(snapshot(services, [http_only]))
    assert to("/grpc.Echo/Ping") == "echo-v2"


def test_grpc_route_is_not_programmed_on_an_http1_port() -> None:
    table = RouteTable.build(snapshot(mesh_services(), [route("g", [{}], kind="GRPCRoute")]))
    assert not table.routed(ECHO, 80)


@pytest.mark.parametrize(
    ("weights", "points", "expected"),
    [
        ((90, 10), (0.0, 0.89, 0.9, 0.999), ("a", "a", "b", "b")),
        ((0, 1), (0.0, 0.5), ("b", "b")),
        ((1, 0), (0.999,), ("a",)),
    ],
)
def test_choose_backend_by_weight(
    weights: tuple[int, int], points: tuple[float, ...], expected: tuple[str, ...]
) -> None:
    backends = (Backend(NS, "a", 80, weights[0]), Backend(NS, "b", 80, weights[1]))
    assert tuple(choose_backend(backends, p).name for p in points) == expected  # type: ignore[union-attr]


def test_all_weights_zero_chooses_nothing() -> None:
    """httproute-all-backends-weight-zero: the data path answers 500."""
    assert choose_backend((Backend(NS, "a", 80, 0), Backend(NS, "b", 80, 0)), 0.3) is None


def test_section_name_picks_a_service_port_by_name() -> None:
    services = [svc("echo", (80, "http"), (8080, "http-admin")), svc("echo-v1")]
    parents = [{"group": "", "kind": "Service", "name": "echo", "sectionName": "http-admin"}]
    table = RouteTable.build(snapshot(services, [route("r", [{}], parents=parents)]))
    assert table.routed(ECHO, 8080) and not table.routed(ECHO, 80)
    wrong = [{"group": "", "kind": "Service", "name": "echo", "sectionName": "metrics"}]
    r = route("r", [{}], parents=wrong)
    (verdict,) = RouteTable.build(snapshot(services, [r])).verdicts[r.key]
    assert verdict.accepted.message == f"Service {NS}/echo has no port named 'metrics'"


def test_table_cache_rebuilds_only_when_routes_or_services_change() -> None:
    store = StateStore()
    with store.update() as txn:
        for s in mesh_services():
            txn.put_service(s)
    cache = RouteTableCache()
    first = cache.get(store.snapshot())
    with store.update() as txn:
        txn.put_namespace(Namespace("other"))
    assert cache.get(store.snapshot()) is first
    with store.update() as txn:
        txn.put_route(route("r", [{"backendRefs": [backend("echo-v1")]}]))
    rebuilt = cache.get(store.snapshot())
    assert rebuilt is not first and rebuilt.routed(ECHO, 80)


def _path_rule(kind: str, value: str, to: str) -> dict[str, Any]:
    return {"matches": [{"path": {"type": kind, "value": value}}], "backendRefs": [backend(to)]}


# Conformance HTTPRoutePathMatchOrder: Exact before prefixes, longer prefixes first, whatever
# the rule order.
PATH_ORDER = [
    _path_rule("Exact", "/match", "echo-v1"),
    _path_rule("Exact", "/match/exact", "echo-v2"),
    _path_rule("Exact", "/match/exact/one", "echo-v3"),
    _path_rule("PathPrefix", "/match/", "echo-v3"),
    _path_rule("PathPrefix", "/match/prefix/", "echo-v1"),
    _path_rule("PathPrefix", "/match/prefix/one", "echo-v2"),
]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/match/exact/one", "echo-v3"),
        ("/match/exact", "echo-v2"),
        ("/match", "echo-v1"),
        ("/match/prefix/one/any", "echo-v2"),
        ("/match/prefix/any", "echo-v1"),
        ("/match/any", "echo-v3"),
    ],
)
def test_path_match_order(path: str, expected: str) -> None:
    services = [*mesh_services(), svc("echo-v3")]
    table = RouteTable.build(snapshot(services, [route("path-matching-order", PATH_ORDER)]))
    assert _backend_of(table, _get(path)) == expected


def test_a_requests_head_compares_and_hashes_by_its_fields_as_a_frozen_one_did() -> None:
    """``HttpRequest`` (one per request) is no longer frozen: equal by its six fields, equal
    hashes, unequal when any one differs, and no hash while its headers are a list (as a
    frozen one would fail to hash)."""
    fields = ("GET", "/a", (("x", "1"),), "q=1", "web", "http")
    request = HttpRequest.from_target("GET", "/a?q=1", (("x", "1"),), authority="web")
    same = HttpRequest(*fields)
    assert request == same and hash(request) == hash(same) and len({request, same}) == 1
    assert hash(request) == hash(fields)  # what a frozen dataclass hashes: its fields' tuple
    others = ("POST", "/b", (("x", "2"),), "q=2", "other", "https")
    for i, other in enumerate(others):
        changed = HttpRequest(*fields[:i], other, *fields[i + 1 :])  # type: ignore[arg-type]
        assert request != changed
    with pytest.raises(TypeError):
        hash(HttpRequest("GET", "/a", [("x", "1")]))
