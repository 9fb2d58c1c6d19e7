"""The source's per-snapshot endpoints (``http_outbound._ClientConnection._endpoint``): what a
client connection remembers of each endpoint its requests went to equals what working it out
again for that request gives (``Resolver.endpoint_route``, ``Outbound.describe_route``, the
session key), whatever the state did between requests (hypothesis)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proxy.core import Core
from agent.proxy.http_mirror import service_name as _name
from agent.proxy.http_outbound import _ClientConnection
from agent.proxy.http_sessions import SessionKey
from agent.proxy.outbound import Outbound
from agent.proxy.resolve import ServiceTarget
from agent.state import Endpoint, Service, ServicePort, StateStore
from agent.telemetry.records import OUTBOUND, ConnectionRecord
from tests.workloads import workload

CLIENT_IP = "10.0.1.5"
VIP = "10.96.7.2"
IPS = ("10.0.1.7", "10.0.2.8", "10.0.2.9", "10.0.3.10")  # on node1, node2, node2, unmeshed

# One step: a request to an endpoint (by index), or a state change between requests.
Step = tuple[str, int]
steps = st.lists(
    st.tuples(
        st.sampled_from(["request", "request", "request", "rename", "move", "port", "unmesh"]),
        st.integers(0, len(IPS) - 1),
    ),
    max_size=30,
)


def _service(port_of: dict[str, int]) -> Service:
    http = ServicePort(80, 8080, name="http", app_protocol="http")
    endpoints = tuple(
        Endpoint(ip, ports={"http": port_of[ip]}) if ip in port_of else Endpoint(ip) for ip in IPS
    )
    return Service("web", "default", (VIP,), (http,), {"app": "server"}, endpoints)


def _connection() -> tuple[_ClientConnection, Outbound, StateStore]:
    store = StateStore()
    with store.update() as tx:
        tx.put_workload(workload("client", "node1", CLIENT_IP))
        tx.put_workload(workload("near", "node1", IPS[0], app="server"))
        tx.put_workload(workload("far", "node2", IPS[1], app="server"))
        tx.put_workload(workload("far2", "node2", IPS[2], app="server"))
        tx.put_workload(workload("plain", "node3", IPS[3], app="server", meshed=False))
        tx.put_service(_service({}))
    core = Core(node="node1", store=store, identities=None)  # type: ignore[arg-type]
    out = Outbound(core, None)  # type: ignore[arg-type]  # no tunnel is opened here
    conn = object.__new__(_ClientConnection)  # only what ``_endpoint`` and ``_labels`` read
    conn.owner, conn.core, conn._store = out.http, core, store
    conn.source = store.snapshot().workload_by_ip[CLIENT_IP]
    conn.record = ConnectionRecord(OUTBOUND, f"{CLIENT_IP}:40000", f"{VIP}:80")
    conn.src_ip = CLIENT_IP
    conn._snap, conn._endpoints, conn._by_route = None, {}, {}
    conn._labelled, conn._admissions = {}, {}
    return conn, out, store


def _change(store: StateStore, what: str, ip: str, port_of: dict[str, int], n: int) -> None:
    snap = store.snapshot()
    pod = snap.workload_by_ip.get(ip)
    with store.update() as tx:
        if what == "rename" and pod is not None:
            tx.put_workload(replace(pod, service_account=f"sa{n}"))
        elif what == "move" and pod is not None:
            tx.put_workload(replace(pod, node="node2" if pod.node == "node1" else "node1"))
        elif what == "unmesh" and pod is not None:
            tx.put_workload(workload(pod.name, pod.node, ip, app="server", meshed=False))
        elif what == "port":
            port_of[ip] = 9000 + n
            tx.put_service(_service(port_of))


@settings(max_examples=60, deadline=None)
@given(steps)
def test_remembered_endpoints_equal_those_worked_out_per_request(plan: list[Step]) -> None:
    conn, out, store = _connection()
    port_of: dict[str, int] = {}
    kept: ServiceTarget | None = None
    for n, (what, index) in enumerate(plan):
        ip = IPS[index]
        if what != "request":
            _change(store, what, ip, port_of, n)
            continue
        snap = store.snapshot()
        service = snap.services[("default", "web")]
        backend = ServiceTarget(service, service.ports[0], VIP)
        if n % 2:  # the connection's own target, kept across snapshots, or a new one
            kept = backend if kept is None else kept
            backend = kept
        got = conn._endpoint(snap, backend, ip)

        route = out.resolver.endpoint_route(snap, conn.source, backend, ip)
        fresh = ConnectionRecord(OUTBOUND, conn.record.source, conn.record.destination)
        out.describe_route(snap, route, fresh)
        assert got.route == route
        assert got.key == SessionKey(route.kind, CLIENT_IP, route.ip, route.port, _name(backend))
        assert (got.path, got.upstream, got.identity) == (
            fresh.path,
            fresh.upstream,
            fresh.destination_identity,
        )
        # The report's labelled copy (kept per endpoint and snapshot): as ``describe_route`` on
        # a copy of the record makes it, for each request.
        labels = conn._labels(got.route)
        expected = conn.record.copy()
        expected.upstream, expected.destination_identity = "", None
        out.describe_route(snap, got.route, expected)
        expected.security = "mutual_tls" if got.route.kind == "hbone" else "none"
        assert labels == expected
