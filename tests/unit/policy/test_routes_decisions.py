"""Route decisions kept per request shape (agent.policy.routes.decisions): the same answer as
the table's walk for every request, the walk skipped for a shape seen before, bounded memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy.routes import GrpcRequest, HttpRequest, RouteAction, RouteTable
from agent.policy.routes.decisions import DECISIONS, MAX_KEY_CHARS
from agent.policy.routes.model import GrpcMatch, HttpMatch
from tests.unit.policy.routes_fixtures import NS, backend, mesh_services, route, snapshot, svc

ECHO = (NS, "echo")
CONSUMER_NS = "client-ns"


def _match(**match: Any) -> dict[str, Any]:
    return {"matches": [match]}


# Every kind of condition an HTTPRoute match has, over two routes (one a consumer route), so
# that requests reach different rules, no rule, and the consumer's rules.
RULES = [
    {**_match(path={"type": "Exact", "value": "/a"}), "backendRefs": [backend("echo-v1")]},
    {**_match(path={"type": "PathPrefix", "value": "/b"}), "backendRefs": [backend("echo-v2")]},
    {
        **_match(path={"type": "RegularExpression", "value": "/c[0-9]+"}),
        "backendRefs": [backend("echo-v1")],
    },
    {**_match(method="POST", path={"type": "PathPrefix", "value": "/m"})},
    {
        **_match(headers=[{"name": "x-canary", "value": "true"}]),
        "backendRefs": [backend("echo-v2", weight=90), backend("echo-v1", weight=10)],
    },
    {
        **_match(
            headers=[{"type": "RegularExpression", "name": "x-user", "value": "u[12]"}],
            queryParams=[{"name": "q", "value": "1"}],
        ),
        "backendRefs": [backend("echo-v1")],
    },
]
CONSUMER = route(
    "consumer",
    [
        {
            **_match(headers=[{"name": "x-canary", "value": "false"}]),
            "backendRefs": [backend("echo")],
        }
    ],
    namespace=CONSUMER_NS,
    parents=[{"group": "", "kind": "Service", "name": "echo", "namespace": NS, "port": 80}],
)
GRPC_RULES = [
    {
        **_match(method={"service": "grpc.Echo", "method": "Ping"}),
        "backendRefs": [backend("echo-v1")],
    },
    {
        **_match(method={"type": "RegularExpression", "service": "grpc\\..*"}),
        "backendRefs": [backend("echo-v2")],
    },
    {**_match(headers=[{"name": "x-canary", "value": "true"}]), "backendRefs": [backend("echo")]},
]

HEADER_VALUES = st.sampled_from([None, "true", "false", "u1", "u2", "u3", ""])
HTTP_REQUESTS = st.builds(
    lambda method, path, query, canary, user, authority: HttpRequest(
        method,
        path,
        tuple(
            (name, value)
            for name, value in (("x-canary", canary), ("x-user", user))
            if value is not None
        ),
        query,
        authority,
    ),
    st.sampled_from(["GET", "POST"]),
    st.sampled_from(["/", "/a", "/a/", "/b", "/b/x", "/bx", "/c1", "/c", "/m", "/m/1", "/z"]),
    st.sampled_from(["", "q=1", "q=2", "q=1&q=2", "r=1"]),
    HEADER_VALUES,
    HEADER_VALUES,
    st.sampled_from(["", "echo"]),
)
GRPC_CALLS = st.builds(
    lambda service, method, canary: GrpcRequest(
        service, method, (("x-canary", canary),) if canary is not None else ()
    ),
    st.sampled_from(["grpc.Echo", "grpc.Other", "other.Svc"]),
    st.sampled_from(["Ping", "Pong"]),
    HEADER_VALUES,
)


def _http_table() -> RouteTable:
    return RouteTable.build(snapshot(mesh_services(), [route("r", RULES), CONSUMER]))


def _grpc_table(*, http_only: bool = False) -> RouteTable:
    services = [svc(name, (80, "grpc")) for name in ("echo", "echo-v1", "echo-v2")]
    routes = [route("h", RULES)] if http_only else [route("g", GRPC_RULES, kind="GRPCRoute")]
    return RouteTable.build(snapshot(services, routes))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(HTTP_REQUESTS, st.sampled_from([NS, CONSUMER_NS, "other"])), min_size=1))
def test_kept_http_decisions_are_the_walks_decisions(
    requests: list[tuple[HttpRequest, str]],
) -> None:
    table = _http_table()
    ports = {client: table.port(ECHO, 80, client) for client in (NS, CONSUMER_NS, "other")}
    for request, client in requests + requests:  # the second time round, every one is kept
        walked = table.http(ECHO, 80, request, client_namespace=client)
        assert ports[client].http(request) == walked


@settings(max_examples=40, deadline=None)
@given(st.lists(GRPC_CALLS, min_size=1), st.booleans())
def test_kept_grpc_decisions_are_the_walks_decisions(
    calls: list[GrpcRequest], http_only: bool
) -> None:
    table = _grpc_table(http_only=http_only)
    port = table.port(ECHO, 80, NS)
    for call in calls + calls:
        assert port.grpc(call) == table.grpc(ECHO, 80, call, client_namespace=NS)


@contextmanager
def _counting(cls: type[HttpMatch] | type[GrpcMatch]) -> Iterator[list[int]]:
    """Count the calls of ``cls.matches`` (the walk's work per match)."""
    calls = [0]
    original: Callable[..., bool] = cls.matches

    def counted(self: Any, request: Any) -> bool:
        calls[0] += 1
        return original(self, request)

    cls.matches = counted  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        cls.matches = original  # type: ignore[method-assign]


def test_a_shape_seen_before_is_answered_without_walking_the_matches() -> None:
    table = _http_table()
    port = table.port(ECHO, 80, NS)
    request = HttpRequest("GET", "/z", (("x-canary", "true"),))
    with _counting(HttpMatch) as calls:
        first = port.http(request)
        walked = calls[0]
        for _ in range(10):
            assert port.http(HttpRequest("GET", "/z", (("x-canary", "true"),))) is first
    assert walked > 0 and calls[0] == walked
    assert isinstance(first, RouteAction) and first.backends[0].name == "echo-v2"


def test_a_header_the_matches_do_not_name_is_not_part_of_the_shape() -> None:
    table = _http_table()
    port = table.port(ECHO, 80, NS)
    port.http(HttpRequest("GET", "/z", (("user-agent", "a"),)))
    with _counting(HttpMatch) as calls:
        port.http(HttpRequest("GET", "/z", (("user-agent", "b"), ("accept", "*/*"))))
    assert calls[0] == 0
    assert len(table.decisions.entries) == 1


@pytest.mark.parametrize(
    "rules",
    [
        [{"backendRefs": [backend("echo-v1")]}],  # no matches: PathPrefix /
        [
            {
                **_match(path={"type": "PathPrefix", "value": "/"}),
                "backendRefs": [backend("echo-v1")],
            }
        ],
        # two catch-alls: the first rule's is chosen, the second is never reached
        [{"backendRefs": [backend("echo-v1")]}, {"backendRefs": [backend("echo-v2")]}],
    ],
)
def test_a_port_whose_first_match_holds_always_decides_without_reading_the_request(
    rules: list[dict[str, Any]],
) -> None:
    table = RouteTable.build(snapshot(mesh_services(), [route("r", rules)]))
    port = table.port(ECHO, 80, NS)
    with _counting(HttpMatch) as calls:
        decisions = {
            id(port.http(HttpRequest("GET", f"/{i}", (("x-canary", "true"),)))) for i in range(5)
        }
    assert calls[0] == 0 and len(decisions) == 1
    assert table.decisions.entries == {}  # nothing kept either
    assert port.http(HttpRequest("GET", "/")) == table.http(
        ECHO, 80, HttpRequest("GET", "/"), client_namespace=NS
    )


def test_the_cache_stays_within_its_cap_under_many_distinct_paths() -> None:
    table = RouteTable.build(snapshot(mesh_services(), [route("r", RULES)]))
    port = table.port(ECHO, 80, NS)
    for i in range(3 * DECISIONS + 7):
        request = HttpRequest("GET", f"/b/{i}")
        assert port.http(request) == table.http(ECHO, 80, request, client_namespace=NS)
        assert len(table.decisions.entries) <= DECISIONS
    assert table.decisions.emptied == 3


def test_a_request_whose_read_fields_are_too_long_is_decided_but_not_kept() -> None:
    table = RouteTable.build(snapshot(mesh_services(), [route("r", RULES)]))
    port = table.port(ECHO, 80, NS)
    long = HttpRequest("GET", "/b/" + "x" * MAX_KEY_CHARS)
    decision = port.http(long)
    assert isinstance(decision, RouteAction) and decision.backends[0].name == "echo-v2"
    assert table.decisions.entries == {}
    port.http(HttpRequest("GET", "/b/short"))
    assert len(table.decisions.entries) == 1


def test_a_grpc_call_on_http_routes_with_a_catch_all_needs_no_http_request() -> None:
    services = [svc(name, (80, "grpc")) for name in ("echo", "echo-v1")]
    table = RouteTable.build(
        snapshot(services, [route("h", [{"backendRefs": [backend("echo-v1")]}])])
    )
    call = GrpcRequest("grpc.Echo", "Ping")
    decision = table.port(ECHO, 80, NS).grpc(call)
    assert decision == table.grpc(ECHO, 80, call, client_namespace=NS)
    assert isinstance(decision, RouteAction) and decision.backends[0].name == "echo-v1"
