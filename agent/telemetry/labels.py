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
* anything not known is ``unknown``. No label carries a port, an address or a connection id.
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

LABEL_NAMES = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "destination_service",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "connection_security_policy",
    "response_flags",
    "request_protocol",
)


class TcpLabels(NamedTuple):
    reporter: str
    source_workload: str
    source_workload_namespace: str
    source_principal: str
    source_app: str
    destination_service: str
    destination_workload: str
    destination_workload_namespace: str
    destination_principal: str
    connection_security_policy: str
    response_flags: str
    request_protocol: str


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


def app_of(workload: Workload) -> str:
    return next((v for k in APP_LABELS if (v := workload.labels.get(k))), UNKNOWN)


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
    return TcpLabels(
        reporter="source" if record.direction == OUTBOUND else "destination",
        source_workload=workload_name(src) if src else UNKNOWN,
        source_workload_namespace=(
            src.namespace if src else namespace_of_principal(record.source_identity)
        ),
        source_principal=record.source_identity or UNKNOWN,
        source_app=app_of(src) if src else UNKNOWN,
        destination_service=service,
        destination_workload=workload_name(dst) if dst else UNKNOWN,
        destination_workload_namespace=(
            dst.namespace if dst else namespace_of_principal(record.destination_identity)
        ),
        destination_principal=record.destination_identity or UNKNOWN,
        connection_security_policy=security_policy(record),
        response_flags=response_flags(record.failure),
        request_protocol="tcp",
    )
