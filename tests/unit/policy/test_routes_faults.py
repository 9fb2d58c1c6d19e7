"""HTTPFault: validation, compilation, the per-request decision, and the ExtensionRef filter."""

from __future__ import annotations

import random
from typing import Any

import pytest

from agent.policy.routes import RouteTable, compile_route
from agent.policy.routes.compile import Rejected
from agent.policy.routes.faults import FaultDecision, HttpFault, compile_fault, decide
from agent.policy.routes.model import FaultRef, Route
from agent.policy.schema import PolicyError, validate_policy
from agent.state import PolicyObject, StateStore
from tests.unit.policy.routes_fixtures import NS, mesh_services, route, snapshot


def _fault(**spec: Any) -> PolicyObject:
    manifest = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "HTTPFault",
        "metadata": {"name": "chaos", "namespace": NS},
        "spec": spec,
    }
    return validate_policy(manifest, path="t")


def _ext(name: str = "chaos") -> dict[str, Any]:
    ref = {"group": "nodemesh.io", "kind": "HTTPFault", "name": name}
    return {"filters": [{"type": "ExtensionRef", "extensionRef": ref}]}


class Rolls(random.Random):
    """A random source that returns the given values in turn."""

    def __init__(self, *values: float) -> None:
        super().__init__()
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


ABORT_AND_DELAY = {
    "abort": {"httpStatus": 503, "percentage": 20},
    "delay": {"fixedDelay": "100ms", "percentage": 10},
}


def test_an_http_fault_compiles_to_seconds_and_lower_case_headers() -> None:
    fault = compile_fault(_fault(**ABORT_AND_DELAY, headers=[{"name": "X-Chaos", "value": "on"}]))
    assert fault == HttpFault(f"{NS}/chaos", 20.0, 503, None, 10.0, 0.1, (("x-chaos", "on"),))


@pytest.mark.parametrize(
    ("spec", "where", "message"),
    [
        ({}, r"t\.spec", "needs a delay or an abort"),
        ({"abort": {"percentage": 5}}, r"t\.spec\.abort", "exactly one of httpStatus"),
        (
            {"abort": {"percentage": 5, "httpStatus": 503, "grpcStatus": 14}},
            r"t\.spec\.abort",
            "exactly one of httpStatus",
        ),
        ({"abort": {"percentage": 101, "httpStatus": 503}}, "percentage", "above the maximum"),
        ({"abort": {"percentage": 1, "httpStatus": 99}}, "httpStatus", "below the minimum"),
        ({"delay": {"percentage": 1, "fixedDelay": "1d"}}, "fixedDelay", "does not match"),
    ],
)
def test_invalid_faults_are_refused_naming_the_field(
    spec: dict[str, Any], where: str, message: str
) -> None:
    with pytest.raises(PolicyError, match=f"{where}.*{message}"):
        _fault(**spec)


def test_the_abort_is_drawn_first_and_an_aborted_request_is_not_delayed() -> None:
    fault = compile_fault(_fault(**ABORT_AND_DELAY))
    assert decide(fault, [], Rolls(0.19)) == FaultDecision(abort_status=503)
    assert decide(fault, [], Rolls(0.20, 0.09)) == FaultDecision(delay=0.1)
    assert decide(fault, [], Rolls(0.20, 0.10)) == FaultDecision()


def test_a_header_condition_leaves_other_requests_alone() -> None:
    fault = compile_fault(
        _fault(
            abort={"httpStatus": 418, "percentage": 100},
            headers=[{"name": "x-chaos", "value": "on"}],
        )
    )
    assert decide(fault, [("x-chaos", "off")], Rolls()) == FaultDecision()
    assert decide(fault, [("x-chaos", "on")], Rolls(0.99)) == FaultDecision(abort_status=418)


def test_an_extension_ref_resolves_to_the_http_fault_of_the_routes_namespace() -> None:
    fault = compile_fault(_fault(**ABORT_AND_DELAY))
    compiled = compile_route(route("r", [_ext()]), {}, {(NS, "chaos"): fault})
    assert isinstance(compiled, Route) and not compiled.unresolved
    assert compiled.rules[0].filters.fault == FaultRef(NS, "chaos", fault)


def test_a_missing_http_fault_leaves_the_route_accepted_with_resolved_refs_false() -> None:
    table = RouteTable.build(snapshot(mesh_services(), [route("r", [_ext("ghost")])]))
    compiled = table.compiled[("HTTPRoute", NS, "r")]
    assert isinstance(compiled, Route)
    assert compiled.rules[0].filters.fault == FaultRef(NS, "ghost", None)
    (verdict,) = table.verdicts[compiled.key]
    assert verdict.accepted.status
    assert (verdict.resolved.status, verdict.resolved.reason) == (
        False,
        "FilterNotFound",
    )
    assert f"HTTPFault {NS}/ghost, which does not exist" in verdict.resolved.message


def test_an_http_fault_in_the_snapshot_resolves_the_filter() -> None:
    store = StateStore()
    with store.update() as txn:
        for s in mesh_services():
            txn.put_service(s)
        txn.put_route(route("r", [_ext()]))
        txn.put_policy(_fault(**ABORT_AND_DELAY))
    table = RouteTable.build(store.snapshot())
    (verdict,) = table.verdicts[("HTTPRoute", NS, "r")]
    assert verdict.resolved.status


def test_a_grpc_status_abort_on_an_http_route_refuses_the_route() -> None:
    fault = compile_fault(_fault(abort={"grpcStatus": 14, "percentage": 50}))
    compiled = compile_route(route("r", [_ext()]), {}, {(NS, "chaos"): fault})
    assert isinstance(compiled, Rejected)
    assert compiled.error.path == "spec.rules[0].filters[0].extensionRef.name"
    assert "use abort.httpStatus" in compiled.error.message


def test_a_grpc_route_takes_an_http_fault_with_a_grpc_status_abort() -> None:
    fault = compile_fault(_fault(abort={"grpcStatus": 14, "percentage": 50}))
    compiled = compile_route(route("g", [_ext()], kind="GRPCRoute"), {}, {(NS, "chaos"): fault})
    assert isinstance(compiled, Route) and not compiled.unresolved
    assert compiled.rules[0].filters.fault == FaultRef(NS, "chaos", fault)
    assert decide(fault, [], Rolls(0.49)) == FaultDecision(abort_grpc_status=14)
    assert decide(fault, [], Rolls(0.50)) == FaultDecision()
