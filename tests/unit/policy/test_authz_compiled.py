"""The generated rule matchers (``authz._PolicyCompiler``) decide exactly as the closures they
replaced (``authz_reference``): over random policies using every field kind, random L4 and HTTP
requests with and without a peer identity, the same match, the same first rule, the same
refusal of a malformed policy (``test_authz_sets``: the same ``Decision`` from
``Authorizer.evaluate`` over sets of them)."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.policy.authz import (
    CompiledPolicy,
    HttpAttributes,
    Request,
    compile_policy,
)
from agent.state.model import PolicyObject
from tests.unit.policy.authz_reference import reference_policy

PRINCIPALS = [
    "cluster.local/ns/shop/sa/web",
    "spiffe://cluster.local/ns/shop/sa/web",
    "cluster.local/ns/bank/sa/db",
    "cluster.local/ns/shop/sa/",
    "cluster.local/ns//sa/web",
    "cluster.local/shop/sa/web",
    "",
]
IDENTITY_PATTERNS = [
    *PRINCIPALS,
    "*",
    "cluster.local/*",
    "spiffe://cluster.local/ns/shop/*",
    "*/sa/web",
    "*web",
    "shop",
    "sho*",
    "*ank",
    "bank",
    "**",
    "*a*",
]
ADDRESSES = ["10.0.0.1", "10.1.2.3", "192.168.1.9", "fd00::1", "::1", "fd01::5"]
BLOCKS = [
    "10.0.0.0/8",
    "10.0.0.1",
    "10.0.0.1/32",
    "192.168.0.0/16",
    "fd00::/64",
    "::1",
    "0.0.0.0/0",
]
PORTS = [80, 8080, 9090, 443]
METHODS = ["GET", "POST", "get", "PUT", "", "DELETE"]
METHOD_PATTERNS = ["GET", "get", "POST", "*", "P*", "*T", "", "DELETE", "G*T"]
PATHS = ["/", "/api/items", "/api", "/index.html", "", "/API/items", "/a/b.png"]
PATH_PATTERNS = ["/", "/api/*", "/api", "*", "*.png", "*.html", "", "/index.html", "/a*", "**"]
HOSTS = [
    "web",
    "Web:8080",
    "web.shop.svc:80",
    "[::1]:80",
    "[FD00::1]",
    "a:b:c",
    "",
    "WEB.example.com",
]
HOST_PATTERNS = ["web", "WEB", "web:8080", "*.example.com", "[::1]", "[fd00::1]", "*", "web*", ""]
HEADER_NAMES = ["x-token", "X-Token", "accept", "x-empty"]
HEADER_VALUES = ["abc", "", "Bearer x", "a,b", "*/*"]
VALUE_PATTERNS = ["abc", "*", "", "Bear*", "*x", "a,b", "*/*", "b"]


def some(pool: list[Any]) -> st.SearchStrategy[list[Any]]:
    return st.lists(st.sampled_from(pool), min_size=1, max_size=3)


SOURCE_FIELDS = {
    "principals": some(IDENTITY_PATTERNS),
    "notPrincipals": some(IDENTITY_PATTERNS),
    "namespaces": some(IDENTITY_PATTERNS),
    "notNamespaces": some(IDENTITY_PATTERNS),
    "ipBlocks": some(BLOCKS),
    "notIpBlocks": some(BLOCKS),
    "remoteIpBlocks": some(BLOCKS),
    "notRemoteIpBlocks": some(BLOCKS),
    "requestPrincipals": some(IDENTITY_PATTERNS),
    "notRequestPrincipals": some(IDENTITY_PATTERNS),
}
OPERATION_FIELDS = {
    "ports": some([str(p) for p in PORTS]),
    "notPorts": some([str(p) for p in PORTS]),
    "methods": some(METHOD_PATTERNS),
    "notMethods": some(METHOD_PATTERNS),
    "paths": some(PATH_PATTERNS),
    "notPaths": some(PATH_PATTERNS),
    "hosts": some(HOST_PATTERNS),
    "notHosts": some(HOST_PATTERNS),
}
WHEN_VALUES = {
    "source.ip": BLOCKS,
    "remote.ip": BLOCKS,
    "destination.ip": BLOCKS,
    "destination.port": [str(p) for p in PORTS],
    "source.namespace": IDENTITY_PATTERNS,
    "source.principal": IDENTITY_PATTERNS,
    "request.auth.claims[iss]": ["x"],
    "request.headers[x-token]": VALUE_PATTERNS,
    "request.headers[X-EMPTY]": VALUE_PATTERNS,
    "request.headers[accept]": VALUE_PATTERNS,
}
# Policies the schema would refuse or that cannot compile: both must fail alike, in the same
# place (a bad port or block, a malformed header key, a field the table does not know).
MALFORMED = st.sampled_from(
    [
        ("operation", "ports", ["http"]),
        ("source", "ipBlocks", ["10.0.0.300"]),
        ("source", "hosts", ["web"]),
        ("operation", "notFoo", ["x"]),
        ("when", "request.headers[]", ["x"]),
        ("when", "request.headers", ["x"]),
    ]
)


def part(fields: dict[str, st.SearchStrategy[list[Any]]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


@st.composite
def when(draw: st.DrawFn) -> dict[str, Any]:
    key = draw(st.sampled_from(sorted(WHEN_VALUES)))
    optional = {"values": some(WHEN_VALUES[key]), "notValues": some(WHEN_VALUES[key])}
    return {"key": key, **draw(st.fixed_dictionaries({}, optional=optional))}


@st.composite
def rule(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "from": st.lists(
                    part(SOURCE_FIELDS).map(lambda s: {"source": s}), min_size=1, max_size=2
                ),
                "to": st.lists(
                    part(OPERATION_FIELDS).map(lambda o: {"operation": o}), min_size=1, max_size=2
                ),
                "when": st.lists(when(), min_size=1, max_size=2),
            },
        )
    )
    if draw(st.integers(0, 30)) == 0:  # now and then a malformed one
        where, key, values = draw(MALFORMED)
        if where == "when":
            out["when"] = [*out.get("when", []), {"key": key, "values": values}]
        else:
            side = "from" if where == "source" else "to"
            out[side] = [*out.get(side, []), {where: {key: values}}]
    return out


specs = st.fixed_dictionaries(
    {
        "action": st.sampled_from(["ALLOW", "DENY", "AUDIT"]),
        "rules": st.lists(rule(), max_size=3),
    }
)


@st.composite
def request(draw: st.DrawFn) -> Request:
    http = None
    if draw(st.booleans()):
        headers = draw(
            st.lists(
                st.tuples(
                    st.sampled_from(HEADER_NAMES).map(str.encode),
                    st.sampled_from(HEADER_VALUES).map(str.encode),
                ),
                max_size=3,
            )
        )
        http = HttpAttributes(
            draw(st.sampled_from(METHODS)),
            draw(st.sampled_from(PATHS)),
            draw(st.sampled_from(HOSTS)),
            headers,
        )
    return Request(
        draw(st.sampled_from(ADDRESSES)),
        draw(st.sampled_from(ADDRESSES)),
        draw(st.sampled_from(PORTS)),
        draw(st.none() | st.sampled_from(PRINCIPALS)),
        http,
    )


def outcome(make: Any, policy: PolicyObject) -> CompiledPolicy | tuple[type, str]:
    try:
        compiled: CompiledPolicy = make(policy)
    except Exception as e:  # compared: both must refuse alike
        return (type(e), str(e))
    return compiled


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, requests=st.lists(request(), min_size=1, max_size=12))
def test_generated_matchers_decide_as_the_closures(
    spec: dict[str, Any], requests: list[Request]
) -> None:
    policy = PolicyObject("AuthorizationPolicy", "shop", "p", spec)
    new, old = outcome(compile_policy, policy), outcome(reference_policy, policy)
    if not isinstance(old, CompiledPolicy):
        assert new == old
        return
    assert isinstance(new, CompiledPolicy)
    for r in requests:
        assert new.matches(r) is old.matches(r), (spec, r)
        assert new.first_rule(r) == old.first_rule(r), (spec, r)


def test_the_matchers_text_holds_no_policy_value() -> None:
    """Policy values are constants bound in the matchers' globals, never Python source: a value
    that would be code if pasted into the text is only compared."""
    hostile = "x') or True or ('"
    spec = {
        "rules": [
            {"to": [{"operation": {"paths": [hostile, f"{hostile}*", f"*{hostile}"]}}]},
            {"when": [{"key": "request.headers[x-token]", "values": [hostile]}]},
        ]
    }
    policy = compile_policy(PolicyObject("AuthorizationPolicy", "shop", "p", spec))
    plain = Request("10.0.0.1", "10.0.0.2", 80, None, HttpAttributes("GET", "/", "web"))
    assert policy.matches(plain) is False
    hit = Request("10.0.0.1", "10.0.0.2", 80, None, HttpAttributes("GET", hostile, "web"))
    assert policy.matches(hit) is True
    # a value written into the text would be a literal of the compiled code
    for fn in (policy.matches, policy.first_rule):
        assert not any(hostile in str(c) for c in fn.__code__.co_consts)
