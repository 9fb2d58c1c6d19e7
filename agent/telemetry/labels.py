"""Istio's standard TCP metric labels for one connection record (pure: record + snapshot in).

Istio dashboards group by these labels, so their names and meanings follow Istio's (and
ztunnel's) conventions:

* ``reporter`` is ``source`` for connections this node's proxy opened for a local client
  (outbound) and ``destination`` for ones it delivered to a local pod (inbound);
* a workload's name is its canonical name (label ``service.istio.io/canonical-name``, then
  ``app.kubernetes.io/name``, then ``app``), else the pod name: pods of one Deployment share a
  series, which keeps the cardinality at the number of workloads, not of pods;
* ``destination_service`` is the Service's hostname when the client dialed a Service address;
  at the destination, the Service the source node named on the CONNECT (``record.service``,
  checked to select the pod); else the Service whose endpoints hold the pod address dialed;
* ``response_flags`` follow ztunnel: ``-`` (none), ``DENY`` (authorization or PeerAuthentication
  refused it), ``CONNECT`` (any other failure to establish or relay it);
* each side's canonical service is its workload name (Istio's order of labels above);
  canonical revision ``service.istio.io/canonical-revision``, then ``app.kubernetes.io/version``,
  then ``version``, else ``latest``; ``*_app`` label ``app``, then ``app.kubernetes.io/name``;
  ``*_version`` label ``version``, then ``app.kubernetes.io/version``; ``*_cluster`` Istio's
  default cluster id ``Kubernetes`` (``CLUSTER_ID``) for a peer in the state or with a mesh
  principal; ``destination_service_name``/``_namespace`` the parts of ``destination_service``;
* anything not known is ``unknown``. No label carries a port, an address or a connection id.

Every label is a function of the two workloads and the Service (or of what a principal tells),
so the pods of one workload still share a series; pods of one canonical name with two versions
(or revisions) are two series, as in Istio, where Kiali's versioned graph tells them apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from agent.state import Snapshot, Workload
from agent.telemetry.records import OUTBOUND, SECURITY_MTLS, ConnectionRecord

UNKNOWN = "unknown"
HBONE = "hbone"
CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
APP_LABELS = ("app", "app.kubernetes.io/name")
DENY_REASONS = frozenset({"policy_denied", "policy_denied_stream", "strict_mtls"})

# Istio's default cluster id (``global.multiCluster.clusterName`` unset; ztunnel's
# ``CLUSTER_ID`` default): nodemesh meshes one cluster and has no setting that names it.
CLUSTER_ID = "Kubernetes"
CANONICAL_REVISION_LABELS = (
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
)
VERSION_LABELS = ("version", "app.kubernetes.io/version")
LATEST = "latest"


class TcpLabels(NamedTuple):
    """Istio's standard labels, in ztunnel's order (``CommonTrafficLabels``) but for the last
    three, kept where nodemesh had them."""

    reporter: str
    source_workload: str
    source_canonical_service: str
    source_canonical_revision: str
    source_workload_namespace: str
    source_principal: str
    source_app: str
    source_version: str
    source_cluster: str
    destination_service: str
    destination_service_namespace: str
    destination_service_name: str
    destination_workload: str
    destination_canonical_service: str
    destination_canonical_revision: str
    destination_workload_namespace: str
    destination_principal: str
    destination_app: str
    destination_version: str
    destination_cluster: str
    connection_security_policy: str
    response_flags: str
    request_protocol: str


LABEL_NAMES: tuple[str, ...] = TcpLabels._fields


class _Peer(NamedTuple):
    """One side's workload-derived labels (``_peer``), in ``TcpLabels``' order."""

    workload: str
    canonical_service: str
    canonical_revision: str
    namespace: str
    principal: str
    app: str
    version: str
    cluster: str


def host_of(address: str) -> str:
    """The IP of a record address: ``ip:port``, ``[v6]:port``, or a bare IPv4/IPv6 address."""
    if address.startswith("["):
        return address[1:].partition("]")[0]
    return address.partition(":")[0] if address.count(":") == 1 else address


def workload_name(workload: Workload) -> str:
    for key in CANONICAL_NAME_LABELS:
        if value := workload.labels.get(key):
            return value
    return workload.name


def _first_label(workload: Workload, keys: tuple[str, ...], default: str) -> str:
    return next((v for k in keys if (v := workload.labels.get(k))), default)


def app_of(workload: Workload) -> str:
    return _first_label(workload, APP_LABELS, UNKNOWN)


def canonical_revision(workload: Workload) -> str:
    """Istio's canonical revision: ``service.istio.io/canonical-revision``, then
    ``app.kubernetes.io/version``, then ``version``, else ``latest``."""
    return _first_label(workload, CANONICAL_REVISION_LABELS, LATEST)


def version_of(workload: Workload) -> str:
    return _first_label(workload, VERSION_LABELS, UNKNOWN)


def response_flags(failure: str) -> str:
    if not failure:
        return "-"
    return "DENY" if failure in DENY_REASONS else "CONNECT"


def security_policy(record: ConnectionRecord) -> str:
    """``mutual_tls`` for HBONE connections: an outbound one is labelled when it opens, before
    its tunnel exists, and carries no byte outside the tunnel afterwards."""
    return "mutual_tls" if record.security == SECURITY_MTLS or record.path == HBONE else "none"


def namespace_of_principal(principal: str | None) -> str:
    """``spiffe://td/ns/<ns>/sa/<sa>`` → ``<ns>``: a remote peer's namespace even when its pod
    is not in this node's state."""
    parts = (principal or "").split("/")
    return parts[4] if len(parts) >= 7 and parts[3] == "ns" else UNKNOWN


def endpoint_services(snap: Snapshot) -> Mapping[str, str]:
    """Endpoint ``ip:port`` → hostname of the Service whose port targets it, and endpoint IP →
    a Service it backs (the first by name, for a port no Service targets): built once per state
    version by the caller, so labelling a connection stays a few dictionary lookups. The port
    matters when several Services select one pod (the lab's ``server``, ``web`` and ``grpc``)."""
    out: dict[str, str] = {}
    for key in sorted(snap.services):
        svc = snap.services[key]
        for endpoint in svc.endpoints:
            out.setdefault(endpoint.ip, svc.hostname())
            for port in svc.ports:
                target = port.target_port or endpoint.ports.get(port.name, 0)
                if target:
                    out.setdefault(f"{endpoint.ip}:{target}", svc.hostname())
    return out


def service_name_namespace(hostname: str) -> tuple[str, str]:
    """``name.ns.svc.<domain>`` → ``(name, ns)``: every hostname the labels carry is a
    Service's (``Service.hostname``); anything else keeps its text as the name."""
    parts = hostname.split(".", 3)
    if len(parts) >= 3 and parts[2] == "svc":
        return parts[0], parts[1]
    return hostname, UNKNOWN


def _peer(workload: Workload | None, principal: str | None) -> _Peer:
    """One side's labels from its workload; for a peer not in the state, what its principal
    tells (its namespace, and so that it is of this cluster's mesh), else ``unknown``."""
    if workload is None:
        namespace = namespace_of_principal(principal)
        return _Peer(
            UNKNOWN,
            UNKNOWN,
            UNKNOWN,
            namespace,
            principal or UNKNOWN,
            UNKNOWN,
            UNKNOWN,
            UNKNOWN if namespace == UNKNOWN else CLUSTER_ID,
        )
    name = workload_name(workload)
    return _Peer(
        name,
        name,  # Istio's canonical service: the same labels, then the workload's name
        canonical_revision(workload),
        workload.namespace,
        principal or UNKNOWN,
        app_of(workload),
        version_of(workload),
        CLUSTER_ID,
    )


def tcp_labels(
    record: ConnectionRecord, snap: Snapshot, by_endpoint: Mapping[str, str]
) -> TcpLabels:
    """The label values of ``record``; ``by_endpoint`` is ``endpoint_services(snap)``."""
    src = snap.workload_by_ip.get(host_of(record.source))
    dst_ip = host_of(record.destination)
    upstream_ip = host_of(record.upstream) if record.upstream else dst_ip
    dst = snap.workload_by_ip.get(upstream_ip) or snap.workload_by_ip.get(dst_ip)
    vip = snap.service_by_ip.get(dst_ip)
    upstream = record.upstream or record.destination
    service = (
        vip.hostname()
        if vip
        else record.service or by_endpoint.get(upstream) or by_endpoint.get(upstream_ip, UNKNOWN)
    )
    name, namespace = service_name_namespace(service) if service != UNKNOWN else (UNKNOWN, UNKNOWN)
    return TcpLabels(
        "source" if record.direction == OUTBOUND else "destination",
        *_peer(src, record.source_identity),
        service,
        namespace,
        name,
        *_peer(dst, record.destination_identity),
        security_policy(record),
        response_flags(record.failure),
        "tcp",
    )
