"""The CRD schemas are well-formed, and sample policies are accepted or rejected as intended."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from importlib import resources
from typing import Any

import pytest
import yaml

from agent.policy.schema import (
    API_VERSION,
    CEL_CHECKS,
    PolicyError,
    crd_schemas,
    parse_duration,
    validate_policy,
)

AUTHZ: dict[str, Any] = {
    "apiVersion": API_VERSION,
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "allow-client", "namespace": "shop", "annotations": {}},
    "spec": {
        "selector": {"matchLabels": {"app": "server"}},
        "action": "DENY",
        "rules": [
            {
                "from": [
                    {
                        "source": {
                            "principals": ["cluster.local/ns/shop/sa/client"],
                            "notNamespaces": ["kube-system"],
                            "ipBlocks": ["10.244.0.0/16", "10.0.0.1"],
                        }
                    }
                ],
                "to": [{"operation": {"ports": ["8080"], "notPorts": ["9090"]}}],
                "when": [{"key": "source.ip", "values": ["10.244.1.2"]}],
            }
        ],
    },
}
PEERAUTH: dict[str, Any] = {
    "apiVersion": API_VERSION,
    "kind": "PeerAuthentication",
    "metadata": {"name": "strict", "namespace": "shop"},
    "spec": {
        "selector": {"matchLabels": {"app": "server"}},
        "mtls": {"mode": "STRICT"},
        "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}},
    },
}
TRAFFIC: dict[str, Any] = {
    "apiVersion": API_VERSION,
    "kind": "TrafficPolicy",
    "metadata": {"name": "server", "namespace": "shop"},
    "spec": {
        "targetRef": {"kind": "Service", "name": "server"},
        "loadBalancer": {"type": "ROUND_ROBIN", "localityPreference": "SAME_NODE"},
        "connectionPool": {"maxConnections": 100, "connectTimeout": "1s", "idleTimeout": "5m"},
        "outlierDetection": {
            "consecutiveFailures": 3,
            "baseEjectionTime": "30s",
            "maxEjectionTime": "5m",
            "maxEjectionPercent": 50,
        },
        "retries": {
            "attempts": 3,
            "perTryTimeout": "250ms",
            "budgetPercent": 20,
            "retryOn": ["refused", "connect-failure"],
        },
        "faultInjection": {
            "delay": {"percent": 5.5, "fixedDelay": "100ms"},
            "abort": {"percent": 1, "mode": "REFUSE"},
            "sourceSelector": {"matchLabels": {"chaos": "yes"}},
        },
        "split": {
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}, "weight": 90},
                {"name": "v2", "labels": {"version": "v2"}, "weight": 10},
            ],
            "stickyBySourceIP": True,
        },
    },
}


def _with(base: Mapping[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with ``dotted`` (``a.b.0.c``) set to value (``...`` removes it)."""
    out = copy.deepcopy(dict(base))
    parts = dotted.split(".")
    node: Any = out
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last: Any = int(parts[-1]) if isinstance(node, list) else parts[-1]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return out


@pytest.mark.parametrize("manifest", [AUTHZ, PEERAUTH, TRAFFIC], ids=lambda m: m["kind"])
def test_valid_samples_are_accepted(manifest: dict[str, Any]) -> None:
    policy = validate_policy(manifest, path="policies[0]")
    assert policy.kind == manifest["kind"]
    assert (policy.namespace, policy.name) == ("shop", manifest["metadata"]["name"])
    assert policy.spec["selector" if "selector" in manifest["spec"] else "targetRef"]


def test_defaults_are_applied_and_dry_run_read() -> None:
    minimal = _with(AUTHZ, "spec", {})
    minimal["metadata"]["annotations"] = {"nodemesh.io/dry-run": "true"}
    policy = validate_policy(minimal, path="p")
    assert policy.spec == {"action": "ALLOW"}
    assert policy.dry_run is True
    traffic = validate_policy(_with(TRAFFIC, "spec.loadBalancer", {}), path="p")
    assert traffic.spec["loadBalancer"] == {"type": "PEAK_EWMA", "localityPreference": "NONE"}
    assert traffic.spec["targetRef"]["group"] == ""


@pytest.mark.parametrize(
    ("annotations", "dry_run"),
    [
        ({"istio.io/dry-run": "true"}, True),
        ({"istio.io/dry-run": "false"}, False),
        ({"istio.io/dry-run": "true", "nodemesh.io/dry-run": "true"}, True),
        ({}, False),
    ],
)
def test_istio_dry_run_annotation_is_honoured(annotations: dict[str, str], dry_run: bool) -> None:
    manifest = _with(AUTHZ, "metadata.annotations", annotations)
    assert validate_policy(manifest, path="p").dry_run is dry_run


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("spec.rules", [{}]),  # a DENY with an empty rule denies everything: allowed
        ("spec.rules.0.when", []),  # no conditions, as in Istio
        ("spec.rules.0.when.0", {"key": "destination.port", "notValues": ["9090"]}),
        ("spec.rules.0.when.0", {"key": "destination.ip", "values": ["fd00::/64"]}),
        ("spec.rules.0.when.0", {"key": "request.headers[x]", "values": ["anything"]}),
    ],
)
def test_istio_accepts_these_and_so_do_we(field: str, value: Any) -> None:
    validate_policy(_with(AUTHZ, field, value), path="p")


REJECTED = [
    (AUTHZ, "spec.action", "ALLOWED", "p.spec.action", "use one of ALLOW, DENY, AUDIT"),
    (AUTHZ, "spec.rules.0.from.0.source", {}, "p.spec.rules[0].from[0].source", "at least 1"),
    (
        AUTHZ,
        "spec.rules.0.from.0.source.ipBlocks",
        ["10.0.0.0/33"],
        "p.spec.rules[0].from[0].source.ipBlocks",
        "IP addresses or CIDRs",
    ),
    (
        AUTHZ,
        "spec.rules.0.to.0.operation.ports",
        ["70000"],
        "p.spec.rules[0].to[0].operation.ports",
        "between 1 and 65535",
    ),
    (
        AUTHZ,
        "spec.rules.0.to.0.operation.ports",
        [8080],
        "p.spec.rules[0].to[0].operation.ports[0]",
        "expected string",
    ),
    (AUTHZ, "spec.rules.0.when.0.values", ..., "p.spec.rules[0].when[0]", "values or notValues"),
    (AUTHZ, "spec.rules.0.from.0.sources", {}, "p.spec.rules[0].from[0].sources", "unknown field"),
    (AUTHZ, "spec.selector.matchLabels", {}, "p.spec", "must not be empty"),
    (
        AUTHZ,
        "metadata.annotations",
        {"nodemesh.io/dry-run": "yes"},
        "p.metadata.annotations.nodemesh.io/dry-run",
        "'true' or 'false'",
    ),
    (AUTHZ, "metadata.name", "Bad_Name", "p.metadata.name", "DNS subdomain"),
    (AUTHZ, "apiVersion", "security.istio.io/v1", "p.apiVersion", f"set apiVersion: {API_VERSION}"),
    (AUTHZ, "apiVersion", "nodemesh.io/v1", "p.apiVersion", f"use {API_VERSION}"),
    (
        {**AUTHZ, "kind": "VirtualService"},
        "apiVersion",
        "networking.istio.io/v1",
        "p.apiVersion",
        "route with a Gateway API HTTPRoute or GRPCRoute, balance, retry and eject with a "
        "TrafficPolicy",
    ),
    (
        AUTHZ,
        "kind",
        "Sidecar",
        "p.kind",
        "use one of AuthorizationPolicy, PeerAuthentication, TrafficPolicy, RateLimitPolicy, "
        "HTTPFault",
    ),
    (AUTHZ, "extra", 1, "p.extra", "unknown field"),
    (
        PEERAUTH,
        "spec.mtls.mode",
        "DISABLE",
        "p.spec.mtls.mode",
        "use one of UNSET, PERMISSIVE, STRICT",
    ),
    (
        PEERAUTH,
        "spec.portLevelMtls",
        {"http": {"mode": "STRICT"}},
        "p.spec.portLevelMtls",
        "port numbers",
    ),
    (PEERAUTH, "spec.selector", ..., "p.spec", "portLevelMtls needs a selector"),
    (TRAFFIC, "spec.targetRef", ..., "p.spec.targetRef", "is required"),
    (TRAFFIC, "spec.targetRef.kind", "Pod", "p.spec.targetRef.kind", "use one of Service"),
    (
        TRAFFIC,
        "spec.connectionPool.connectTimeout",
        "-1s",
        "p.spec.connectionPool.connectTimeout",
        "does not match",
    ),
    (
        TRAFFIC,
        "spec.connectionPool.maxConnections",
        0,
        "p.spec.connectionPool.maxConnections",
        "below the minimum 1",
    ),
    (
        TRAFFIC,
        "spec.outlierDetection.maxEjectionTime",
        "10s",
        "p.spec.outlierDetection",
        "maxEjectionTime must not be shorter",
    ),
    (
        TRAFFIC,
        "spec.faultInjection",
        {"sourceSelector": {"matchLabels": {"a": "b"}}},
        "p.spec.faultInjection",
        "a delay or an abort",
    ),
    (
        TRAFFIC,
        "spec.faultInjection.delay.percent",
        101,
        "p.spec.faultInjection.delay.percent",
        "above the maximum 100",
    ),
    (TRAFFIC, "spec.split.subsets.1.weight", 20, "p.spec.split.subsets", "sum to 100"),
    (TRAFFIC, "spec.split.subsets.1.name", "v1", "p.spec.split.subsets", "unique name"),
    (TRAFFIC, "spec.retries.retryOn", ["refused", "refused"], "p.spec.retries.retryOn", "unique"),
    (
        TRAFFIC,
        "spec.split.stickyBySourceIP",
        "yes",
        "p.spec.split.stickyBySourceIP",
        "expected boolean",
    ),
    # Empty lists that would silently never match (or always, for not* fields): Istio refuses
    # them too, except a value list beside a non-empty sibling, which it reads as absent.
    (AUTHZ, "spec.rules.0.from", [], "p.spec.rules[0].from", "at least 1 item"),
    (AUTHZ, "spec.rules.0.to", [], "p.spec.rules[0].to", "at least 1 item"),
    (
        AUTHZ,
        "spec.rules.0.from.0.source.principals",
        [],
        "p.spec.rules[0].from[0].source.principals",
        "at least 1 item",
    ),
    (
        AUTHZ,
        "spec.rules.0.from.0.source.notNamespaces",
        [],
        "p.spec.rules[0].from[0].source.notNamespaces",
        "at least 1 item",
    ),
    (
        AUTHZ,
        "spec.rules.0.from.0.source.ipBlocks",
        [],
        "p.spec.rules[0].from[0].source.ipBlocks",
        "at least 1 item",
    ),
    (
        AUTHZ,
        "spec.rules.0.to.0.operation.ports",
        [],
        "p.spec.rules[0].to[0].operation.ports",
        "at least 1 item",
    ),
    (AUTHZ, "spec.rules.0.when.0.values", [], "p.spec.rules[0].when[0].values", "at least 1"),
    (AUTHZ, "spec.rules", ..., "p.spec", "DENY policy without rules never matches"),
    (AUTHZ, "spec.rules", [], "p.spec", "add an empty rule"),
    (PEERAUTH, "spec.portLevelMtls", {}, "p.spec.portLevelMtls", "at least 1 field"),
    (TRAFFIC, "spec.retries.retryOn", [], "p.spec.retries.retryOn", "at least 1 item"),
    # ``when`` values their key cannot compare (Istio's webhook refuses them too)
    (
        AUTHZ,
        "spec.rules.0.when.0",
        {"key": "destination.port", "values": ["http"]},
        "p.spec.rules[0].when[0].values[0]",
        "'http' is not a port number",
    ),
    (
        AUTHZ,
        "spec.rules.0.when.0",
        {"key": "source.ip", "values": ["10.0.0.1"], "notValues": ["10.0.0.300"]},
        "p.spec.rules[0].when[0].notValues[0]",
        "not an IP address or CIDR",
    ),
    # a request.headers key needs a header name, as Istio's webhook says
    (
        AUTHZ,
        "spec.rules.0.when.0",
        {"key": "request.headers[]", "values": ["x"]},
        "p.spec.rules[0].when[0].key",
        "'' is not an HTTP header name",
    ),
    (
        AUTHZ,
        "spec.rules.0.when.0",
        {"key": "request.headers[x token]", "values": ["x"]},
        "p.spec.rules[0].when[0].key",
        "'x token' is not an HTTP header name",
    ),
    (
        AUTHZ,
        "spec.rules.0.when.0",
        {"key": "request.headers", "values": ["x"]},
        "p.spec.rules[0].when[0].key",
        "expected request.headers[NAME]",
    ),
    # a trailing newline: Python's '$' would let it through, the API server's does not
    (
        AUTHZ,
        "spec.rules.0.to.0.operation.ports",
        ["80\n"],
        "p.spec.rules[0].to[0].operation.ports[0]",
        "does not match",
    ),
    (TRAFFIC, "spec.targetRef.name", "server\n", "p.spec.targetRef.name", "does not match"),
    (AUTHZ, "metadata.name", "allow\n", "p.metadata.name", "DNS subdomain"),
    (AUTHZ, "metadata.namespace", "shop\n", "p.metadata.namespace", "DNS label"),
    # metadata of an unexpected shape is a rejection, not a crash
    (AUTHZ, "metadata.annotations", ["x"], "p.metadata.annotations", "expected a mapping"),
    (AUTHZ, "metadata.generation", "2", "p.metadata.generation", "non-negative integer"),
    # istio.io/dry-run takes the same values as nodemesh.io/dry-run, and they must agree
    (
        AUTHZ,
        "metadata.annotations",
        {"istio.io/dry-run": "True"},
        "p.metadata.annotations.istio.io/dry-run",
        "'true' or 'false'",
    ),
    (
        AUTHZ,
        "metadata.annotations",
        {"istio.io/dry-run": "true", "nodemesh.io/dry-run": "false"},
        "p.metadata.annotations",
        "disagree",
    ),
]


@pytest.mark.parametrize(("base", "field", "value", "path", "reason"), REJECTED)
def test_invalid_samples_are_rejected_with_path(
    base: dict[str, Any], field: str, value: Any, path: str, reason: str
) -> None:
    with pytest.raises(PolicyError) as info:
        validate_policy(_with(base, field, value), path="p")
    assert info.value.path == path
    assert reason in info.value.reason


@pytest.mark.parametrize(
    ("field", "path", "suggested"),
    [
        ("spec.rules.0.to.0.operation.path", "p.spec.rules[0].to[0].operation.path", "paths"),
        ("spec.rules.0.to.0.operation.method", "p.spec.rules[0].to[0].operation.method", "methods"),
        ("spec.rules.0.to.0.operation.Paths", "p.spec.rules[0].to[0].operation.Paths", "paths"),
        (
            "spec.rules.0.from.0.source.principal",
            "p.spec.rules[0].from[0].source.principal",
            "principals",
        ),
        ("specs", "p.specs", "spec"),
    ],
)
def test_a_near_miss_unknown_field_names_the_field_meant(
    field: str, path: str, suggested: str
) -> None:
    """A typo gets the near miss, as an unknown pod annotation does, at the field's full path."""
    with pytest.raises(PolicyError) as info:
        validate_policy(_with(AUTHZ, field, ["x"]), path="p")
    assert info.value.path == path
    assert info.value.reason.startswith(f"unknown field (did you mean {suggested}?); allowed ")


def test_an_unknown_field_like_none_gets_no_guess() -> None:
    with pytest.raises(PolicyError) as info:
        validate_policy(_with(AUTHZ, "spec.rules.0.to.0.operation.zzz", ["x"]), path="p")
    assert info.value.reason == (
        "unknown field; allowed fields: ports, notPorts, hosts, notHosts, methods, notMethods, "
        "paths, notPaths"
    )


@pytest.mark.parametrize(
    ("field", "reason"),
    [
        ("apiVersion", f"is required; use {API_VERSION}"),
        ("kind", "is required; use one of AuthorizationPolicy, PeerAuthentication, "),
    ],
)
def test_a_missing_api_version_or_kind_is_required_not_none(field: str, reason: str) -> None:
    """Not "None is not allowed": the manifest has no such line, and None is no YAML word."""
    with pytest.raises(PolicyError) as info:
        validate_policy(_with(AUTHZ, field, ...), path="p")
    assert info.value.path == f"p.{field}" and info.value.reason.startswith(reason)


@pytest.mark.parametrize(("field", "value"), [("kind", "Sidecar"), ("spec.action", "ALLOWED")])
def test_choices_are_listed_as_typed_not_as_a_python_tuple(field: str, value: str) -> None:
    with pytest.raises(PolicyError) as info:
        validate_policy(_with(AUTHZ, field, value), path="p")
    choices = info.value.reason.partition("; use one of ")[2]
    assert choices and not any(c in choices for c in "()'\"")


def _check_structural(schema: Mapping[str, Any], where: str) -> None:
    """The rules a Kubernetes structural schema must follow, as far as the CRDs use them."""
    assert "type" in schema, f"{where}: every node needs a type"
    props = schema.get("properties", {})
    assert not (props and "additionalProperties" in schema), f"{where}: both forms"
    for name in schema.get("required", ()):
        assert name in props, f"{where}: required {name} is not a property"
    for value in schema.get("enum", ()):
        assert isinstance(value, str if schema["type"] == "string" else object), where
    if "default" in schema:
        assert schema["default"] in schema.get("enum", [schema["default"]]), where
    for name, sub in props.items():
        if name == "metadata" and where.endswith("openAPIV3Schema"):
            continue
        _check_structural(sub, f"{where}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), Mapping):
            _check_structural(schema[key], f"{where}[{key}]")
    for rule in schema.get("x-kubernetes-validations", ()):
        assert rule["rule"] in CEL_CHECKS and rule["message"], f"{where}: {rule}"


def test_crd_files_are_structural_and_complete() -> None:
    crd_dir = resources.files("agent.policy").joinpath("crds")
    kustomization = yaml.safe_load(crd_dir.joinpath("kustomization.yaml").read_text())
    for name in kustomization["resources"]:
        crd = yaml.safe_load(crd_dir.joinpath(name).read_text())
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.nodemesh.io"
        (version,) = crd["spec"]["versions"]
        assert version["subresources"] == {"status": {}}
        root = version["schema"]["openAPIV3Schema"]
        _check_structural(root, f"{name}:openAPIV3Schema")
        assert "conditions" in root["properties"]["status"]["properties"]
        for column in version["additionalPrinterColumns"]:
            assert column["jsonPath"].startswith((".spec.", ".status.", ".metadata."))
    assert set(crd_schemas()) == {
        "AuthorizationPolicy",
        "PeerAuthentication",
        "TrafficPolicy",
        "RateLimitPolicy",
        "HTTPFault",
    }


@pytest.mark.parametrize(("text", "seconds"), [("250ms", 0.25), ("1m30s", 90.0), ("2h", 7200.0)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "1d", "-1s", "1s "])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)
