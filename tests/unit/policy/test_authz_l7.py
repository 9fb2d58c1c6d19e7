"""L7 AuthorizationPolicy per HTTP request (declared HTTP ports), and L4 left as it was."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from agent.policy.authz import Authorizer, HttpAttributes, Request, never_matching
from agent.state.model import PolicyObject
from tests.unit.policy.test_authz import SERVER, allow, deny, pol, req, src, to


def http(
    method: str = "GET",
    path: str = "/",
    host: str = "server.default:80",
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> Request:
    return replace(req(), http=HttpAttributes(method, path, host, headers))


def when(key: str, **cond: list[str]) -> dict[str, Any]:
    return {"when": [{"key": key, **cond}]}


TOKEN = "request.headers[X-Token]"


def token(*values: bytes, name: bytes = b"x-token") -> Request:
    """A GET with one ``name`` field per value."""
    return http(headers=tuple((name, v) for v in values))


def allowed(policies: list[PolicyObject], request: Request) -> bool:
    return Authorizer.compile(policies).evaluate(request, SERVER).allowed


ADMIN_POSTS = deny(to(methods=["POST"], paths=["/admin*"]))

CASES: list[tuple[str, list[PolicyObject], Request, bool]] = [
    (
        "DENY POST /admin* denies POST /admin/users",
        [ADMIN_POSTS],
        http("POST", "/admin/users"),
        False,
    ),
    ("DENY POST /admin* allows GET /admin", [ADMIN_POSTS], http("GET", "/admin"), True),
    ("DENY POST /admin* allows POST /orders", [ADMIN_POSTS], http("POST", "/orders"), True),
    ("DENY is broadened on a connection (L4)", [ADMIN_POSTS], req(), False),
    ("ALLOW GET allows a GET", [allow(to(methods=["GET"]))], http("GET"), True),
    ("ALLOW GET denies a PUT", [allow(to(methods=["GET"]))], http("PUT"), False),
    ("ALLOW GET never matches a connection (L4)", [allow(to(methods=["GET"]))], req(), False),
    ("notMethods", [allow(to(notMethods=["DELETE"]))], http("DELETE"), False),
    ("notMethods other", [allow(to(notMethods=["DELETE"]))], http("GET"), True),
    ("notMethods never matches at L4 in ALLOW", [allow(to(notMethods=["DELETE"]))], req(), False),
    ("DENY notPaths broadened at L4", [deny(to(notPaths=["/public*"]))], req(), False),
    ("paths exact", [allow(to(paths=["/a"]))], http(path="/a"), True),
    ("paths exact is exact", [allow(to(paths=["/a"]))], http(path="/ab"), False),
    ("paths prefix", [allow(to(paths=["/api/*"]))], http(path="/api/v1"), True),
    ("paths suffix", [allow(to(paths=["*.png"]))], http(path="/img/x.png"), True),
    ("paths suffix miss", [allow(to(paths=["*.png"]))], http(path="/img/x.jpg"), False),
    ("paths presence", [allow(to(paths=["*"]))], http(path="/"), True),
    ("notPaths", [deny(to(notPaths=["/healthz"]))], http(path="/healthz"), True),
    ("notPaths other", [deny(to(notPaths=["/healthz"]))], http(path="/x"), False),
    (
        "hosts ignore port and case",
        [allow(to(hosts=["server.default"]))],
        http(host="Server.Default:80"),
        True,
    ),
    ("hosts with port", [allow(to(hosts=["server.default:80"]))], http(), True),
    ("hosts prefix", [allow(to(hosts=["server.*"]))], http(host="server.default.svc"), True),
    ("hosts miss", [allow(to(hosts=["other"]))], http(), False),
    ("notHosts", [deny(to(notHosts=["server.default"]))], http(), True),
    ("notHosts other", [deny(to(notHosts=["server.default"]))], http(host="evil"), False),
    (
        "L4 and L7 fields together",
        [allow({**to(methods=["GET"], ports=["8080"]), **src(namespaces=["default"])})],
        http("GET"),
        True,
    ),
    (
        "L4 part mismatches",
        [allow({**to(methods=["GET"], ports=["9090"])})],
        http("GET"),
        False,
    ),
    # when request.headers[...]: Istio's string matching on the header's value
    ("header exact", [deny(when(TOKEN, values=["s3"]))], token(b"s3"), False),
    ("header exact miss", [deny(when(TOKEN, values=["s3"]))], token(b"s"), True),
    ("header absent", [deny(when(TOKEN, values=["*"]))], http(), True),
    ("header present", [deny(when(TOKEN, values=["*"]))], token(b"a"), False),
    ("header empty is present", [deny(when(TOKEN, values=["*"]))], token(b""), False),
    ("header prefix", [allow(when(TOKEN, values=["ab*"]))], token(b"abc"), True),
    ("header suffix", [allow(when(TOKEN, values=["*bc"]))], token(b"abc"), True),
    ("header suffix miss", [allow(when(TOKEN, values=["*bd"]))], token(b"abc"), False),
    (
        "header name any case",
        [allow(when("request.headers[x-TOKEN]", values=["a"]))],
        token(b"a", name=b"X-Token"),
        True,
    ),
    ("header value is case-sensitive", [allow(when(TOKEN, values=["a"]))], token(b"A"), False),
    ("header fields joined", [allow(when(TOKEN, values=["a,b"]))], token(b"a", b"b"), True),
    ("header notValues", [allow(when(TOKEN, notValues=["bad"]))], token(b"bad"), False),
    ("header notValues other", [allow(when(TOKEN, notValues=["bad"]))], token(b"ok"), True),
    ("header notValues absent", [allow(when(TOKEN, notValues=["bad"]))], http(), True),
    (
        "header values and notValues",
        [allow(when(TOKEN, values=["a*"], notValues=["ab"]))],
        token(b"ab"),
        False,
    ),
    (
        "header ALLOW never matches a connection (L4)",
        [allow(when(TOKEN, values=["*"]))],
        req(),
        False,
    ),
    (
        "header notValues ALLOW never matches at L4",
        [allow(when(TOKEN, notValues=["x"]))],
        req(),
        False,
    ),
    ("header DENY broadened at L4", [deny(when(TOKEN, values=["s3"]))], req(), False),
    ("header DENY notValues broadened at L4", [deny(when(TOKEN, notValues=["s3"]))], req(), False),
    (
        "requestPrincipals stay unenforceable on HTTP ports",
        [allow(src(requestPrincipals=["*"]))],
        http("GET"),
        False,
    ),
]


@pytest.mark.parametrize(
    ("policies", "request_", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_l7_semantics(policies: list[PolicyObject], request_: Request, expected: bool) -> None:
    assert allowed(policies, request_) is expected


def test_dry_run_policies_report_what_they_would_deny() -> None:
    dry_deny = pol(
        {"action": "DENY", "rules": [to(methods=["POST"])]}, name="no-post", dry_run=True
    )
    dry_allow = pol(
        {"action": "ALLOW", "rules": [to(paths=["/public*"])]}, name="public", dry_run=True
    )
    authz = Authorizer.compile([dry_deny, dry_allow])
    post = authz.evaluate(http("POST", "/public/x"), SERVER)
    assert post.allowed and post.would_deny == ("default/no-post",)
    get = authz.evaluate(http("GET", "/private"), SERVER)
    assert get.allowed and get.would_deny == ("default/public",)
    assert authz.evaluate(http("GET", "/public/y"), SERVER).would_deny == ()


def test_a_denial_names_the_rule_that_matched() -> None:
    """A request record names the deciding rule as Envoy's effective policy id does: the first
    rule of the DENY that matched, by its index in ``spec.rules``."""
    authz = Authorizer.compile(
        [deny(to(paths=["/admin*"]), to(methods=["POST"]), to(methods=["POST", "PUT"]))]
    )
    assert authz.evaluate(http("GET", "/admin/x"), SERVER).rule == 0
    post = authz.evaluate(http("POST", "/orders"), SERVER)
    assert (post.allowed, post.policy, post.rule) == (False, "default/p", 1)
    put = authz.evaluate(http("PUT", "/orders"), SERVER)
    assert (put.allowed, put.rule) == (False, 2)
    get = authz.evaluate(http("GET", "/orders"), SERVER)
    assert (get.allowed, get.rule) == (True, None)
    no_match = Authorizer.compile([pol({"action": "ALLOW", "rules": [to(methods=["GET"])]})])
    refused = no_match.evaluate(http("POST", "/"), SERVER)
    assert (refused.allowed, refused.policy, refused.rule) == (False, None, None)


def test_values_that_never_match_are_named_and_indeed_never_match() -> None:
    """``never_matching`` warns of what Istio accepts silently: a '*' inside a value (a literal
    character), a method not in upper case, a principal not of the SPIFFE form."""
    spec = deny(
        to(
            methods=["get", "POST"],
            paths=["/a/*/b", "/ok*", "*.json", "*", "*x*"],
            hosts=["*.example.com:*"],
        ),
        src(principals=["default/client", "cluster.local/ns/default/sa/*", "*"]),
    ).spec
    assert never_matching(spec) == [
        "spec.rules[0].to[0].operation.hosts[0]: '*.example.com:*' matches only its literal text:"
        " '*' matches once, at the start (suffix match), at the end (prefix match) or alone",
        "spec.rules[0].to[0].operation.methods[0]: 'get' never matches: methods compare exactly;"
        " requests send 'GET'",
        "spec.rules[0].to[0].operation.paths[0]: '/a/*/b' matches only its literal text: '*'"
        " matches once, at the start (suffix match), at the end (prefix match) or alone",
        "spec.rules[0].to[0].operation.paths[4]: '*x*' matches only its literal text: '*'"
        " matches once, at the start (suffix match), at the end (prefix match) or alone",
        "spec.rules[1].from[0].source.principals[0]: 'default/client' never matches: a principal"
        " is TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT (cluster.local/ns/default/sa/client)",
    ]
    # What the warnings say: such values deny nothing they were meant to.
    for method, path, denied in [("GET", "/a/x/b", False), ("POST", "/a/x/b", False),
                                 ("POST", "/a/*/b", True), ("POST", "/ok/1", True)]:  # fmt: skip
        policy = deny(to(methods=["get", "POST"], paths=["/a/*/b", "/ok*"]))
        assert allowed([policy], http(method=method, path=path)) is not denied
    client = req(principal="cluster.local/ns/default/sa/client")
    assert allowed([deny(src(principals=["default/client"]))], client)
