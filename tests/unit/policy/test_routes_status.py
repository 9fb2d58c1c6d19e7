"""Per-parent verdicts and ``status.parents``: what nodemesh writes, and that it writes once."""

from __future__ import annotations

from typing import Any

from agent.policy.routes import CONTROLLER_NAME, RouteTable, merged_parents
from agent.policy.routes.parents import ParentVerdict
from tests.unit.policy.routes_fixtures import NS, backend, mesh_services, route, snapshot, svc

NOW = "2026-12-06T02:00:00Z"
LATER = "2026-12-06T03:00:00Z"


def _verdicts(services: list[Any], r: Any) -> tuple[ParentVerdict, ...]:
    return RouteTable.build(snapshot(services, [r])).verdicts[r.key]


def _conditions(v: ParentVerdict) -> tuple[tuple[bool, str], tuple[bool, str]]:
    return (v.accepted.status, v.accepted.reason), (v.resolved.status, v.resolved.reason)


def test_accepted_and_resolved() -> None:
    (v,) = _verdicts(mesh_services(), route("r", [{"backendRefs": [backend("echo-v1")]}]))
    assert _conditions(v) == ((True, "Accepted"), (True, "ResolvedRefs"))
    assert v.ports == (80,)


def test_backend_not_found_keeps_the_route_accepted() -> None:
    (v,) = _verdicts(mesh_services(), route("r", [{"backendRefs": [backend("nope")]}]))
    assert _conditions(v) == ((True, "Accepted"), (False, "BackendNotFound"))
    assert f"Service {NS}/nope, which does not exist" in v.resolved.message


def test_invalid_kind() -> None:
    ref = {"group": "multicluster.x-k8s.io", "kind": "ServiceImport", "name": "echo", "port": 80}
    (v,) = _verdicts(mesh_services(), route("r", [{"backendRefs": [ref]}]))
    assert _conditions(v) == ((True, "Accepted"), (False, "InvalidKind"))


def test_refused_route_is_not_programmed() -> None:
    bad = route(
        "r",
        [
            {
                "filters": [
                    {
                        "type": "ExtensionRef",
                        "extensionRef": {"group": "example.com", "kind": "Other", "name": "x"},
                    }
                ]
            }
        ],
    )
    table = RouteTable.build(snapshot(mesh_services(), [bad]))
    (v,) = table.verdicts[bad.key]
    assert _conditions(v) == ((False, "UnsupportedValue"), (False, "UnsupportedValue"))
    assert "spec.rules[0].filters[0].extensionRef" in v.accepted.message
    assert not table.routed((NS, "echo"), 80)


def test_unknown_parent_service_and_port() -> None:
    gone = route("r", [{}], parents=[{"group": "", "kind": "Service", "name": "ghost"}])
    (v,) = _verdicts(mesh_services(), gone)
    assert _conditions(v)[0] == (False, "NoMatchingParent")
    wrong_port = route(
        "r", [{}], parents=[{"group": "", "kind": "Service", "name": "echo", "port": 81}]
    )
    (v,) = _verdicts(mesh_services(), wrong_port)
    assert (v.accepted.reason, v.accepted.message) == (
        "NoMatchingParent",
        f"Service {NS}/echo has no port 81",
    )


def test_port_without_http_declaration_says_why_and_stays_l4() -> None:
    services = [svc("echo", (80, "tcp-web")), svc("echo-v1")]
    r = route("r", [{"backendRefs": [backend("echo-v1")]}])
    table = RouteTable.build(snapshot(services, [r]))
    (v,) = table.verdicts[r.key]
    assert _conditions(v)[0] == (False, "UnsupportedValue")
    assert "port(s) 80" in v.accepted.message and "keep L4 behaviour" in v.accepted.message
    assert "appProtocol" in v.accepted.message
    assert not table.routed((NS, "echo"), 80)


def test_partly_declared_service_is_accepted_on_its_http_ports() -> None:
    services = [svc("echo", (80, "http"), (5432, "postgres")), svc("echo-v1")]
    r = route("r", [{}], parents=[{"group": "", "kind": "Service", "name": "echo"}])
    (v,) = _verdicts(services, r)
    assert v.accepted.status and v.ports == (80,)
    assert "port(s) 5432" in v.accepted.message


def test_status_parents_shape_keeps_foreign_entries_and_is_written_once() -> None:
    r = route("r", [{"backendRefs": [backend("echo-v1")]}])
    verdicts = _verdicts(mesh_services(), r)
    foreign = {
        "parentRef": {"name": "gw"},
        "controllerName": "example.com/gateway",
        "conditions": [],
    }
    parents = merged_parents([foreign], verdicts, route_namespace=NS, generation=3, now=NOW)
    assert parents is not None
    assert parents[0] == foreign
    ours = parents[1]
    assert ours["parentRef"] == {"group": "", "kind": "Service", "name": "echo", "port": 80}
    assert ours["controllerName"] == CONTROLLER_NAME == "nodemesh.io/mesh-controller"
    assert [
        (c["type"], c["status"], c["reason"], c["observedGeneration"]) for c in ours["conditions"]
    ] == [
        ("Accepted", "True", "Accepted", 3),
        ("ResolvedRefs", "True", "ResolvedRefs", 3),
    ]
    # A second agent (or a resync) computing the same finds nothing to write.
    assert merged_parents(parents, verdicts, route_namespace=NS, generation=3, now=LATER) is None
    # A new generation is written, and an unchanged status keeps its transition time.
    bumped = merged_parents(parents, verdicts, route_namespace=NS, generation=4, now=LATER)
    assert bumped is not None
    assert {c["lastTransitionTime"] for c in bumped[1]["conditions"]} == {NOW}


def test_status_change_moves_the_transition_time() -> None:
    good = route("r", [{"backendRefs": [backend("echo-v1")]}])
    parents = merged_parents(
        [], _verdicts(mesh_services(), good), route_namespace=NS, generation=1, now=NOW
    )
    assert parents is not None
    missing = route("r", [{"backendRefs": [backend("gone")]}])
    after = merged_parents(
        parents, _verdicts(mesh_services(), missing), route_namespace=NS, generation=2, now=LATER
    )
    assert after is not None
    accepted, resolved = after[0]["conditions"]
    assert (accepted["lastTransitionTime"], resolved["lastTransitionTime"]) == (NOW, LATER)
    assert resolved["reason"] == "BackendNotFound"
