"""Every manifest renders and is valid for a pinned Kubernetes release and for the CRDs.

Kubernetes objects are checked with kubernetes-validate's schemas in strict mode (unknown fields
are errors: the API server would silently drop them). nodemesh's own resources are checked
against the CRDs' openAPIV3Schema as the API server applies it: a structural schema prunes
unknown fields silently, so here an unknown field is an error too (a misspelt policy field would
otherwise vanish on apply and the policy would mean something else). CEL rules
(x-kubernetes-validations) are not evaluated here: agent.policy.schema checks them in Python.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from tests.unit.deploy.manifests import KUBERNETES_VERSION, Obj, find, render

KUSTOMIZATIONS = ["daemonset", "daemonset/samples"]
GROUP = "nodemesh.io"


def structural(schema: Any) -> Any:
    """The CRD schema with pruning turned into rejection (additionalProperties: false)."""
    if isinstance(schema, list):
        return [structural(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: structural(v) for k, v in schema.items()}
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    """(kind, version) -> validator, from the CRDs the base installs."""
    validators = {}
    for crd in (o for o in render("daemonset") if o["kind"] == "CustomResourceDefinition"):
        spec = crd["spec"]
        for version in spec["versions"]:
            schema = structural(version["schema"]["openAPIV3Schema"])
            validators[(spec["names"]["kind"], version["name"])] = jsonschema.Draft7Validator(
                schema
            )
    return validators


def validate_custom(obj: Obj) -> None:
    version = obj["apiVersion"].split("/", 1)[1]
    validator = crd_validators().get((obj["kind"], version))
    assert validator is not None, f"no CRD in daemonset/ serves {obj['kind']} {obj['apiVersion']}"
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(obj)
    ]
    assert not errors, f"{obj['kind']}/{obj['metadata']['name']}: " + "; ".join(errors)


def validate(obj: Obj) -> None:
    if obj["apiVersion"].startswith(f"{GROUP}/"):
        validate_custom(obj)
        return
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(map(str, e.path)) or "<root>"
        raise AssertionError(
            f"{obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes "
            f"{KUBERNETES_VERSION} at {where}: {e.message}"
        ) from e


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_every_object_is_valid(directory: str) -> None:
    objs = render(directory)
    assert objs, f"{directory} rendered no objects"
    for obj in objs:
        validate(obj)


def test_base_installs_the_whole_mesh() -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in render("daemonset")}
    for wanted in [
        ("Namespace", "nodemesh-system"),
        ("CustomResourceDefinition", "authorizationpolicies.nodemesh.io"),
        ("CustomResourceDefinition", "peerauthentications.nodemesh.io"),
        ("CustomResourceDefinition", "trafficpolicies.nodemesh.io"),
        ("CustomResourceDefinition", "ratelimitpolicies.nodemesh.io"),
        ("CustomResourceDefinition", "httpfaults.nodemesh.io"),
        ("DaemonSet", "nodemesh-agent"),
        ("Deployment", "nodemesh-ca"),
        ("Service", "nodemesh-ca"),
        ("PodDisruptionBudget", "nodemesh-ca"),
    ]:
        assert wanted in kinds, f"daemonset/ does not install {wanted[0]} {wanted[1]}"


def test_namespaced_objects_land_in_the_mesh_namespace() -> None:
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    for obj in render("daemonset"):
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"].get("namespace") == "nodemesh-system", obj["metadata"]


def test_samples_cover_every_policy_kind_and_mesh_their_namespace() -> None:
    """One sample of each kind whose CRD the base installs, so a kind added later without an
    example fails here."""
    objs = render("daemonset/samples")
    kinds = {o["kind"] for o in objs if o["apiVersion"].startswith(f"{GROUP}/")}
    crds = [o for o in render("daemonset") if o["kind"] == "CustomResourceDefinition"]
    assert kinds == {crd["spec"]["names"]["kind"] for crd in crds}
    namespace = find(objs, "Namespace", "nodemesh-demo")
    assert namespace["metadata"]["labels"]["nodemesh.io/mesh"] == "enabled"
    assert find(objs, "PeerAuthentication", "strict")["spec"]["mtls"]["mode"] == "STRICT"


def test_schema_check_rejects_a_misspelt_policy_field() -> None:
    # The pruning-as-rejection rule above is what catches this; without it the API server would
    # store the policy without the field.
    policy = copy.deepcopy(find(render("daemonset/samples"), "TrafficPolicy", "server"))
    policy["spec"]["retries"]["atempts"] = 3
    with pytest.raises(AssertionError, match="atempts"):
        validate(policy)


def test_schema_check_rejects_an_unknown_kubernetes_field() -> None:
    agent = copy.deepcopy(find(render("daemonset"), "DaemonSet", "nodemesh-agent"))
    agent["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(AssertionError, match="hostNetwrok"):
        validate(agent)


def test_agent_accepts_the_sample_policies() -> None:
    # The agent's own validator (CRD schemas plus the CEL rules in Python) must take the samples
    # as written, or the smoke test's policies would be rejected by the agent after the API server
    # accepted them.
    from agent.policy.schema import validate_policy

    for obj in render("daemonset/samples"):
        if obj["apiVersion"].startswith(f"{GROUP}/"):
            validate_policy(obj, path=f"daemonset/samples: {obj['kind']}/{obj['metadata']['name']}")


def test_the_agent_programs_the_samples_and_their_route_as_written() -> None:
    """The samples through the code the Kubernetes source runs on what it watches
    (``agent.sources.kubeobjects``: CRD defaults, CEL rules) and the compilers the proxy reads
    (traffic policy, rate limit, route and the HTTPFault its ExtensionRef names), so that an
    example the API server takes is also one the agent honours. The HTTPRoute of
    ``samples/gateway-api`` is checked here, not by kubernetes-validate: its CRD is the Gateway
    API's, which has no schema in this tree."""
    from agent.policy.ratelimit import RateLimit, limits_by_endpoint
    from agent.policy.routes import RouteTable
    from agent.policy.routes.faults import compile_fault
    from agent.policy.routes.model import Route
    from agent.policy.traffic.config import compile_policy
    from agent.sources import kubeobjects as ko
    from agent.state import Endpoint, StateStore

    objs = render("daemonset/samples") + render("daemonset/samples/gateway-api")
    pod = Endpoint("10.244.1.7", "uid-server-0", ports={"http": 8080})  # its EndpointSlice's port
    store = StateStore()
    with store.update() as tx:
        for obj in objs:
            if obj["kind"] == "Service":
                tx.put_service(ko.service_of(obj, [pod]))
            elif obj["apiVersion"].startswith(f"{GROUP}/"):
                tx.put_policy(ko.policy_of(obj))
            elif obj["kind"] == "HTTPRoute":
                tx.put_route(ko.route_of("HTTPRoute", obj))
    snap = store.snapshot()
    server = snap.services[("nodemesh-demo", "server")]
    (traffic,) = snap.policies_of("TrafficPolicy")
    assert compile_policy(traffic, server).retries == 2
    limit = RateLimit("nodemesh-demo/server", server.hostname(), 50, 100, per_identity=True)
    assert limits_by_endpoint(snap) == {(pod.ip, 8080): (limit,)}
    table = RouteTable.build(snap)
    key = ("HTTPRoute", "nodemesh-demo", "server-chaos")
    route = table.compiled[key]
    assert isinstance(route, Route) and not route.unresolved, route
    (verdict,) = table.verdicts[key]
    assert verdict.accepted.status and verdict.resolved.status and verdict.ports == (80,)
    (fault_policy,) = snap.policies_of("HTTPFault")
    fault = route.rules[0].filters.fault
    assert fault is not None and fault.fault == compile_fault(fault_policy)
    assert (fault.fault.abort_status, fault.fault.headers) == (503, (("x-chaos", "on"),))
