"""The shared warning functions: the same verdicts for the lab, the CLI and the agent."""

from __future__ import annotations

import pytest

from agent.policy.warnings import (
    FOREIGN_TRUST_DOMAIN,
    NEVER_MATCHES,
    POD_ANNOTATIONS,
    UNKNOWN_ANNOTATION,
    pod_warnings,
    policy_warnings,
    reach_warnings,
    service_warnings,
    unknown_annotation,
)

TD = "cluster.local"


def test_only_unread_nodemesh_keys_are_unknown() -> None:
    for key in (*POD_ANNOTATIONS, "istio.io/rev", "app", "example.com/nodemesh.io/x"):
        assert unknown_annotation(key) is None
    assert unknown_annotation("nodemesh.io/sidecar") == (
        "unknown nodemesh annotation; a pod's are nodemesh.io/mesh, "
        "nodemesh.io/exclude-outbound-ports, nodemesh.io/exclude-inbound-ports, "
        "nodemesh.io/http-ports"
    )


def test_a_near_miss_names_the_likely_intended_key() -> None:
    hints = {
        "nodemesh.io/http-port": "nodemesh.io/http-ports",
        "nodemesh.io/HTTP-Ports": "nodemesh.io/http-ports",
        "nodemesh.io/exclude-inbound-port": "nodemesh.io/exclude-inbound-ports",
        "nodemesh.io/exlude-outbound-ports": "nodemesh.io/exclude-outbound-ports",
        "nodemesh.io/meshed": "nodemesh.io/mesh",
    }
    for typo, meant in hints.items():
        assert f"(did you mean {meant}?)" in (unknown_annotation(typo) or ""), typo
    # The shared prefix alone is no resemblance.
    assert "did you mean" not in (unknown_annotation("nodemesh.io/dry-run") or "")


def test_pod_warnings_are_one_per_unknown_key_in_key_order() -> None:
    annotations = {
        "nodemesh.io/zzz": "1",
        "nodemesh.io/mesh": "enabled",
        "nodemesh.io/http-port": "8080",
        "other.io/x": "y",
    }
    warnings = pod_warnings(annotations)
    assert [w.reason for w in warnings] == [UNKNOWN_ANNOTATION] * 2
    assert [w.message.split(":")[0] for w in warnings] == [
        "annotation nodemesh.io/http-port",
        "annotation nodemesh.io/zzz",
    ]
    assert warnings[0].message.endswith("; this agent ignores it")
    assert pod_warnings({"nodemesh.io/mesh": "enabled"}) == []


def test_policy_warnings_are_never_matching_values_of_an_authorization_policy() -> None:
    spec = {
        "rules": [
            {
                "from": [{"source": {"principals": ["default/client"]}}],
                "to": [{"operation": {"methods": ["get", "POST"], "paths": ["/a/*/b"]}}],
            }
        ]
    }
    warnings = policy_warnings("AuthorizationPolicy", spec, trust_domain=TD)
    assert [w.reason for w in warnings] == [NEVER_MATCHES] * 3
    assert [w.message.split(":")[0] for w in warnings] == [
        "spec.rules[0].from[0].source.principals[0]",
        "spec.rules[0].to[0].operation.methods[0]",
        "spec.rules[0].to[0].operation.paths[0]",
    ]
    assert policy_warnings("TrafficPolicy", spec, trust_domain=TD) == []
    fixed = {"rules": [{"to": [{"operation": {"methods": ["GET"], "paths": ["/a/*"]}}]}]}
    assert policy_warnings("AuthorizationPolicy", fixed, trust_domain=TD) == []


def _principals(field: str, *values: str) -> dict[str, object]:
    return {"action": "ALLOW", "rules": [{"from": [{"source": {field: list(values)}}]}]}


@pytest.mark.parametrize("field", ["principals", "notPrincipals"])
def test_a_principal_of_another_trust_domain_is_warned_with_the_fix(field: str) -> None:
    """In a mesh of example.org no peer is ever ``cluster.local/...`` (the handshake admits only
    example.org's), so the value never matches, as in ztunnel; nodemesh has no
    ``trustDomainAliases``: the warning names the value, both trust domains and the fix."""
    spec = _principals(field, "cluster.local/ns/x/sa/y", "spiffe://other.td/ns/x/*")
    first, second = policy_warnings("AuthorizationPolicy", spec, trust_domain="example.org")
    assert (first.reason, second.reason) == (FOREIGN_TRUST_DOMAIN, FOREIGN_TRUST_DOMAIN)
    assert first.message.startswith(
        f"spec.rules[0].from[0].source.{field}[0]: 'cluster.local/ns/x/sa/y' is of trust domain "
        "cluster.local, but this mesh's is example.org"
    )
    assert first.message.endswith(
        "nodemesh has no trustDomainAliases: write example.org/ns/x/sa/y (or */ns/x/sa/y for any)"
    )
    effect = "excludes no peer" if field == "notPrincipals" else "admits no one"
    assert effect in first.message
    assert "'spiffe://other.td/ns/x/*' is of trust domain other.td" in second.message
    assert second.message.endswith("write example.org/ns/x/*")


@pytest.mark.parametrize(
    "value",
    ["example.org/ns/x/sa/y", "spiffe://example.org/ns/x/sa/y", "example.org/ns/x/*", "*",
     "*/ns/x/sa/y", "*/sa/y", "exam*"],
)  # fmt: skip
def test_a_principal_the_mesh_trust_domain_can_match_is_not_warned(value: str) -> None:
    """The mesh's own, and ``*``/suffix/prefix patterns that cover it: no warning."""
    spec = _principals("principals", value)
    assert policy_warnings("AuthorizationPolicy", spec, trust_domain="example.org") == []
    # Without the mesh's trust domain (an agent from before /policies named it): not judged.
    foreign = _principals("principals", "cluster.local/ns/x/sa/y")
    assert policy_warnings("AuthorizationPolicy", foreign, trust_domain=None) == []


@pytest.mark.parametrize(
    ("value", "meant"),
    [("http3", "http"), ("htttp", "http"), ("HTTP/1.1", "http"), ("grpcs", "grpc"),
     ("kubernetes.io/h2", "kubernetes.io/h2c"), ("http", None), ("HTTP", None), ("grpc", None),
     ("https", None), ("tls", None), ("tcp", None), ("kubernetes.io/ws", None), ("mysql", None)],
)  # fmt: skip
def test_an_app_protocol_near_one_the_mesh_reads_is_warned(value: str, meant: str | None) -> None:
    """Near misses only: a protocol the mesh reads, or one rightly opaque (https, mysql), is not."""
    found = service_warnings({"ports": [{"port": 80}, {"port": 81, "appProtocol": value}]})
    if meant is None:
        assert found == []
    else:
        assert [w.reason for w in found] == ["UnreadAppProtocol"]
        assert found[0].message.startswith(f"spec.ports[1].appProtocol: {value!r} is not a ")
        assert found[0].message.endswith(f"(did you mean {meant}?)")


PODS = [
    {"namespace": "default", "labels": {"app": "server", "version": "v1"}},
    {"namespace": "shop", "labels": {"app": "client"}},
]
SERVICES = {("default", "web"), ("default", "server"), ("shop", "cart")}


@pytest.mark.parametrize(
    ("namespace", "spec", "message"),
    [
        ("default", {"selector": {"matchLabels": {"app": "srever"}}},
         "spec.selector.matchLabels: app=srever selects no pod in namespace default (did you "
         "mean app=server?); the policy applies to none until one matches"),
        ("default", {"selector": {"matchLabels": {"app": "client"}}},  # only in shop
         "spec.selector.matchLabels: app=client selects no pod in namespace default; the "
         "policy applies to none until one matches"),
        ("nodemesh-system", {"selector": {"matchLabels": {"tier": "db"}}},
         "spec.selector.matchLabels: tier=db selects no pod in the mesh; the policy applies to "
         "none until one matches"),
        ("default", {"targetRef": {"kind": "Service", "name": "wbe"}},
         "spec.targetRef: no Service default/wbe; did you mean web? Services in default: "
         "server, web; the policy applies to none until it exists"),
        ("shop", {"targetRef": {"kind": "Service", "name": "web"}},
         "spec.targetRef: no Service shop/web; Services in shop: cart; the policy applies to "
         "none until it exists"),
    ],
)  # fmt: skip
def test_a_policy_that_reaches_nothing_is_warned(
    namespace: str, spec: dict[str, object], message: str
) -> None:
    assert [(w.reason, w.message) for w in reach_warnings(namespace, spec, PODS, SERVICES)] == [
        ("NothingSelected", message)
    ]


@pytest.mark.parametrize(
    ("namespace", "spec"),
    [
        ("default", {"selector": {"matchLabels": {"app": "server", "version": "v1"}}}),
        ("nodemesh-system", {"selector": {"matchLabels": {"app": "client"}}}),  # mesh-wide
        ("default", {"action": "DENY", "rules": [{}]}),  # no selector: every pod of default
        ("default", {"targetRef": {"kind": "Service", "name": "web"}}),
    ],
)
def test_a_policy_that_reaches_something_is_not_warned(
    namespace: str, spec: dict[str, object]
) -> None:
    assert reach_warnings(namespace, spec, PODS, SERVICES) == []
