"""Lab planning: from a cluster document to names and addresses, before anything is built.

Why plan first: ``lab up`` writes the plan to the state directory before it creates anything, so
``lab down`` can always find what a crashed ``up`` left behind, and a bad document fails before
the first namespace exists. All names start with ``<lab>-`` and lab names may not contain '-',
so one lab's prefix can never match another lab's objects.

Addressing (identical in every lab: each lab lives in its own namespaces):
node segment 10.100.0.0/24 (node i gets .i+1, the CA .254), pod CIDR of node i 10.244.(i+1).0/24
(pods from .2), service cluster IPs from 10.96.0.10. Interface names are fixed and short
(``eth0`` uplink in a node, ``pv<j>`` host side of pod j, ``eth0`` in a pod, ``sw<i>`` on the
switch), which is possible because every one lives in a namespace of its own lab.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass
from typing import Any

from agent.policy.warnings import unknown_annotation
from agent.sources.document import ClusterDocument, NodeSpec, parse_document

# An unknown ``nodemesh.io/`` pod annotation (``unknown_annotation``) is refused in a topology
# and by ``lab annotate``: nothing older than this lab reads those files, so it can only be a
# typo. In a cluster the agents warn of it instead (an Event on the pod) and mesh the pod.

LAB_NAME = re.compile(r"[a-z][a-z0-9]{0,7}")  # fullmatch: "$" would let "lab\n" through
DEFAULT_LAB = "nm"
SEGMENT = ipaddress.IPv4Network("10.100.0.0/24")
CA_IP = "10.100.0.254"
SERVICE_BASE = ipaddress.IPv4Address("10.96.0.10")
GATEWAY = "169.254.1.1"
UPLINK = "eth0"
PIN_ROOT = "/sys/fs/bpf/nodemesh"
STATE_ROOT = "/run/nodemesh/lab"

# Service ``web`` declares HTTP/1.1 on the server pods' port 9080 (port name and appProtocol),
# a port of its own: the echo port 8080 behind Service ``server`` stays opaque TCP. Service
# ``grpc`` declares gRPC on port 50051, where ``agent.lab.grpcecho`` serves. The server pods
# differ by ``version`` so that a test can put one behind a Service of its own (canary).
DEFAULT_TOPOLOGY = """\
trustDomain: cluster.local
nodes:
  - name: node1
    pods:
      - {name: client, namespace: default, serviceAccount: client,
         labels: {app: client}, annotations: {nodemesh.io/mesh: enabled}}
      - {name: neighbor, namespace: default, serviceAccount: neighbor,
         labels: {app: neighbor}, annotations: {nodemesh.io/mesh: enabled}}
      - {name: outsider, namespace: default, serviceAccount: outsider,
         labels: {app: outsider}, annotations: {}}
  - name: node2
    pods:
      - {name: server-0, namespace: default, serviceAccount: server,
         labels: {app: server, version: v1}, annotations: {nodemesh.io/mesh: enabled}}
      - {name: server-1, namespace: default, serviceAccount: server,
         labels: {app: server, version: v2}, annotations: {nodemesh.io/mesh: enabled}}
namespaces:
  - {name: default, labels: {}}
services:
  - {name: server, namespace: default, selector: {app: server},
     ports: [{port: 80, targetPort: 8080}]}
  - {name: web, namespace: default, selector: {app: server},
     ports: [{port: 80, targetPort: 9080, name: http, appProtocol: http}]}
  - {name: grpc, namespace: default, selector: {app: server},
     ports: [{port: 50051, targetPort: 50051, name: grpc, appProtocol: grpc}]}
policies: []
"""


class LabError(RuntimeError):
    """The lab cannot do what was asked; the message says why and what to do."""


@dataclass(frozen=True)
class NodePlan:
    name: str
    netns: str
    ip: str
    pod_cidr: str
    uplink: str
    switch_port: str
    pin_dir: str


@dataclass(frozen=True)
class PodPlan:
    name: str
    namespace: str
    netns: str
    ip: str
    node: str
    host_veth: str


@dataclass(frozen=True)
class LabPlan:
    lab: str
    switch_netns: str
    ca_netns: str
    ca_ip: str
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]

    def netns_names(self) -> list[str]:
        return [self.switch_netns, self.ca_netns, *(n.netns for n in self.nodes)] + [
            p.netns for p in self.pods
        ]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabPlan:
        return cls(
            lab=data["lab"],
            switch_netns=data["switch_netns"],
            ca_netns=data["ca_netns"],
            ca_ip=data["ca_ip"],
            nodes=tuple(NodePlan(**n) for n in data["nodes"]),
            pods=tuple(PodPlan(**p) for p in data["pods"]),
        )


def check_lab_name(name: str) -> str:
    if not LAB_NAME.fullmatch(name):
        raise LabError(
            f"lab name {name!r} is not allowed: use 1-8 lowercase letters and digits, starting "
            "with a letter (no '-', so one lab's name prefix never matches another's)"
        )
    return name


def pod_netns(lab: str, name: str, namespace: str) -> str:
    """``<lab>-<pod>`` in namespace default, ``<lab>-<pod>.<namespace>`` elsewhere (names have
    no dots, so the two forms never collide)."""
    return f"{lab}-{name}" if namespace == "default" else f"{lab}-{name}.{namespace}"


def plan_lab(doc: ClusterDocument, lab: str, *, source: str) -> tuple[ClusterDocument, LabPlan]:
    """Assign node IPs, pod CIDRs, pod IPs and cluster IPs; return the completed document and
    the plan. Raises ``LabError`` for documents the lab cannot build."""
    check_lab_name(lab)
    if len(doc.nodes) > 250:
        raise LabError(f"{source}: the lab supports at most 250 nodes, got {len(doc.nodes)}")
    data = doc.to_mapping()
    nodes, pods = [], []
    reserved = {"switch", "ca"}
    for i, (node, node_data) in enumerate(zip(doc.nodes, data["nodes"], strict=True)):
        if node.ip or node.pod_cidr:
            raise LabError(
                f"{source}: nodes[{i}]: ip and podCIDR are assigned by the lab; remove them"
            )
        if node.name in reserved:
            raise LabError(f"{source}: nodes[{i}].name: {node.name!r} is reserved by the lab")
        cidr = ipaddress.IPv4Network(f"10.244.{i + 1}.0/24")
        node_ip = str(SEGMENT[i + 1])
        node_data["ip"], node_data["podCIDR"] = node_ip, str(cidr)
        nodes.append(
            NodePlan(
                name=node.name,
                netns=f"{lab}-{node.name}",
                ip=node_ip,
                pod_cidr=str(cidr),
                uplink=UPLINK,
                switch_port=f"sw{i}",
                pin_dir=f"{PIN_ROOT}/{lab}-{node.name}",
            )
        )
        pods += _plan_pods(lab, source, i, node, node_data, cidr)
    node_names = {n.name for n in doc.nodes} | reserved
    for pod in pods:
        if pod.namespace == "default" and pod.name in node_names:
            raise LabError(
                f"{source}: pod {pod.name!r} has the name of a node (or a lab part) and would "
                "share its network namespace name; rename it"
            )
    assign_cluster_ips(data)
    completed = parse_document(_dump(data), source=source)
    plan = LabPlan(
        lab=lab,
        switch_netns=f"{lab}-switch",
        ca_netns=f"{lab}-ca",
        ca_ip=CA_IP,
        nodes=tuple(nodes),
        pods=tuple(pods),
    )
    return completed, plan


def _plan_pods(
    lab: str,
    source: str,
    i: int,
    node: NodeSpec,
    node_data: dict[str, Any],
    cidr: ipaddress.IPv4Network,
) -> list[PodPlan]:
    usable = list(cidr.hosts())[1:]  # .1 is left free (a conventional gateway address)
    taken = {p.ip for p in node.pods if p.ip}
    free = (str(ip) for ip in usable if str(ip) not in taken)
    plans = []
    for j, (pod, pod_data) in enumerate(zip(node.pods, node_data["pods"], strict=True)):
        if pod.ip and ipaddress.IPv4Address(pod.ip) not in usable:
            raise LabError(
                f"{source}: nodes[{i}].pods[{j}].ip: {pod.ip} is not in node {node.name}'s pod "
                f"CIDR {cidr} (.2-.254); change it or omit it to let the lab choose"
            )
        for key in pod.annotations:
            if (problem := unknown_annotation(key)) is not None:
                raise LabError(f"{source}: nodes[{i}].pods[{j}].annotations.{key}: {problem}")
        ip = pod.ip or next(free, None)
        if ip is None:
            raise LabError(f"{source}: node {node.name} has more pods than its /24 can address")
        pod_data["ip"] = ip
        plans.append(
            PodPlan(
                name=pod.name,
                namespace=pod.namespace,
                netns=pod_netns(lab, pod.name, pod.namespace),
                ip=ip,
                node=node.name,
                host_veth=f"pv{j}",
            )
        )
    return plans


def assign_cluster_ips(data: dict[str, Any]) -> None:
    """Give each Service without a ``clusterIP`` the next free VIP, as the API server does (a
    Service without one would have no address for its clients to dial)."""
    taken = {s["clusterIP"] for s in data["services"] if "clusterIP" in s}
    candidate = SERVICE_BASE
    for svc in data["services"]:
        if "clusterIP" in svc:
            continue
        while str(candidate) in taken:
            candidate += 1
        svc["clusterIP"] = str(candidate)
        taken.add(str(candidate))


def _dump(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
