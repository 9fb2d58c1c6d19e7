"""Kubernetes objects (raw JSON dicts) to state objects: what the kube source keeps, and why.

Sans-IO: no client, no threads, so every rule is tested with plain dicts. The kube source parses
watch events with ``json.loads`` and hands the dicts here, never building the client's model
classes, which would cost several times the CPU and memory at 10,000 pods for fields the mesh
never reads. A pod keeps only what ``Workload`` holds.

Rules (issue 10):
- a pod is meshed when its namespace has label ``nodemesh.io/mesh=enabled`` or it has the
  annotation ``nodemesh.io/mesh: enabled``; ``disabled`` opts it out (derived in
  ``Snapshot.is_meshed``); host-network pods are never meshed (they are left out entirely);
  a pod without an IP is pending (kept, with no IPs); a finished pod (Succeeded/Failed) is gone,
  because its IP may already belong to a new pod;
- an object with a value the mesh cannot interpret raises ``InvalidObject`` (reason + message);
  the source then keeps the previous valid version and reports it, rather than guessing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from agent.policy.schema import API_VERSION, PolicyError, validate_policy
from agent.sources.document import parse_port_list
from agent.state.model import (
    EXCLUDE_INBOUND_ANNOTATION,
    EXCLUDE_OUTBOUND_ANNOTATION,
    HTTP_PORTS_ANNOTATION,
    MESH_ANNOTATION,
    Endpoint,
    Namespace,
    PolicyObject,
    RouteObject,
    Service,
    ServicePort,
    Workload,
    frozen_map,
)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
FINISHED_PHASES = ("Succeeded", "Failed")

Raw = Mapping[str, Any]
T = TypeVar("T")


class InvalidObject(ValueError):
    """An object the mesh refuses; ``reason`` is a CamelCase Event/condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def guarded(convert: Callable[[Raw], T], obj: Raw) -> T:
    """Run one conversion; an object of an unexpected shape (a list where a mapping belongs, a
    missing name) becomes ``InvalidObject`` too, so one odd object cannot stall a whole watch."""
    try:
        return convert(obj)
    except InvalidObject:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InvalidObject("MalformedObject", f"cannot read it: {type(e).__name__}: {e}") from e


def _meta(obj: Raw) -> Raw:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def object_ref(obj: Raw) -> str:
    """``kind namespace/name`` for log lines."""
    meta = _meta(obj)
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind', 'object')} {where}{meta.get('name', '?')}"


def _ports_annotation(annotations: Raw, key: str) -> frozenset[int]:
    value = annotations.get(key)
    if value is None:
        return frozenset()
    try:
        return parse_port_list(str(value))
    except ValueError as e:
        raise InvalidObject("InvalidAnnotation", f"annotation {key}: {e}") from e


def pod_ips(obj: Raw) -> tuple[str, ...]:
    status = obj.get("status") or {}
    ips = tuple(p["ip"] for p in status.get("podIPs") or () if p.get("ip"))
    if not ips and status.get("podIP"):
        ips = (status["podIP"],)
    return ips


def workload_of(obj: Raw) -> Workload | None:
    """The pod as a ``Workload``; ``None`` when the mesh ignores it (host network, finished)."""
    meta, spec = _meta(obj), obj.get("spec") or {}
    status = obj.get("status") or {}
    if spec.get("hostNetwork") or status.get("phase") in FINISHED_PHASES:
        return None
    annotations = meta.get("annotations") or {}
    mesh = annotations.get(MESH_ANNOTATION)
    if mesh is not None and mesh not in ("enabled", "disabled"):
        raise InvalidObject(
            "InvalidAnnotation",
            f"annotation {MESH_ANNOTATION}: {mesh!r} is not allowed; use enabled or disabled",
        )
    return Workload(
        uid=meta["uid"],
        name=meta["name"],
        namespace=meta["namespace"],
        service_account=spec.get("serviceAccountName") or "default",
        node=spec.get("nodeName") or "",
        ips=pod_ips(obj),
        labels=frozen_map(meta.get("labels")),
        mesh_annotation=mesh,
        exclude_outbound_ports=_ports_annotation(annotations, EXCLUDE_OUTBOUND_ANNOTATION),
        exclude_inbound_ports=_ports_annotation(annotations, EXCLUDE_INBOUND_ANNOTATION),
        http_ports=_ports_annotation(annotations, HTTP_PORTS_ANNOTATION),
    )


def namespace_of(obj: Raw) -> Namespace:
    meta = _meta(obj)
    return Namespace(name=meta["name"], labels=frozen_map(meta.get("labels")))


def _service_port(port: Raw) -> ServicePort:
    target = port.get("targetPort", port["port"])
    # A named targetPort resolves per endpoint through the EndpointSlice's ports (by port
    # name); 0 tells readers to use Endpoint.ports.
    return ServicePort(
        port=int(port["port"]),
        target_port=target if isinstance(target, int) else 0,
        name=port.get("name") or "",
        protocol=port.get("protocol") or "TCP",
        app_protocol=str(port.get("appProtocol") or ""),
    )


def service_of(obj: Raw, endpoints: Iterable[Endpoint] = ()) -> Service:
    """The Service with the endpoints its EndpointSlices listed (the source joins them)."""
    meta, spec = _meta(obj), obj.get("spec") or {}
    ips = [ip for ip in spec.get("clusterIPs") or [spec.get("clusterIP")] if ip and ip != "None"]
    try:
        ports = tuple(_service_port(p) for p in spec.get("ports") or ())
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidObject("InvalidPorts", f"spec.ports cannot be read: {e!r}") from e
    selector = spec.get("selector")
    return Service(
        name=meta["name"],
        namespace=meta["namespace"],
        cluster_ips=tuple(ips),
        ports=ports,
        selector=frozen_map(selector) if selector is not None else None,
        endpoints=tuple(sorted(endpoints, key=lambda e: e.ip)),
    )


def slice_service(obj: Raw) -> tuple[str, str] | None:
    """(namespace, service name) an EndpointSlice belongs to, or ``None`` if it names none."""
    meta = _meta(obj)
    name = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    return (meta["namespace"], name) if name else None


def slice_endpoints(obj: Raw) -> tuple[Endpoint, ...]:
    """One ``Endpoint`` per address; not-ready endpoints are kept, marked ``ready=False``."""
    ports = MappingProxyType(
        {p.get("name") or "": int(p["port"]) for p in obj.get("ports") or () if "port" in p}
    )
    out = []
    for ep in obj.get("endpoints") or ():
        ref = ep.get("targetRef") or {}
        uid = ref.get("uid") if ref.get("kind") == "Pod" else None
        ready = (ep.get("conditions") or {}).get("ready")
        for ip in ep.get("addresses") or ():
            out.append(Endpoint(ip=ip, workload_uid=uid, ready=ready is not False, ports=ports))
    return tuple(out)


def fail_closed_stand_in(obj: Raw) -> PolicyObject | None:
    """What enforces an AuthorizationPolicy the mesh refuses and has no valid version of.

    Dropping it would fail open: an ALLOW policy that matched nothing (``from: []`` before
    ``minItems`` existed) denied everything else to its workloads, and without it they admit
    anyone. So, as ztunnel does with rules it cannot enforce, the refused policy is replaced by
    the policy that denies at least as much: an ALLOW without rules (nothing is allowed by it,
    so only other ALLOW policies admit traffic) for ALLOW and anything unknown, a DENY of every
    request for DENY. Its selector is kept when it is readable, else the stand-in covers the
    whole namespace (more, never less). AUDIT decides nothing, so nothing stands in for it.
    The object's dry-run annotation is honoured when readable. ``None`` for other kinds.
    """
    meta, spec = _meta(obj), obj.get("spec")
    if obj.get("kind") != "AuthorizationPolicy":
        return None
    spec = spec if isinstance(spec, Mapping) else {}
    action = spec.get("action", "ALLOW")
    if action == "AUDIT":
        return None
    stand_in: dict[str, Any] = (
        {"action": "DENY", "rules": [{}]} if action == "DENY" else {"action": "ALLOW"}
    )
    metadata: dict[str, Any] = {
        k: meta[k] for k in ("name", "namespace", "annotations") if k in meta
    }
    selector = spec.get("selector")
    attempts = [{**stand_in, "selector": selector}] if selector is not None else []
    attempts.append(stand_in)
    for candidate in attempts:
        for meta_try in (metadata, {**metadata, "annotations": {}}):
            manifest = {
                "apiVersion": API_VERSION,
                "kind": "AuthorizationPolicy",
                "metadata": meta_try,
                "spec": candidate,
            }
            try:
                return validate_policy(manifest, path=object_ref(obj))
            except PolicyError:
                continue
    return None


def policy_of(obj: Raw) -> PolicyObject:
    """Validate a nodemesh CRD object as the API server should have (defaults applied)."""
    try:
        return validate_policy(obj, path=object_ref(obj))
    except PolicyError as e:
        raise InvalidObject("InvalidSpec", str(e)) from e


def route_of(kind: str, obj: Raw) -> RouteObject:
    """A Gateway API route as the state keeps it: the spec as written, checked later.

    The spec is compiled against the Services of the snapshot (``agent.policy.routes``), not
    here, because a route's validity depends on them; only a spec that is not a mapping at all
    is refused here. List items carry no ``kind``, so the watching handler supplies it.
    """
    meta = obj["metadata"]
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise InvalidObject("MalformedObject", "spec must be a mapping")
    return RouteObject(
        kind,
        meta["namespace"],
        meta["name"],
        MappingProxyType(dict(spec)),
        generation=int(meta.get("generation") or 0),
        uid=str(meta.get("uid") or ""),
        created=str(meta.get("creationTimestamp") or ""),
    )
