"""State and records shared by the telemetry and admin unit tests
(imported as ``tests.unit.telemetry.telemetry_helpers``)."""

from __future__ import annotations

from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from agent.state import StateStore
from agent.state.model import Endpoint, PolicyObject, Service, ServicePort
from agent.telemetry.records import INBOUND, OUTBOUND, SECURITY_MTLS, ConnectionRecord
from tests.workloads import workload

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
VIP = "10.96.0.10"
# Values of records for hypothesis (the access log's tests)
TEXT = st.text(max_size=40)  # any code point: quotes, backslashes, controls, non-ASCII
COUNT = st.integers(min_value=0, max_value=2**63)
MILLIS = st.floats(min_value=0.0, max_value=1e9, allow_nan=False, allow_infinity=False)


def make_store() -> StateStore:
    """client (node1, 10.244.1.2), server-0/1 (node2) behind Service server at 10.96.0.10."""
    store = StateStore()
    with store.update() as txn:
        txn.put_workload(workload("client", "node1", "10.244.1.2", app="client"))
        txn.put_workload(workload("server-0", "node2", "10.244.2.2", sa="server", app="server"))
        txn.put_workload(workload("server-1", "node2", "10.244.2.3", sa="server", app="server"))
        txn.put_service(
            Service(
                name="server",
                namespace="default",
                cluster_ips=(VIP,),
                ports=(ServicePort(80, 8080),),
                selector={"app": "server"},
                endpoints=(
                    Endpoint("10.244.2.2", "default/server-0"),
                    Endpoint("10.244.2.3", "default/server-1"),
                ),
            )
        )
        txn.put_policy(
            PolicyObject(
                kind="AuthorizationPolicy",
                namespace="default",
                name="deny-outsider",
                spec={
                    "action": "DENY",
                    "rules": [{"from": [{"source": {"ipBlocks": ["1.2.3.4"]}}]}],
                },
            )
        )
    return store


def outbound(port: int = 40000) -> ConnectionRecord:
    """client → the Service VIP, dialed to server-0 through HBONE."""
    return ConnectionRecord(
        OUTBOUND,
        f"10.244.1.2:{port}",
        f"{VIP}:80",
        source_identity=CLIENT_ID,
        destination_identity=SERVER_ID,
        path="hbone",
        upstream="10.244.2.2:8080",
    )


def inbound() -> ConnectionRecord:
    return ConnectionRecord(
        INBOUND,
        "10.244.1.2",
        "10.244.2.2:8080",
        source_identity=CLIENT_ID,
        destination_identity=SERVER_ID,
        security=SECURITY_MTLS,
        path="hbone",
    )


def samples(exposition: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parse Prometheus text with prometheus-client's parser: (name, labels) → value."""
    out = {}
    for family in text_string_to_metric_families(exposition.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(
    parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """Sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in parsed.items() if n == name and want <= ls)
