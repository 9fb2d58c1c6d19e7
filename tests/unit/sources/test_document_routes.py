"""HTTPRoute/GRPCRoute in the cluster document: accepted whole, or refused naming the field."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from agent.lab.topology import DEFAULT_TOPOLOGY
from agent.policy.routes import RouteAction, RouteTable
from agent.policy.routes.model import HttpRequest
from agent.sources.document import DocumentError, dump_document, parse_document
from agent.state import StateStore


def canary(**rule: Any) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "canary", "namespace": "default"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
            "rules": [
                {
                    "matches": [{"headers": [{"name": "x-canary", "value": "true"}]}],
                    "backendRefs": [{"name": "web", "port": 80}],
                    **rule,
                }
            ],
        },
    }


CHAOS_REF = {"group": "nodemesh.io", "kind": "HTTPFault", "name": "chaos"}
CHAOS = {
    "apiVersion": "nodemesh.io/v1alpha1",
    "kind": "HTTPFault",
    "metadata": {"name": "chaos", "namespace": "default"},
    "spec": {"abort": {"httpStatus": 503, "percentage": 50}},
}


def _doc(*routes: dict[str, Any], policies: tuple[dict[str, Any], ...] = ()) -> str:
    data = yaml.safe_load(DEFAULT_TOPOLOGY)
    data["routes"] = list(routes)
    if policies:
        data["policies"] = list(policies)
    return yaml.safe_dump(data, sort_keys=False)


def test_a_route_naming_a_declared_http_fault_is_accepted() -> None:
    route = canary(filters=[{"type": "ExtensionRef", "extensionRef": CHAOS_REF}])
    doc = parse_document(_doc(route, policies=(CHAOS,)), source="c.yaml")
    assert [p.kind for p in doc.policies] == ["HTTPFault"]
    assert [r.name for r in doc.routes] == ["canary"]


def test_routes_reach_the_state_and_survive_a_round_trip() -> None:
    doc = parse_document(_doc(canary()), source="lab.yaml")
    assert [r.key for r in doc.routes] == [("HTTPRoute", "default", "canary")]
    assert parse_document(dump_document(doc), source="again.yaml") == doc
    store = StateStore()
    state = doc.to_state()
    with store.update() as txn:
        txn.replace("services", state.services)
        txn.replace("routes", state.routes)
    table = RouteTable.build(store.snapshot())
    request = HttpRequest("GET", "/", [("x-canary", "true")])
    decision = table.http(("default", "web"), 80, request, client_namespace="default")
    assert isinstance(decision, RouteAction) and decision.route[2] == "canary"


def test_a_document_without_routes_dumps_as_before() -> None:
    doc = parse_document(DEFAULT_TOPOLOGY, source="lab.yaml")
    assert "routes" not in yaml.safe_load(dump_document(doc))


@pytest.mark.parametrize(
    ("route", "where", "words"),
    [
        (
            canary(matches=[{"path": {"type": "RegularExpression", "value": "(["}}]),
            r"routes\[0\]\.spec\.rules\[0\]\.matches\[0\]\.path\.value",
            "invalid regular expression",
        ),
        (
            canary(
                filters=[
                    {
                        "type": "ExtensionRef",
                        "extensionRef": {"group": "example.com", "kind": "Other", "name": "x"},
                    }
                ]
            ),
            r"routes\[0\]\.spec\.rules\[0\]\.filters\[0\]\.extensionRef",
            "not supported by nodemesh",
        ),
        (
            canary(backendRefs=[{"name": "nowhere", "port": 80}]),
            r"routes\[0\]\.spec",
            "apply the Service with the route, e.g. in the same file, or list it under services",
        ),
        (
            canary(filters=[{"type": "ExtensionRef", "extensionRef": CHAOS_REF}]),
            r"routes\[0\]\.spec",
            "FilterNotFound: .*HTTPFault default/chaos.*apply the HTTPFault with the route, "
            "e.g. in the same file, or list it under policies",
        ),
        (
            {**canary(), "apiVersion": "gateway.networking.k8s.io/v1beta1"},
            r"routes\[0\]\.apiVersion",
            "use gateway.networking.k8s.io/v1",
        ),
        (
            {
                **canary(),
                "spec": {
                    "parentRefs": [{"group": "", "kind": "Service", "name": "server"}],
                    "rules": [{}],
                },
            },
            r"routes\[0\]\.spec\.parentRefs",
            "not declared http.*keep L4 behaviour.*appProtocol",
        ),
        (
            {
                **canary(),
                "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "gone"}]},
            },
            r"routes\[0\]\.spec\.parentRefs",
            "Service default/gone does not exist",
        ),
    ],
)
def test_invalid_routes_refuse_the_document(route: dict[str, Any], where: str, words: str) -> None:
    with pytest.raises(DocumentError, match=f"{where}.*{words}"):
        parse_document(_doc(route), source="lab.yaml")


def test_duplicate_routes_are_refused() -> None:
    with pytest.raises(DocumentError, match="route"):
        parse_document(_doc(canary(), canary()), source="lab.yaml")
