"""The cluster document refuses what its readers would disagree about, and reads policy
annotations the way the Kubernetes source does."""

from __future__ import annotations

import pytest

from agent.policy.authz import Authorizer, Request
from agent.sources.document import DocumentError, parse_document
from tests.workloads import workload

POLICY = """\
nodes: [{name: n1}]
policies:
  - apiVersion: nodemesh.io/v1alpha1
    kind: AuthorizationPolicy
    metadata: {name: deny-all, namespace: default, annotations: {%s}}
    spec: {action: DENY, rules: [{}]}
"""


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('nodes: [{name: "n1\\n"}]', "nodes[0].name"),
        (
            'nodes: [{name: n1, pods: [{name: a, namespace: "web\\n"}]}]',
            "nodes[0].pods[0].namespace",
        ),
        ('nodes: [{name: n1, pods: [{name: a, serviceAccount: "sa\\n"}]}]', "nodes[0].pods[0]"),
        (
            'nodes: [{name: n1, pods: [{name: a, labels: {"app\\n": x}}]}]',
            "nodes[0].pods[0].labels",
        ),
        ('trustDomain: "cluster.local\\n"\nnodes: [{name: n1}]', "trustDomain"),
    ],
)
def test_a_trailing_newline_in_a_name_is_refused(text: str, path: str) -> None:
    with pytest.raises(DocumentError) as info:
        parse_document(text, source="x.yaml")
    assert info.value.path.startswith(path)


@pytest.mark.parametrize(
    ("annotation", "dry_run"),
    [('"istio.io/dry-run": "true"', True), ('"nodemesh.io/dry-run": "true"', True), ("", False)],
)
def test_either_dry_run_annotation_keeps_a_policy_from_being_enforced(
    annotation: str, dry_run: bool
) -> None:
    (policy,) = parse_document(POLICY % annotation, source="x.yaml").policies
    assert policy.dry_run is dry_run
    decision = Authorizer.compile([policy]).evaluate(
        Request("10.244.1.2", "10.244.1.3", 8080), workload("server", "n1", "10.244.1.3")
    )
    assert decision.allowed is dry_run
    assert decision.would == (("default/deny-all (dry-run) would deny",) if dry_run else ())
