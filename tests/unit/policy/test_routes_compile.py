"""Route validation: a route is compiled whole or refused with the field and the fix."""

from __future__ import annotations

from typing import Any

import pytest

from agent.policy.routes import Rejected, compile_route
from agent.policy.routes.model import (
    Backend,
    HttpMatch,
    HttpRequest,
    Mirror,
    Retry,
    Route,
    Timeouts,
)
from tests.unit.policy.routes_fixtures import NS, backend, mesh_services, route


def _services() -> dict[tuple[str, str], Any]:
    return {s.key: s for s in mesh_services()}


def _compiled(rules: list[dict[str, Any]], **kw: Any) -> Route:
    result = compile_route(route("r", rules, **kw), _services())
    assert isinstance(result, Route), result
    return result


@pytest.mark.parametrize(
    ("rules", "field", "words"),
    [
        (
            [{"matches": [{"path": {"type": "RegularExpression", "value": "/(unclosed"}}]}],
            "spec.rules[0].matches[0].path.value",
            "invalid regular expression",
        ),
        (
            [
                {
                    "matches": [
                        {"headers": [{"type": "RegularExpression", "name": "x", "value": "*"}]}
                    ]
                }
            ],
            "spec.rules[0].matches[0].headers[0]",
            "invalid regular expression",
        ),
        (
            [
                {
                    "filters": [
                        {
                            "type": "ExtensionRef",
                            "extensionRef": {"group": "example.com", "kind": "Other", "name": "x"},
                        }
                    ]
                }
            ],
            "spec.rules[0].filters[0].extensionRef",
            "ExtensionRef to example.com/Other is not supported",
        ),
        (
            [{"filters": [{"type": "CORS", "cors": {}}]}],
            "spec.rules[0].filters[0].type",
            "not supported",
        ),
        (
            [
                {
                    "filters": [
                        {
                            "type": "RequestHeaderModifier",
                            "requestHeaderModifier": {
                                "set": [{"name": "Content-Length", "value": "0"}]
                            },
                        }
                    ]
                }
            ],
            "spec.rules[0].filters[0].requestHeaderModifier.set[0].name",
            "frames the message",
        ),
        (
            [
                {
                    "filters": [
                        {
                            "type": "RequestHeaderModifier",
                            "requestHeaderModifier": {"add": [{"name": "x-a", "value": "a\x00b"}]},
                        }
                    ]
                }
            ],
            "spec.rules[0].filters[0].requestHeaderModifier.add[0].value",
            "without control characters",
        ),
        (
            [
                {
                    "filters": [
                        {
                            "type": "ResponseHeaderModifier",
                            "responseHeaderModifier": {"remove": ["transfer-encoding"]},
                        }
                    ]
                }
            ],
            "spec.rules[0].filters[0].responseHeaderModifier.remove[0]",
            "frames the message",
        ),
        ([{"matches": [{"method": "FETCH"}]}], "spec.rules[0].matches[0].method", "FETCH"),
        (
            [{"matches": [{"path": {"value": "no-slash"}}]}],
            "spec.rules[0].matches[0].path.value",
            "absolute",
        ),
        ([{"backendRefs": [{"name": "echo-v1"}]}], "spec.rules[0].backendRefs[0].port", "integer"),
        (
            [{"backendRefs": [backend("echo-v1", weight=-1)]}],
            "spec.rules[0].backendRefs[0].weight",
            "0 to 1000000",
        ),
        (
            [{"timeouts": {"request": "1 second"}}],
            "spec.rules[0].timeouts.request",
            "Gateway API duration",
        ),
        (
            [{"timeouts": {"request": "1s", "backendRequest": "2s"}}],
            "spec.rules[0].timeouts.backendRequest",
            "not be longer",
        ),
        ([{"retry": {"codes": [200]}}], "spec.rules[0].retry.codes[0]", "400 to 599"),
        ([{"sessionPersistence": {}}], "spec.rules[0].sessionPersistence", "not supported"),
        (
            [
                {
                    "filters": [
                        {"type": "RequestRedirect", "requestRedirect": {"statusCode": 302}},
                        {"type": "URLRewrite", "urlRewrite": {"hostname": "x"}},
                    ]
                }
            ],
            "spec.rules[0].filters",
            "exclude each other",
        ),
        (
            [
                {
                    "matches": [{"path": {"type": "Exact", "value": "/a"}}],
                    "filters": [
                        {
                            "type": "URLRewrite",
                            "urlRewrite": {
                                "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/b"}
                            },
                        }
                    ],
                }
            ],
            "spec.rules[0].filters",
            "PathPrefix",
        ),
        (
            [{"filters": [{"type": "RequestRedirect", "requestRedirect": {"statusCode": 200}}]}],
            "spec.rules[0].filters[0].requestRedirect.statusCode",
            "use one of 301, 302, 303, 307, 308",
        ),
        (
            [
                {
                    "backendRefs": [
                        {"name": "echo-v1", "port": 80, "filters": [{"type": "URLRewrite"}]}
                    ]
                }
            ],
            "spec.rules[0].backendRefs[0].filters[0].type",
            "not supported",
        ),
    ],
)
def test_invalid_routes_are_refused_whole_naming_the_field(
    rules: list[dict[str, Any]], field: str, words: str
) -> None:
    good = {"matches": [{"path": {"value": "/ok"}}], "backendRefs": [backend("echo-v1")]}
    result = compile_route(route("r", [good, *rules]), _services())
    assert isinstance(result, Rejected)
    expected = field.replace("rules[0]", "rules[1]")
    assert result.error.path.startswith(expected), result.error
    assert words in result.error.message
    assert result.parents[0].name == "echo"  # still known, for the status


def test_grpc_route_refuses_http_only_filters_and_fields() -> None:
    redirect = [{"filters": [{"type": "RequestRedirect", "requestRedirect": {}}]}]
    result = compile_route(route("g", redirect, kind="GRPCRoute"), _services())
    assert isinstance(result, Rejected) and "not supported" in result.error.message
    timeouts = compile_route(
        route("g", [{"timeouts": {"request": "1s"}}], kind="GRPCRoute"), _services()
    )
    assert isinstance(timeouts, Rejected) and timeouts.error.path == "spec.rules[0].timeouts"
    assert "attach an HTTPRoute with the timeouts" in timeouts.error.message
    retry = compile_route(route("g", [{"retry": {"attempts": 2}}], kind="GRPCRoute"), _services())
    assert isinstance(retry, Rejected) and retry.error.path == "spec.rules[0].retry"
    assert "GRPCRoute has no retry: remove it and attach an HTTPRoute" in retry.error.message
    empty = compile_route(
        route("g", [{"matches": [{"method": {"type": "Exact"}}]}], kind="GRPCRoute"), _services()
    )
    assert isinstance(empty, Rejected) and "service, method or both" in empty.error.message


def test_unresolvable_backends_keep_the_route_with_their_share_marked() -> None:
    compiled = _compiled(
        [
            {
                "backendRefs": [
                    backend("echo-v1", weight=1),
                    backend("missing", weight=2),
                    {"group": "example.com", "kind": "Bucket", "name": "b", "weight": 3},
                    {"name": "echo-v1", "namespace": "other", "port": 80},
                ]
            }
        ]
    )
    backends = compiled.rules[0].backends
    assert [b.resolved for b in backends] == [True, False, False, False]
    assert [b.weight for b in backends] == [1, 2, 3, 1]
    reasons = [u.split(":")[0] for u in compiled.unresolved]
    assert reasons == ["BackendNotFound", "InvalidKind", "BackendNotFound"]  # none in "other"


def test_a_consumer_route_may_name_its_parent_service_in_another_namespace() -> None:
    compiled = compile_route(
        route(
            "c",
            [{"backendRefs": [{"name": "echo", "namespace": NS, "port": 80}]}],
            namespace="client-ns",
            parents=[{"group": "", "kind": "Service", "name": "echo", "namespace": NS}],
        ),
        _services(),
    )
    assert isinstance(compiled, Route) and not compiled.unresolved


def test_defaults_durations_retry_and_mirror() -> None:
    compiled = _compiled(
        [
            {
                "backendRefs": [backend("echo-v1")],
                "timeouts": {"request": "1m30s", "backendRequest": "500ms"},
                "retry": {"attempts": 3, "codes": [503, 502], "backoff": "100ms"},
                "filters": [
                    {
                        "type": "RequestMirror",
                        "requestMirror": {
                            "backendRef": {"name": "echo-v2", "port": 80},
                            "fraction": {"numerator": 1, "denominator": 4},
                        },
                    }
                ],
            }
        ]
    )
    rule = compiled.rules[0]
    assert rule.backends == (Backend(NS, "echo-v1", 80, 1),)
    assert rule.timeouts == Timeouts(90.0, 0.5)
    assert rule.retry == Retry(3, frozenset({502, 503}), 0.1)
    assert rule.filters.mirrors == (Mirror(Backend(NS, "echo-v2", 80), 25.0),)
    assert _compiled([{"timeouts": {"request": "0s"}}]).rules[0].timeouts == Timeouts(None, None)


def test_routes_without_a_service_parent_are_not_ours() -> None:
    gateway_only = route("gw", [{}], parents=[{"name": "my-gateway"}])
    compiled = compile_route(gateway_only, _services())
    assert isinstance(compiled, Route) and compiled.parents == ()


@pytest.mark.parametrize("pattern", ["/(?=admin)", "/(a)\\1", "/(unclosed"])
def test_regex_is_re2_and_its_refusals_name_the_field(pattern: str) -> None:
    rules = [{"matches": [{"path": {"type": "RegularExpression", "value": pattern}}]}]
    result = compile_route(route("r", rules), _services())
    assert isinstance(result, Rejected)
    assert result.error.path == "spec.rules[0].matches[0].path.value"
    assert "(RE2 syntax)" in result.error.message


def test_a_backtracking_pattern_matches_in_linear_time() -> None:
    """``(a+)+$`` against ``aaaa…b`` takes exponential time in a backtracking engine; a
    client-controlled header must not be able to stall the proxy with it."""
    rules = [
        {"matches": [{"headers": [{"type": "RegularExpression", "name": "x", "value": "(a+)+$"}]}]}
    ]
    compiled = _compiled(rules)
    match = compiled.rules[0].matches[0]
    assert isinstance(match, HttpMatch)
    request = HttpRequest("GET", "/", [("x", "a" * 100_000 + "b")])
    assert not match.matches(request)
