"""Fuzzing policy objects: validation refuses cleanly, and what it accepts compiles and evaluates.

Two properties over manifests drawn from the CRD schemas (``policy_strategies``):

- ``validate_policy`` returns a policy or raises ``PolicyError`` naming where and why; nothing
  else escapes, and what it accepts is plain, finite JSON data that validates to itself again;
- every set of accepted policies compiles (authorization, peer authentication) and answers any
  connection, and a dry-run policy never changes an answer.

``make fuzz`` runs these with NODEMESH_FUZZ_EXAMPLES examples; the findings are kept as the
regression tests at the end of the file and in ``tests/unit/sources/test_policy_schema.py``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.policy.authz import Authorizer, Request
from agent.policy.peerauth import PERMISSIVE, STRICT, PeerAuthenticator
from agent.policy.schema import API_VERSION, PolicyError, validate_policy
from agent.sources import kubeobjects as ko
from agent.state.model import PolicyObject
from tests.fuzzing import fuzz_examples
from tests.unit.policy.policy_strategies import manifests
from tests.workloads import workload


def campaign(default: int) -> settings:
    """``default`` examples in ``make test`` (a second or two each), more in ``make fuzz``."""
    return settings(
        max_examples=fuzz_examples(default),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


addresses = st.sampled_from(["10.244.1.2", "10.0.0.1", "::1", "fd00::1"]) | st.ip_addresses().map(
    str
)
requests = st.builds(
    Request,
    source_ip=addresses,
    destination_ip=addresses,
    destination_port=st.sampled_from([80, 8080, 9090]) | st.integers(1, 65535),
    principal=st.sampled_from(
        [
            None,
            "spiffe://cluster.local/ns/default/sa/client",
            "spiffe://cluster.local/ns/shop/sa/a",
        ]
    ),
)
workloads = st.builds(
    workload,
    name=st.just("server"),
    node=st.just("node1"),
    ip=st.just("10.244.1.3"),
    app=st.sampled_from([None, "server", "a"]),
    namespace=st.sampled_from(["default", "shop"]),
)


def validated(manifest: Any) -> PolicyObject | None:
    """The policy, or None after checking that the refusal names where and why."""
    try:
        return validate_policy(manifest, path="policies[0]")
    except PolicyError as e:
        assert e.path.startswith("policies[0]")
        assert e.reason
        return None


@pytest.mark.fuzz
@campaign(100)
@given(manifests())
def test_validation_accepts_or_refuses_cleanly(manifest: Any) -> None:
    policy = validated(manifest)
    try:  # the Kubernetes source's path: the same verdict, as InvalidObject
        from_cluster = ko.guarded(ko.policy_of, manifest)
    except ko.InvalidObject as e:
        assert policy is None
        assert e.reason == "InvalidSpec"
    else:
        assert from_cluster == policy
    if policy is None:
        return
    json.dumps(policy.spec, allow_nan=False)  # the admin API serves it; NaN is not JSON
    again = validate_policy({**manifest, "spec": policy.spec}, path="policies[0]")
    assert again == policy


@pytest.mark.fuzz
@campaign(40)
@given(
    st.lists(manifests(), min_size=1, max_size=4),
    st.lists(st.tuples(requests, workloads), min_size=1, max_size=4),
)
def test_accepted_policies_compile_and_answer_every_connection(
    drawn: list[Any], connections: list[tuple[Request, Any]]
) -> None:
    accepted = {p.key: p for p in map(validated, drawn) if p is not None}
    policies = list(accepted.values())
    authorizer = Authorizer.compile(policies)
    enforced_only = Authorizer.compile([p for p in policies if not p.dry_run])
    peers = PeerAuthenticator.compile(policies)
    for request, pod in connections:
        decision = authorizer.evaluate(request, pod)
        assert decision.allowed == enforced_only.evaluate(request, pod).allowed
        assert peers.mode(pod, request.destination_port) in (STRICT, PERMISSIVE)


def _authz(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p"},
        "spec": spec,
    }


# Findings of the campaigns, each with the exact input, refused cleanly now.
FINDINGS = [
    # validate_policy: sorted() over unknown top-level keys of different types (TypeError)
    ({1: 0, "x": 0, "apiVersion": API_VERSION, "kind": "PeerAuthentication"}, "policies[0]"),
    # a NaN percent passed every bound check and reached the fault injector (and the admin API)
    (
        {
            "apiVersion": API_VERSION,
            "kind": "TrafficPolicy",
            "metadata": {"name": "p"},
            "spec": {
                "targetRef": {"kind": "Service", "name": "0"},
                "faultInjection": {"delay": {"percent": math.nan, "fixedDelay": "1ms"}},
            },
        },
        "policies[0].spec.faultInjection.delay.percent",
    ),
]


@pytest.mark.parametrize(("manifest", "path"), FINDINGS, ids=["mixed-key-types", "nan-percent"])
def test_fuzz_findings_are_clean_rejections(manifest: Any, path: str) -> None:
    with pytest.raises(PolicyError) as info:
        validate_policy(manifest, path="policies[0]")
    assert info.value.path.startswith(path)
