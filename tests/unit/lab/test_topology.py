"""Lab planning and the edits of a running lab, without building anything (no root)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent.cli import main
from agent.lab import control
from agent.lab.record import LabDir
from agent.lab.topology import DEFAULT_TOPOLOGY, LabError, check_lab_name, plan_lab
from agent.policy.warnings import unknown_annotation
from agent.sources.document import DocumentError, parse_document
from agent.state.protocols import port_protocol


def _plan(text: str = DEFAULT_TOPOLOGY, lab: str = "nm"):  # type: ignore[no-untyped-def]
    return plan_lab(parse_document(text, source="t.yaml"), lab, source="t.yaml")


def test_default_topology_plan() -> None:
    doc, plan = _plan()
    assert [(n.name, n.netns, n.ip, n.pod_cidr, n.uplink) for n in plan.nodes] == [
        ("node1", "nm-node1", "10.100.0.1", "10.244.1.0/24", "eth0"),
        ("node2", "nm-node2", "10.100.0.2", "10.244.2.0/24", "eth0"),
    ]
    assert [(p.name, p.ip, p.node, p.host_veth) for p in plan.pods] == [
        ("client", "10.244.1.2", "node1", "pv0"),
        ("neighbor", "10.244.1.3", "node1", "pv1"),
        ("outsider", "10.244.1.4", "node1", "pv2"),
        ("server-0", "10.244.2.2", "node2", "pv0"),
        ("server-1", "10.244.2.3", "node2", "pv1"),
    ]
    assert plan.nodes[0].pin_dir == "/sys/fs/bpf/nodemesh/nm-node1"
    assert all(name.startswith("nm-") for name in plan.netns_names())
    # The completed document carries every assigned address, for the agents.
    assert {pod.name: pod.ip for _, pod in doc.pods()}["server-1"] == "10.244.2.3"
    assert [(s.name, s.cluster_ip) for s in doc.services] == [
        ("server", "10.96.0.10"),
        ("web", "10.96.0.11"),
        ("grpc", "10.96.0.12"),
    ]
    server, web, grpc = doc.to_state().services
    for svc in (server, web, grpc):
        assert sorted(e.ip for e in svc.endpoints) == ["10.244.2.2", "10.244.2.3"]
    # Service web declares HTTP on its own pod port; the echo port behind Service server stays L4.
    assert [(p.port, p.target_port, port_protocol(p)) for p in server.ports] == [(80, 8080, "tcp")]
    assert [(p.port, p.target_port, port_protocol(p)) for p in web.ports] == [(80, 9080, "http")]
    assert [(p.port, p.target_port, port_protocol(p)) for p in grpc.ports] == [
        (50051, 50051, "grpc")
    ]


def test_given_pod_ip_is_kept_and_skipped_by_assignment() -> None:
    _, plan = _plan("nodes: [{name: n1, pods: [{name: a}, {name: b, ip: 10.244.1.2}]}]")
    assert [(p.name, p.ip) for p in plan.pods] == [("a", "10.244.1.3"), ("b", "10.244.1.2")]


def test_other_namespace_gets_a_distinct_netns_name() -> None:
    _, plan = _plan("nodes: [{name: n1, pods: [{name: a}, {name: a, namespace: team}]}]")
    assert [p.netns for p in plan.pods] == ["nm-a", "nm-a.team"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "nodes: [{name: n1, pods: [{name: a, ip: 10.9.9.9}]}]",
            "t.yaml: nodes[0].pods[0].ip: 10.9.9.9 is not in node n1's pod CIDR 10.244.1.0/24",
        ),
        ("nodes: [{name: n1, ip: 10.100.0.7}]", "nodes[0]: ip and podCIDR are assigned by the lab"),
        ("nodes: [{name: switch}]", "nodes[0].name: 'switch' is reserved"),
        ("nodes: [{name: n1, pods: [{name: n1}]}]", "pod 'n1' has the name of a node"),
    ],
)
def test_unbuildable_documents_are_refused(text: str, message: str) -> None:
    with pytest.raises(LabError) as info:
        _plan(text)
    assert message in str(info.value)


@pytest.mark.parametrize("name", ["", "nm-2", "Lab", "1lab", "toolongname", "lab\n"])
def test_lab_names_without_dash_and_short(name: str) -> None:
    with pytest.raises(LabError, match="is not allowed"):
        check_lab_name(name)


@pytest.fixture
def recorded(tmp_path: Path) -> str:
    """A lab recorded in a temporary state root, as ``up`` leaves it (nothing built)."""
    doc, plan = _plan(lab="unit")
    labdir = LabDir("unit", str(tmp_path))
    labdir.create()
    labdir.write_plan(plan)
    labdir.write_cluster(doc)
    return str(tmp_path)


LabApply = Callable[[str], tuple[Path, str, str]]


@pytest.fixture
def lab_apply(
    recorded: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> LabApply:
    """``nodemesh lab apply -f FILE`` of a text on the recorded lab, which it must accept: the
    file, then what was printed on stdout and stderr."""
    monkeypatch.setattr(control, "labdir_of", lambda lab, state_root=None: LabDir(lab, recorded))

    def apply(text: str) -> tuple[Path, str, str]:
        manifest = tmp_path / "objects.yaml"
        manifest.write_text(text)
        assert main(["lab", "apply", "--name", "unit", "-f", str(manifest)]) == 0
        out, err = capsys.readouterr()
        return manifest, out, err

    return apply


def test_down_says_when_there_was_no_such_lab(
    recorded: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped name must not read as if the lab the user meant was removed."""
    monkeypatch.setattr(
        control, "labdir_of", lambda lab, state_root=None: LabDir(lab, state_root or recorded)
    )
    assert control.labs_up() == ["unit"]
    assert main(["lab", "down", "--name", "unitt"]) == 0
    assert capsys.readouterr().out == "lab unitt was not up: nothing to remove (labs up: unit)\n"
    assert main(["lab", "down", "--name", "unit"]) == 0
    assert capsys.readouterr().out == "lab unit removed\n"
    assert control.labs_up() == [] and control.down("unit") is False


POLICY = {
    "apiVersion": "nodemesh.io/v1alpha1",
    "kind": "PeerAuthentication",
    "metadata": {"name": "strict", "namespace": "default"},
    "spec": {"mtls": {"mode": "STRICT"}},
}


def _meshed(root: str) -> dict[str, bool]:
    return {p["name"]: p["meshed"] for p in control.status("unit", state_root=root)["pods"]}


def test_annotate_changes_membership_in_the_cluster_file(recorded: str) -> None:
    assert _meshed(recorded)["outsider"] is False
    said = control.annotate("unit", "outsider", ["nodemesh.io/mesh=enabled"], state_root=recorded)
    assert said == "pod default/outsider annotated; its annotations now: nodemesh.io/mesh=enabled"
    assert _meshed(recorded)["outsider"] is True
    said = control.annotate("unit", "default/client", ["nodemesh.io/mesh-"], state_root=recorded)
    assert said == "pod default/client annotated; its annotations now: none"
    assert _meshed(recorded)["client"] is False
    with pytest.raises(LabError) as refused:  # named as written, not by its place in the file
        control.annotate("unit", "client", ["nodemesh.io/mesh=maybe"], state_root=recorded)
    assert str(refused.value) == (
        "pod default/client: annotation nodemesh.io/mesh: 'maybe' is not allowed: use enabled"
        " or disabled; nothing was changed"
    )
    with pytest.raises(LabError, match="no pod default/ghost in lab unit; known: default/client,"):
        control.annotate("unit", "ghost", ["a=b"], state_root=recorded)
    with pytest.raises(LabError, match="KEY=VALUE"):
        control.annotate("unit", "client", ["novalue"], state_root=recorded)


def test_an_unknown_nodemesh_annotation_is_refused_not_ignored(recorded: str) -> None:
    """A typo such as ``nodemesh.io/exclude-outbound-port`` would silently do nothing; other
    prefixes are the user's (and removing an unknown key is always allowed)."""
    typo = "nodemesh.io/exclude-outbound-port=9090"
    with pytest.raises(
        LabError, match=r"annotation nodemesh.io/exclude-outbound-port: unknown"
    ) as e:
        control.annotate("unit", "client", [typo], state_root=recorded)
    # The agent's Event says the same (agent.policy.warnings, one function for both).
    assert unknown_annotation("nodemesh.io/exclude-outbound-port") in str(e.value)
    assert "(did you mean nodemesh.io/exclude-outbound-ports?)" in str(e.value)
    control.annotate("unit", "client", ["example.com/team=a"], state_root=recorded)
    control.annotate("unit", "client", ["nodemesh.io/exclude-outbound-port-"], state_root=recorded)
    topology = DEFAULT_TOPOLOGY.replace("{nodemesh.io/mesh: enabled}", "{nodemesh.io/mesh-typo: x}")
    assert topology != DEFAULT_TOPOLOGY
    with pytest.raises(LabError, match=r"t\.yaml: nodes\[0\]\.pods\[0\]\.annotations\.nodemesh"):
        _plan(topology)


def test_apply_replaces_and_delete_removes_policies(recorded: str) -> None:
    labdir = LabDir("unit", recorded)
    control.apply("unit", [POLICY], state_root=recorded)
    control.apply("unit", [POLICY], state_root=recorded)
    assert [p.key for p in labdir.read_cluster().policies] == [
        ("PeerAuthentication", "default", "strict")
    ]
    control.delete("unit", [POLICY], state_root=recorded)
    assert labdir.read_cluster().policies == ()
    with pytest.raises(LabError, match="PeerAuthentication default/strict not found"):
        control.delete("unit", [POLICY], state_root=recorded)
    bad = {**POLICY, "spec": {"mtls": {"mode": "SOMETIMES"}}}
    with pytest.raises(DocumentError, match=r"the manifests: document 1 .*spec\.mtls\.mode"):
        control.apply("unit", [bad], state_root=recorded)
    assert labdir.read_cluster().policies == ()


def test_a_refused_apply_names_the_users_file_and_document_and_keeps_the_old_version(
    recorded: str,
) -> None:
    """The error points into the file the user applied (not the lab's merged cluster file,
    where the object sits at another index) and says that nothing changed."""
    labdir = LabDir("unit", recorded)
    control.apply("unit", [ROUTE, POLICY], state_root=recorded)
    deny = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-admin", "namespace": "default"},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]},
    }
    control.apply("unit", [deny], state_root=recorded)
    typo = {
        **deny,
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"path": ["/a"]}}]}]},
    }
    with pytest.raises(DocumentError) as refused:
        control.apply("unit", [ROUTE, typo], state_root=recorded, source="deny.yaml")
    assert str(refused.value).startswith(
        "deny.yaml: document 2 (AuthorizationPolicy default/no-admin): "
        "spec.rules[0].to[0].operation.path: unknown field (did you mean paths?); allowed "
        "fields: "
    )
    assert str(refused.value).endswith("nothing was applied; lab unit keeps its previous objects")
    kept = [m for m in labdir.read_cluster().policy_manifests if m["kind"] == "AuthorizationPolicy"]
    assert kept == [deny]
    nameless = {"apiVersion": "nodemesh.io/v1alpha1", "kind": "AuthorizationPolicy", "spec": {}}
    with pytest.raises(
        DocumentError, match=r"document 1 \(AuthorizationPolicy default/\(no name\)\)"
    ):
        control.apply("unit", [nameless], state_root=recorded, source="-")
    bad_port = _service("web-v3", "v3", {"port": 0})
    with pytest.raises(
        DocumentError,
        match=r"^svc\.yaml: document 1 \(Service default/web-v3\): spec\.ports\[0\]\.port",
    ):
        control.apply("unit", [bad_port], state_root=recorded, source="svc.yaml")


@pytest.mark.parametrize(
    ("api_version", "kind", "message"),
    [
        (
            "gateway.networking.k8s.io/v1",
            "HTTPRoue",
            "'HTTPRoue' is not a kind lab apply takes; "
            "did you mean HTTPRoute? use one of AuthorizationPolicy (nodemesh.io/v1alpha1), ",
        ),
        ("v1", "Servce", "did you mean Service?"),
        ("v1", "ConfigMap", "'ConfigMap' is not a kind lab apply takes; use one of "),
        ("nodemesh.io/v1alpha1", "TraficPolicy", "did you mean TrafficPolicy?"),
        # far from every kind: the schema's own word (what replaces Istio's object)
        ("networking.istio.io/v1", "VirtualService", "does not read Istio's networking objects"),
    ],
)
def test_apply_names_a_mistyped_kind_not_the_api_version(
    recorded: str, api_version: str, kind: str, message: str
) -> None:
    """A typo in ``kind`` must not read as a wrong ``apiVersion`` (which was right)."""
    manifest = {"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}, "spec": {}}
    before = LabDir("unit", recorded).cluster_file.read_text()
    with pytest.raises(DocumentError) as refused:
        control.apply("unit", [POLICY, manifest], state_root=recorded, source="k.yaml")
    assert message in str(refused.value)
    assert str(refused.value).startswith(f"k.yaml: document 2 ({kind} default/x): ")
    assert str(refused.value).endswith("nothing was applied; lab unit keeps its previous objects")
    assert LabDir("unit", recorded).cluster_file.read_text() == before  # POLICY not applied


@pytest.mark.parametrize("api_version", ["v1", "nodemesh.io/v1alpha1", "example.com/v1"])
def test_apply_says_a_missing_kind_is_required(recorded: str, api_version: str) -> None:
    """Not "'None' is not a kind lab apply takes" under a document named "(None default/x)"."""
    manifest = {"apiVersion": api_version, "metadata": {"name": "x"}, "spec": {}}
    with pytest.raises(DocumentError) as refused:
        control.apply("unit", [POLICY, manifest], state_root=recorded, source="k.yaml")
    assert str(refused.value).startswith(
        "k.yaml: document 2 (default/x): kind: is required; use one of AuthorizationPolicy "
    )


def test_apply_warns_of_values_that_never_match(lab_apply: LabApply) -> None:
    """Applied (Istio accepts them too), with a warning naming the file, document and field."""
    manifest, out, err = lab_apply(
        "apiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\n"
        "metadata: {name: no-admin, namespace: default}\n"
        "spec: {action: DENY, rules: [{to: [{operation: {paths: ['/admin/*/x']}}]}]}\n"
    )
    assert out == "AuthorizationPolicy default/no-admin created\n"
    assert err == (
        f"nodemesh lab: warning: {manifest}: document 1 (AuthorizationPolicy default/no-admin): "
        "spec.rules[0].to[0].operation.paths[0]: '/admin/*/x' matches only its literal text: "
        "'*' matches once, at the start (suffix match), at the end (prefix match) or alone\n"
    )
    assert [p.key for p in control.labdir_of("unit").read_cluster().policies] == [
        ("AuthorizationPolicy", "default", "no-admin")
    ]


def test_resolve_target(recorded: str) -> None:
    _, plan = control.load("unit", state_root=recorded)
    assert control.resolve_target(plan, "client") == "unit-client"
    assert control.resolve_target(plan, "default/server-1") == "unit-server-1"
    assert control.resolve_target(plan, "node2") == "unit-node2"
    assert control.resolve_target(plan, "ca") == "unit-ca"
    with pytest.raises(LabError, match="no pod or node 'ghost' in lab unit; known: default/client"):
        control.resolve_target(plan, "ghost")


def test_status_of_a_lab_that_is_not_up(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="lab 'none' is not up"):
        control.status("none", state_root=str(tmp_path))


ROUTE = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "HTTPRoute",
    "metadata": {"name": "web-split", "namespace": "default"},
    "spec": {
        "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
        "rules": [{"backendRefs": [{"name": "web", "port": 80}]}],
    },
}


def test_apply_and_delete_routes_beside_policies(recorded: str) -> None:
    labdir = LabDir("unit", recorded)
    control.apply("unit", [ROUTE, POLICY], state_root=recorded)
    control.apply("unit", [ROUTE], state_root=recorded)
    doc = labdir.read_cluster()
    assert [r.key for r in doc.routes] == [("HTTPRoute", "default", "web-split")]
    assert [p.key for p in doc.policies] == [("PeerAuthentication", "default", "strict")]
    on_tcp = {
        **ROUTE,
        "spec": {
            **ROUTE["spec"],
            "parentRefs": [{"group": "", "kind": "Service", "name": "server"}],
        },
    }
    with pytest.raises(
        DocumentError, match=r"document 1 \(HTTPRoute .*spec\.parentRefs.*appProtocol"
    ):
        control.apply("unit", [on_tcp], state_root=recorded)
    control.delete("unit", [ROUTE], state_root=recorded)
    assert labdir.read_cluster().routes == ()
    with pytest.raises(LabError, match="HTTPRoute default/web-split not found"):
        control.delete("unit", [ROUTE], state_root=recorded)


def _service(name: str, version: str, port: dict[str, object]) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": {"app": "server", "version": version}, "ports": [port]},
    }


def test_apply_creates_and_replaces_services_for_route_backends(recorded: str) -> None:
    labdir = LabDir("unit", recorded)
    http = {"port": 80, "targetPort": 9080, "name": "http", "appProtocol": "http"}
    v1, v2 = _service("web-v1", "v1", http), _service("web-v2", "v2", http)
    split = {
        **ROUTE,
        "spec": {
            **ROUTE["spec"],
            "rules": [{"backendRefs": [{"name": "web-v1", "port": 80}]}],
        },
    }
    created = control.apply("unit", [v1, v2, split], state_root=recorded)
    vips = {s.name: s.cluster_ip for s in labdir.read_cluster().services}
    assert None not in vips.values() and len(set(vips.values())) == len(vips)  # dialable, unique
    # As kubectl apply says it, with the VIP the lab gave each new Service (its clients dial it)
    assert created == [
        f"Service default/web-v1 created (clusterIP {vips['web-v1']})",
        f"Service default/web-v2 created (clusterIP {vips['web-v2']})",
        "HTTPRoute default/web-split created",
    ]
    again = control.apply(
        "unit", [split, _service("web-v2", "v2", {**http, "port": 81})], state_root=recorded
    )
    assert again == [
        "HTTPRoute default/web-split unchanged",
        f"Service default/web-v2 configured (clusterIP {vips['web-v2']})",
    ]
    doc = labdir.read_cluster()
    services = {s.name: s for s in doc.services}
    assert {"server", "web", "web-v1", "web-v2"} <= set(services)
    assert [p.port for p in services["web-v2"].ports] == [81]  # replaced, not added twice
    assert services["web-v2"].cluster_ip == vips["web-v2"]  # and kept its VIP
    status = control.status("unit", state_root=recorded)["services"]
    assert {s["name"]: s["clusterIP"] for s in status} == vips
    assert [r.key for r in doc.routes] == [("HTTPRoute", "default", "web-split")]
    # The server pods can be told apart (default topology): each version selects one.
    endpoints = {s.name: s.endpoints for s in doc.to_state().services}
    assert len(endpoints["web-v1"]) == len(endpoints["web-v2"]) == 1
    with pytest.raises(DocumentError, match=r"document 1 \(Service default/web-v3\): spec\.ports"):
        control.apply("unit", [_service("web-v3", "v3", {"port": 0})], state_root=recorded)
    assert control.delete("unit", [split, v1, v2], state_root=recorded) == [
        "HTTPRoute default/web-split deleted",
        "Service default/web-v1 deleted",
        "Service default/web-v2 deleted",
    ]
    assert {s.name for s in labdir.read_cluster().services} == {"server", "web", "grpc"}
    with pytest.raises(LabError, match="Service default/web-v1 not found"):
        control.delete("unit", [v1], state_root=recorded)


@pytest.mark.parametrize("target", ["client", "ca", "node3"])
def test_lab_status_node_refuses_what_is_not_a_node(
    target: str,
    recorded: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A pod or the CA has no agent: the answer names the nodes, not an unreachable admin API."""
    load = control.load
    monkeypatch.setattr(control, "load", lambda lab: load(lab, state_root=recorded))
    assert main(["lab", "status", "--name", "unit", "--node", target]) == 1
    assert f"no node '{target}' in lab unit; nodes: node1, node2" in capsys.readouterr().err


def test_apply_warns_of_an_app_protocol_one_letter_from_http(lab_apply: LabApply) -> None:
    """Kubernetes allows any appProtocol, so the Service is applied; but the port is opaque TCP,
    and an L7 policy or route meant for it would silently not apply: a warning says so."""
    manifest, out, err = lab_apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web-h, namespace: default}\n"
        "spec: {selector: {app: server}, ports: [{port: 80, appProtocol: mysql},"
        " {port: 81, appProtocol: https}, {port: 82, appProtocol: http3}]}\n"
    )
    assert out.startswith("Service default/web-h created (clusterIP ")
    assert err == (
        f"nodemesh lab: warning: {manifest}: document 1 (Service default/web-h): "
        "spec.ports[2].appProtocol: 'http3' is not a protocol nodemesh reads (http, http2, "
        "kubernetes.io/h2c, grpc), so the port is opaque TCP: no L7 policy, route or request "
        "metrics apply on it (did you mean http?)\n"
    )


def test_apply_warns_of_a_policy_that_selects_no_pod_or_targets_no_service(
    lab_apply: LabApply,
) -> None:
    """Applied (the pod or Service may come later), with a warning naming the near miss: a
    typo in a selector otherwise leaves the policy silently applying to nothing."""
    manifest, out, err = lab_apply(
        "apiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\n"
        "metadata: {name: deny-all, namespace: default}\n"
        "spec: {selector: {matchLabels: {app: srever}}, action: DENY, rules: [{}]}\n---\n"
        "apiVersion: nodemesh.io/v1alpha1\nkind: TrafficPolicy\n"
        "metadata: {name: rr, namespace: default}\n"
        "spec: {targetRef: {kind: Service, name: wbe}, loadBalancer: {type: ROUND_ROBIN}}\n"
    )
    assert out == "AuthorizationPolicy default/deny-all created\nTrafficPolicy default/rr created\n"
    assert err.splitlines() == [
        f"nodemesh lab: warning: {manifest}: document 1 (AuthorizationPolicy default/deny-all): "
        "spec.selector.matchLabels: app=srever selects no pod in namespace default (did you "
        "mean app=server?); the policy applies to none until one matches",
        f"nodemesh lab: warning: {manifest}: document 2 (TrafficPolicy default/rr): "
        "spec.targetRef: no Service default/wbe; did you mean web? Services in default: grpc, "
        "server, web; the policy applies to none until it exists",
    ]
