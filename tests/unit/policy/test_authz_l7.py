"""L7 AuthorizationPolicy per HTTP request (declared HTTP ports), and L4 left as it was."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.policy.authz import Authorizer, HttpAttributes, Request
from agent.state.model import PolicyObject
from tests.unit.policy.test_authz import SERVER, allow, deny, pol, req, src, to


def http(method: str = "GET", path: str = "/", host: str = "server.default:80") -> Request:
    return replace(req(), http=HttpAttributes(method, path, host))


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
