"""The cluster document parser: good files load, bad files fail with file, path and fix."""

from __future__ import annotations

import textwrap

import pytest

from agent.sources.document import DocumentError, dump_document, parse_document

GOOD = textwrap.dedent(
    """
    trustDomain: example.org
    nodes:
      - name: node1
        pods:
          - {name: client, namespace: default, serviceAccount: client, ip: 10.244.1.2,
             labels: {app: client}, annotations: {nodemesh.io/mesh: enabled}}
          - {name: outsider, namespace: default, serviceAccount: outsider}
      - name: node2
        pods:
          - {name: server-0, serviceAccount: server, ip: 10.244.2.2, labels: {app: server},
             annotations: {nodemesh.io/exclude-inbound-ports: "9090, 9091"}}
          - {name: server-1, serviceAccount: server, labels: {app: server}}
    namespaces:
      - {name: default, labels: {nodemesh.io/mesh: enabled}}
    services:
      - {name: server, namespace: default, selector: {app: server},
         ports: [{port: 80, targetPort: 8080}], clusterIP: 10.96.0.10}
    policies:
      - apiVersion: nodemesh.io/v1alpha1
        kind: AuthorizationPolicy
        metadata: {name: deny-outsider, namespace: default}
        spec: {action: DENY, rules: [{}]}
    """
)


def test_good_document_gives_state_objects() -> None:
    state = parse_document(GOOD, source="t.yaml").to_state()
    assert state.trust_domain == "example.org"
    by_uid = {w.uid: w for w in state.workloads}
    assert set(by_uid) == {
        "default/client",
        "default/outsider",
        "default/server-0",
        "default/server-1",
    }
    assert by_uid["default/client"].ips == ("10.244.1.2",)
    assert by_uid["default/client"].mesh_annotation == "enabled"
    assert by_uid["default/outsider"].ips == ()
    assert by_uid["default/server-0"].node == "node2"
    assert by_uid["default/server-0"].exclude_inbound_ports == frozenset({9090, 9091})
    (svc,) = state.services
    assert svc.cluster_ips == ("10.96.0.10",)
    assert (svc.ports[0].port, svc.ports[0].target_port) == (80, 8080)
    # server-1 has no IP yet (pending): not an endpoint.
    assert [(e.ip, e.workload_uid) for e in svc.endpoints] == [("10.244.2.2", "default/server-0")]
    (ns,) = state.namespaces
    assert ns.mesh_enabled
    (policy,) = state.policies
    assert policy.key == ("AuthorizationPolicy", "default", "deny-outsider")
    assert policy.spec == {"action": "DENY", "rules": [{}]}


def test_defaults_and_implicit_namespaces() -> None:
    doc = parse_document("nodes: [{name: n1, pods: [{name: a, namespace: team}]}]", source="x")
    state = doc.to_state()
    (w,) = state.workloads
    assert (w.namespace, w.service_account, w.mesh_annotation) == ("team", "default", None)
    assert [n.name for n in state.namespaces] == ["team"]
    assert state.trust_domain == "cluster.local"


def test_dump_round_trips() -> None:
    doc = parse_document(GOOD, source="t.yaml")
    assert parse_document(dump_document(doc), source="again") == doc


def test_target_port_defaults_to_port() -> None:
    doc = parse_document(
        "nodes: [{name: n1}]\nservices: [{name: s, selector: {a: b}, ports: [{port: 81}]}]",
        source="x",
    )
    assert doc.services[0].ports[0].target_port == 81


N1 = "nodes: [{name: n1}]\n"
AV = "apiVersion: nodemesh.io/v1alpha1"

BAD = [
    ("nodes: []", "x.yaml: nodes: at least one node"),
    (
        "nodes: [{name: n1, pod: []}]",
        "x.yaml: nodes[0].pod: unknown key 'pod'; allowed keys here: name",
    ),
    ("colour: red\nnodes: [{name: n1}]", "x.yaml: colour: unknown key 'colour'"),
    (
        "nodes: [{name: n1, pods: [{name: a}, {name: b, serviceAcount: b}]}]",
        "nodes[0].pods[1].serviceAcount: unknown key",
    ),
    ("nodes: [{name: Node_1}]", "nodes[0].name: 'Node_1' is not a valid name"),
    (
        "nodes: [{name: n1}, {name: n1}]",
        "nodes[1].name: duplicate node 'n1': already defined at nodes[0].name",
    ),
    (
        "nodes: [{name: n1, pods: [{name: a}]}, {name: n2, pods: [{name: a}]}]",
        "nodes[1].pods[0].name: duplicate pod 'default/a'",
    ),
    (
        "nodes: [{name: n1, pods: [{name: a, ip: 10.0.0.1}, {name: b, ip: 10.0.0.1}]}]",
        "nodes[0].pods[1].ip: duplicate IP address '10.0.0.1'",
    ),
    (
        "nodes: [{name: n1, pods: [{name: a, ip: 10.0.0.300}]}]",
        "nodes[0].pods[0].ip: '10.0.0.300' is not an IPv4",
    ),
    (
        "nodes: [{name: n1, pods: [{name: a, annotations: {nodemesh.io/mesh: on}}]}]",
        "nodes[0].pods[0].annotations.nodemesh.io/mesh: expected a string value",
    ),
    (
        "nodes: [{name: n1, pods: [{name: a, annotations: {nodemesh.io/mesh: 'yes'}}]}]",
        "annotations.nodemesh.io/mesh: 'yes' is not allowed: use enabled or disabled",
    ),
    (
        N1 + "namespaces: [{name: shop, labels: {nodemesh.io/mesh: 'true'}}]",
        "namespaces[0].labels.nodemesh.io/mesh: 'true' is not allowed: use enabled or disabled",
    ),
    (
        "nodes: [{name: n1, pods: [{name: a, annotations:\n"
        "  {nodemesh.io/exclude-outbound-ports: '80,x'}}]}]",
        "annotations.nodemesh.io/exclude-outbound-ports: 'x' is not a port",
    ),
    (
        "nodes: [{name: n1}]\nservices: [{name: s, selector: {}, ports: [{port: 70000}]}]",
        "services[0].ports[0].port: expected a port number 1-65535, got 70000",
    ),
    (
        "nodes: [{name: n1}]\nservices: [{name: s, ports: [{port: 80, targetPort: http}]}]",
        "services[0].ports[0].targetPort: named target ports ('http') are not supported",
    ),
    (
        "nodes: [{name: n1}]\nservices: [{name: s, ports: [{port: 80, protocol: UDP}]}]",
        "services[0].ports[0].protocol: 'UDP' is not supported",
    ),
    (
        "nodes: [{name: n1}]\nservices: [{name: s, ports: []}]",
        "services[0].ports: at least one port",
    ),
    (
        N1 + "services: [{name: s, ports: [{port: 80}]}, {name: s, ports: [{port: 80}]}]",
        "services[1].name: duplicate service",
    ),
    ("nodes: [{name: n1, name: n2}]", "x.yaml: not valid YAML"),
    ("nodes: [{name: n1}]\npolicies: {}", "x.yaml: policies: expected a list, got a mapping"),
    (
        N1 + "policies: [{apiVersion: v1, kind: AuthorizationPolicy, metadata: {name: p}}]",
        "policies[0].apiVersion: 'v1' is not allowed; use nodemesh.io/v1alpha1",
    ),
    (
        N1 + "policies: [{" + AV + ", kind: NetworkPolicy, metadata: {name: p}}]",
        "policies[0].kind: 'NetworkPolicy' is not allowed",
    ),
    (
        N1 + "policies: [{" + AV + ", kind: TrafficPolicy, metadata: {}}]",
        "policies[0].metadata.name: None is not a DNS subdomain name",
    ),
    (
        "nodes: [{name: n1}]\npolicies:\n"
        "- {" + AV + ", kind: PeerAuthentication, metadata: {name: p}, spec: {}}\n"
        "- {" + AV + ", kind: PeerAuthentication, metadata: {name: p}, spec: {}}",
        "policies[1].metadata.name: duplicate policy",
    ),
    (
        N1 + "policies:\n- {" + AV + ", kind: PeerAuthentication, metadata: {name: p},\n"
        "   spec: {mtls: {mode: OFF}}}",
        "policies[0].spec.mtls.mode:",
    ),
    (N1 + "policies: [7]", "policies[0]: expected a policy manifest, got int"),
    ("- a\n- b", "x.yaml: expected a mapping with keys trustDomain"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_document_names_file_path_and_fix(text: str, message: str) -> None:
    with pytest.raises(DocumentError) as info:
        parse_document(text, source="x.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("x.yaml")
