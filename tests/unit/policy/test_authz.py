"""Istio AuthorizationPolicy semantics at L4, case by case."""

from __future__ import annotations

from typing import Any

import pytest

from agent.policy.authz import Authorizer, Request, string_matcher
from agent.state.model import PolicyObject
from tests.workloads import workload

SERVER = workload("server", "node1", "10.244.1.3", app="server")
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
OTHER_ID = "spiffe://cluster.local/ns/other/sa/intruder"


def req(principal: str | None = CLIENT_ID, port: int = 8080, src: str = "10.244.2.2") -> Request:
    return Request(
        source_ip=src, destination_ip="10.244.1.3", destination_port=port, principal=principal
    )


def pol(
    spec: dict[str, Any], *, ns: str = "default", name: str = "p", dry_run: bool = False
) -> PolicyObject:
    return PolicyObject("AuthorizationPolicy", ns, name, spec, dry_run=dry_run)


def allowed(policies: list[PolicyObject], request: Request) -> bool:
    return Authorizer.compile(policies).evaluate(request, SERVER).allowed


def allow(*rules: dict[str, Any], **kw: Any) -> PolicyObject:
    return pol({"action": "ALLOW", "rules": list(rules)}, **kw)


def deny(*rules: dict[str, Any], **kw: Any) -> PolicyObject:
    return pol({"action": "DENY", "rules": list(rules)}, **kw)


def src(**fields: Any) -> dict[str, Any]:
    return {"from": [{"source": fields}]}


def to(**fields: Any) -> dict[str, Any]:
    return {"to": [{"operation": fields}]}


CASES: list[tuple[str, list[PolicyObject], Request, bool]] = [
    ("no policy allows", [], req(), True),
    ("ALLOW with no rules denies everything", [pol({"action": "ALLOW"})], req(), False),
    ("empty rule matches everything", [allow({})], req(), True),
    (
        "principal exact",
        [allow(src(principals=["cluster.local/ns/default/sa/client"]))],
        req(),
        True,
    ),
    ("principal with spiffe prefix", [allow(src(principals=[CLIENT_ID]))], req(), True),
    ("principal other", [allow(src(principals=["cluster.local/ns/default/sa/x"]))], req(), False),
    ("principal prefix", [allow(src(principals=["cluster.local/ns/default/*"]))], req(), True),
    ("principal suffix", [allow(src(principals=["*/sa/client"]))], req(), True),
    ("principal presence admits mTLS", [allow(src(principals=["*"]))], req(), True),
    ("principal presence refuses plaintext", [allow(src(principals=["*"]))], req(None), False),
    ("notPrincipals excludes", [allow(src(notPrincipals=["*/sa/client"]))], req(), False),
    (
        "notPrincipals admits others",
        [allow(src(notPrincipals=["*/sa/client"]))],
        req(OTHER_ID),
        True,
    ),
    ("namespaces from principal", [allow(src(namespaces=["default"]))], req(), True),
    ("namespaces mismatch", [allow(src(namespaces=["default"]))], req(OTHER_ID), False),
    ("notNamespaces", [allow(src(notNamespaces=["other"]))], req(OTHER_ID), False),
    ("plaintext has no namespace", [allow(src(namespaces=["*"]))], req(None), False),
    ("ipBlocks cidr", [allow(src(ipBlocks=["10.244.2.0/24"]))], req(None), True),
    ("ipBlocks single ip", [allow(src(ipBlocks=["10.244.2.2"]))], req(None), True),
    ("ipBlocks miss", [allow(src(ipBlocks=["10.0.0.0/8"]))], req(src="192.168.1.1"), False),
    ("notIpBlocks", [allow(src(notIpBlocks=["10.244.2.0/24"]))], req(), False),
    (
        "all source fields must match",
        [allow(src(namespaces=["default"], ipBlocks=["1.1.1.1"]))],
        req(),
        False,
    ),
    (
        "any source entry may match",
        [
            allow(
                {
                    "from": [
                        {"source": {"namespaces": ["x"]}},
                        {"source": {"namespaces": ["default"]}},
                    ]
                }
            )
        ],
        req(),
        True,
    ),
    ("ports match", [allow(to(ports=["8080"]))], req(port=8080), True),
    ("ports miss", [allow(to(ports=["80"]))], req(port=8080), False),
    ("notPorts", [allow(to(notPorts=["8080"]))], req(port=8080), False),
    (
        "from and to both needed",
        [allow({**src(namespaces=["default"]), **to(ports=["80"])})],
        req(),
        False,
    ),
    ("DENY matching denies", [deny(src(namespaces=["default"]))], req(), False),
    ("DENY not matching allows", [deny(src(namespaces=["other"]))], req(), True),
    (
        "DENY wins over ALLOW",
        [allow({}, name="a"), deny(to(ports=["8080"]), name="d")],
        req(),
        False,
    ),
    (
        "any ALLOW suffices",
        [allow(src(namespaces=["x"]), name="a"), allow(to(ports=["8080"]), name="b")],
        req(),
        True,
    ),
    ("ALLOW with L7 methods fails closed", [allow(to(methods=["GET"]))], req(), False),
    (
        "ALLOW with L7 and L4 rule: L4 rule still works",
        [allow(to(methods=["GET"]), to(ports=["8080"]))],
        req(),
        True,
    ),
    (
        "ALLOW with requestPrincipals fails closed",
        [allow(src(requestPrincipals=["*"]))],
        req(),
        False,
    ),
    ("DENY with L7 paths denies", [deny(to(paths=["/admin"]))], req(), False),
    (
        "DENY with L7 plus L4 mismatch allows",
        [deny({**to(paths=["/a"]), **src(namespaces=["x"])})],
        req(),
        True,
    ),
    (
        "when source.namespace",
        [allow({"when": [{"key": "source.namespace", "values": ["default"]}]})],
        req(),
        True,
    ),
    (
        "when notValues",
        [allow({"when": [{"key": "destination.port", "notValues": ["8080"]}]})],
        req(),
        False,
    ),
    (
        "when L7 key in ALLOW fails closed",
        [allow({"when": [{"key": "request.headers[x]", "values": ["1"]}]})],
        req(),
        False,
    ),
    (
        "when L7 key in DENY denies",
        [deny({"when": [{"key": "request.auth.claims[iss]", "values": ["a"]}]})],
        req(),
        False,
    ),
    ("dry-run DENY not enforced", [deny({}, dry_run=True)], req(), True),
    ("dry-run ALLOW does not count", [allow(src(namespaces=["x"]), dry_run=True)], req(), True),
    ("AUDIT never decides", [pol({"action": "AUDIT", "rules": [{}]})], req(), True),
    ("other namespace ignored", [deny({}, ns="other")], req(), True),
    ("root namespace applies mesh-wide", [deny({}, ns="nodemesh-system")], req(), False),
    (
        "selector matches labels",
        [pol({"action": "DENY", "selector": {"matchLabels": {"app": "server"}}, "rules": [{}]})],
        req(),
        False,
    ),
    (
        "selector mismatch ignored",
        [pol({"action": "DENY", "selector": {"matchLabels": {"app": "db"}}, "rules": [{}]})],
        req(),
        True,
    ),
]


@pytest.mark.parametrize(
    ("policies", "request_", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_istio_semantics(policies: list[PolicyObject], request_: Request, expected: bool) -> None:
    assert allowed(policies, request_) is expected


def test_decision_names_the_policy_and_reason() -> None:
    d = Authorizer.compile([deny(src(namespaces=["default"]), name="no-default")]).evaluate(
        req(), SERVER
    )
    assert (d.allowed, d.policy, d.reason) == (
        False,
        "default/no-default",
        "denied by DENY policy default/no-default:rules[0]",
    )
    assert d.refused_by() == "default/no-default:rules[0]"
    d = Authorizer.compile([allow(src(namespaces=["x"]), name="only-x")]).evaluate(req(), SERVER)
    assert d.reason == "no ALLOW policy matched (applicable: default/only-x)"
    assert d.refused_by() == "no-allow-match"


def test_dry_run_denials_name_the_rule_that_matched() -> None:
    """A dry-run DENY's would-deny names its rule that matched, as an enforced denial does; a
    dry-run ALLOW would deny because none of its rules matched: the policy alone. The policies
    alone (``would_deny``) stay what metrics count."""
    trial = deny(src(namespaces=["x"]), to(ports=["8080"]), name="trial", dry_run=True)
    narrow = allow(src(namespaces=["x"]), name="narrow", dry_run=True)
    d = Authorizer.compile([trial, narrow]).evaluate(req(), SERVER)
    assert d.allowed
    assert d.would_deny == ("default/narrow", "default/trial")
    assert d.would_deny_rules == ("default/narrow", "default/trial:rules[1]")


def test_no_applicable_policy_allows_with_nothing_to_report() -> None:
    """Without policies, or with only policies selecting other workloads, the decision is the
    same whole: allowed, no policy, no dry-run or audit outcome."""
    for policies in ([], [deny({}, ns="other", name="elsewhere", dry_run=True)]):
        d = Authorizer.compile(policies).evaluate(req(), SERVER)
        assert (d.allowed, d.reason, d.policy, d.audited, d.would, d.would_deny) == (
            True, "no ALLOW policy applies", None, (), (), ()
        )  # fmt: skip


def test_dry_run_and_audit_are_reported() -> None:
    policies = [
        deny({}, name="trial", dry_run=True),
        pol({"action": "AUDIT", "rules": [{}]}, name="aud"),
    ]
    d = Authorizer.compile(policies).evaluate(req(), SERVER)
    assert d.allowed
    assert d.would == ("default/trial (dry-run) would deny",)
    assert d.audited == ("default/aud",)


def test_configurable_root_namespace() -> None:
    a = Authorizer.compile([deny({}, ns="mesh-root")], root_namespace="mesh-root")
    assert not a.evaluate(req(), SERVER).allowed


def test_other_kinds_are_ignored() -> None:
    pa = PolicyObject("PeerAuthentication", "default", "p", {"mtls": {"mode": "STRICT"}})
    assert Authorizer.compile([pa]).policies == []


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("a", "a", True),
        ("a", "ab", False),
        ("a*", "ab", True),
        ("*b", "ab", True),
        ("*", "", False),
        ("*", None, False),
        ("a*", None, False),
    ],
)
def test_string_matcher(pattern: str, value: str | None, expected: bool) -> None:
    assert string_matcher(pattern)(value) is expected
