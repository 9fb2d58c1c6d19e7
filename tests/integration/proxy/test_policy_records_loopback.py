"""Which policy refused a request, on loopback through the real proxies (``mesh``'s two nodes).

A request refused by an L7 AuthorizationPolicy is flagged ``RBAC``; its record (what
``/requests``, ``nodemesh requests`` and the access log show) also names the policy, as Envoy's
RBAC filter names the effective policy in its metadata. A request a dry-run policy would have
denied names that policy (``dry_run_policy``), let through or not. Both at the destination
node (the pod on node2: node2's HTTP/1.1 and HTTP/2 layers admit it) and at the source node for
a pod on its own node (node1 admits each try as its destination would, and reports it as its
destination); the source's own report names neither, as a far node's refusal reaches it as a
plain 403 or ``PERMISSION_DENIED``. A RateLimitPolicy's refusal (``RL``) names the
RateLimitPolicy. A connection refused by an L4 AuthorizationPolicy names the policy and its rule
too (``policy`` on its record and access log line, and in the rejection's log line).
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection

from agent.state import Endpoint, PolicyObject, Service, ServicePort
from agent.telemetry.accesslog import ACCESS_LOGGER
from agent.telemetry.http import HttpMetrics
from agent.telemetry.records import INBOUND, OUTBOUND, ConnectionRecord, RequestRecord
from agent.telemetry.tcp import TcpMetrics
from tests.integration.proxy.mesh import (
    CLIENT,
    LOCAL,
    SERVER,
    Mesh,
    free_port,
    mesh_test,
    set_policies,
)
from tests.integration.proxy.test_h2_outbound_loopback import _recording_app, _requests
from tests.integration.proxy.test_http_outbound_loopback import (
    VIP,
    Client,
    Recorded,
    add_services,
    apps,
    rate_limit,
)
from tests.integration.proxy.test_proxy_loopback import _read_until_closed, echo_peer, roundtrip

pytestmark = pytest.mark.root

GRPC_VIP = "10.96.7.4"


def _policy(name: str, app: str, *rules: dict[str, object], dry_run: bool = False) -> PolicyObject:
    spec = {"selector": {"matchLabels": {"app": app}}, "action": "DENY", "rules": list(rules)}
    return PolicyObject("AuthorizationPolicy", "default", name, spec, dry_run=dry_run)


class AccessLines(logging.Handler):
    """The access log's JSON lines, as a node writes them (through ``logging`` in tests)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))

    def __enter__(self) -> AccessLines:
        logger = logging.getLogger(ACCESS_LOGGER)
        self._level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        logger = logging.getLogger(ACCESS_LOGGER)
        logger.removeHandler(self)
        logger.setLevel(self._level)


def _reported(mesh: Mesh) -> tuple[Recorded, Recorded]:
    """What node1 and node2 report; node2's lines also go to the access log."""
    node1, node2 = Recorded(mesh), Recorded(mesh)
    mesh.node1.core.registry.request_observers.remove(node2)
    mesh.node2.core.registry.request_observers.append(node2)
    mesh.node2.core.registry.request_observers.append(HttpMetrics(mesh.store))
    return node1, node2


def _why(records: list[RequestRecord]) -> list[tuple[str, int, str, str, str]]:
    return [(r.path, r.status, r.response_flags, r.policy, r.dry_run_policy) for r in records]


async def _http(
    mesh: Mesh, pod: str, app: str
) -> tuple[list[tuple[int, bytes]], Recorded, Recorded]:
    """Three requests to ``web``, whose one endpoint is ``pod``, under a DENY on POST and a
    dry-run DENY on ``/orders``: the answers, and what each node reported."""
    port = free_port(pod)
    add_services(mesh, port, pod)
    set_policies(
        mesh.store,
        _policy(
            "no-posts",
            app,
            {"to": [{"operation": {"paths": ["/admin*"]}}]},
            {"to": [{"operation": {"methods": ["POST"]}}]},  # rules[1]: what denies POST /orders
        ),
        _policy(
            "try-no-orders", app, {"to": [{"operation": {"paths": ["/orders"]}}]}, dry_run=True
        ),
    )
    node1, node2 = _reported(mesh)
    async with apps(port, pod):
        client = Client(*await mesh.connect(CLIENT, (VIP, 80)))
        answers = [
            await client.request("POST", "/orders", b"payload"),
            await client.request("GET", "/orders"),
            await client.request("GET", "/status"),
        ]
        client.writer.close()
    return answers, node1, node2


HTTP_EXPECTED = [
    ("/orders", 403, "RBAC", "default/no-posts:rules[1]", "default/try-no-orders:rules[0]"),
    ("/orders", 200, "-", "", "default/try-no-orders:rules[0]"),
    ("/status", 200, "-", "", ""),
]


@mesh_test
async def test_an_http_request_denied_at_the_destination_names_its_policy(mesh: Mesh) -> None:
    with AccessLines() as log:
        answers, node1, node2 = await _http(mesh, SERVER, "server")
    assert [status for status, _ in answers] == [403, 200, 200]
    assert _why(node2.by(INBOUND)) == HTTP_EXPECTED
    # The source saw a plain 403: nothing names node2's policy there.
    assert [(r.policy, r.dry_run_policy) for r in node1.by(OUTBOUND)] == [("", "")] * 3
    lines = [line for line in log.lines if line["direction"] == "inbound"]
    assert [(line.get("policy"), line.get("dry_run_policy")) for line in lines] == [
        ("default/no-posts:rules[1]", "default/try-no-orders:rules[0]"),
        (None, "default/try-no-orders:rules[0]"),
        (None, None),  # the usual line has neither field
    ]


@mesh_test
async def test_an_http_request_denied_for_a_same_node_pod_names_its_policy(mesh: Mesh) -> None:
    answers, node1, node2 = await _http(mesh, LOCAL, "local")
    assert [status for status, _ in answers] == [403, 200, 200]
    assert _why(node1.by(INBOUND)) == HTTP_EXPECTED  # node1 reports as the pod's destination
    assert [(r.policy, r.dry_run_policy) for r in node1.by(OUTBOUND)] == [("", "")] * 3
    assert node2.requests == []


@mesh_test
async def test_a_rate_limited_request_names_the_rate_limit_policy(mesh: Mesh) -> None:
    port = free_port(SERVER)
    add_services(mesh, port, SERVER)
    set_policies(mesh.store, rate_limit(1))
    mesh.node2.core.clock = lambda: 100.0  # frozen: no token comes back
    _, node2 = _reported(mesh)
    async with apps(port, SERVER):
        client = Client(*await mesh.connect(CLIENT, (VIP, 80)))
        assert [(await client.request("GET", "/a"))[0] for _ in range(2)] == [200, 429]
        client.writer.close()
    assert _why(node2.by(INBOUND)) == [
        ("/a", 200, "-", "", ""),
        ("/a", 429, "RL", "default/web-limit", ""),
    ]


async def _grpc(mesh: Mesh, pod: str, app: str) -> tuple[list[str], Recorded, Recorded]:
    """Three calls to ``front`` (a gRPC port), whose one endpoint is ``pod``, under a DENY on
    ``Delete`` and a dry-run DENY on ``Get``: the answers, and what each node reported."""
    port = free_port(pod)
    with mesh.store.update() as tx:
        grpc = ServicePort(50051, port, name="grpc", app_protocol="grpc")
        selector = {"app": app}
        tx.put_service(
            Service("front", "default", (GRPC_VIP,), (grpc,), selector, (Endpoint(pod),))
        )
    set_policies(
        mesh.store,
        _policy("no-deletes", app, {"to": [{"operation": {"paths": ["/pkg.Echo/Delete"]}}]}),
        _policy(
            "try-no-gets", app, {"to": [{"operation": {"paths": ["/pkg.Echo/Get"]}}]}, dry_run=True
        ),
    )
    node1, node2 = _reported(mesh)
    received: list[str] = []
    server = await asyncio.start_server(_recording_app(received), pod, port)
    try:
        reader, writer = await mesh.connect(CLIENT, (GRPC_VIP, 50051))
        conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        paths = ["/pkg.Echo/Delete", "/pkg.Echo/Get", "/pkg.Echo/List"]
        answers = await _requests(conn, reader, writer, paths)
        writer.close()
    finally:
        server.close()
    assert received == ["/pkg.Echo/Get", "/pkg.Echo/List"]
    return answers, node1, node2


GRPC_EXPECTED = [
    ("/pkg.Echo/Delete", 200, "RBAC", "default/no-deletes:rules[0]", ""),
    ("/pkg.Echo/Get", 200, "-", "", "default/try-no-gets:rules[0]"),
    ("/pkg.Echo/List", 200, "-", "", ""),
]


@mesh_test
async def test_a_grpc_call_denied_at_the_destination_names_its_policy(mesh: Mesh) -> None:
    with AccessLines() as log:
        answers, node1, node2 = await _grpc(mesh, SERVER, "server")
    assert answers == ["7", "0", "0"]
    assert _why(node2.by(INBOUND)) == GRPC_EXPECTED
    assert [(r.policy, r.dry_run_policy) for r in node1.by(OUTBOUND)] == [("", "")] * 3
    denied = next(line for line in log.lines if line["path"] == "/pkg.Echo/Delete")
    assert (denied["grpc_status"], denied["response_flags"], denied["policy"]) == (
        "7",
        "RBAC",
        "default/no-deletes:rules[0]",
    )


@mesh_test
async def test_a_grpc_call_denied_for_a_same_node_pod_names_its_policy(mesh: Mesh) -> None:
    answers, node1, node2 = await _grpc(mesh, LOCAL, "local")
    assert answers == ["7", "0", "0"]
    assert _why(node1.by(INBOUND)) == GRPC_EXPECTED
    assert [(r.policy, r.dry_run_policy) for r in node1.by(OUTBOUND)] == [("", "")] * 3
    assert node2.requests == []


class Closed:
    """A connection observer keeping the records of closed connections."""

    def __init__(self) -> None:
        self.records: list[ConnectionRecord] = []

    def opened(self, record: ConnectionRecord) -> None:
        pass

    def closed(self, record: ConnectionRecord) -> None:
        self.records.append(record)


class Rejections(logging.Handler):
    """The proxy registry's log lines (``rejected (KEY): ...``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> Rejections:
        logger = logging.getLogger("agent.proxy.records")
        self._level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        logger = logging.getLogger("agent.proxy.records")
        logger.removeHandler(self)
        logger.setLevel(self._level)


L4_DENY = _policy(
    "no-client",
    "server",
    {"from": [{"source": {"namespaces": ["elsewhere"]}}]},
    {"from": [{"source": {"principals": ["*/sa/client"]}}]},  # rules[1]: what denies client
)


@mesh_test
async def test_a_connection_denied_at_the_destination_names_its_policy_and_rule(
    mesh: Mesh,
) -> None:
    """An HBONE stream refused by an L4 DENY: node2's record, its access log line and the
    rejection's log line name the policy and the rule that matched."""
    port = mesh.app(SERVER, echo_peer)
    set_policies(mesh.store, L4_DENY)
    closed = Closed()
    mesh.node2.core.registry.observers.extend([closed, TcpMetrics(mesh.store)])
    with AccessLines() as log, Rejections() as rejected, pytest.raises(ConnectionResetError):
        await roundtrip(mesh, CLIENT, (SERVER, port))
    assert [(r.failure, r.policy) for r in closed.records] == [
        ("policy_denied", "default/no-client:rules[1]")
    ]
    line = next(line for line in log.lines if line["direction"] == "inbound")
    assert (line["failure"], line["policy"]) == ("policy_denied", "default/no-client:rules[1]")
    denial = next(text for text in rejected.lines if text.startswith("rejected (policy_denied)"))
    assert denial.endswith("denied by DENY policy default/no-client:rules[1]")


@mesh_test
async def test_a_connection_denied_for_a_same_node_pod_names_its_policy(mesh: Mesh) -> None:
    """A same-node connection refused by node1 (the pod's destination too): its record names
    the policy; an ALLOW that no rule matches is ``no-allow-match``."""
    port = mesh.app(LOCAL, echo_peer)
    spec = {
        "selector": {"matchLabels": {"app": "local"}},
        "action": "ALLOW",
        "rules": [{"to": [{"operation": {"ports": ["1"]}}]}],
    }
    set_policies(mesh.store, PolicyObject("AuthorizationPolicy", "default", "only-1", spec))
    closed = Closed()
    mesh.node1.core.registry.observers.append(closed)
    with pytest.raises(ConnectionResetError):
        await roundtrip(mesh, CLIENT, (LOCAL, port))
    assert [(r.failure, r.policy) for r in closed.records] == [("policy_denied", "no-allow-match")]


@mesh_test
async def test_a_live_connection_a_new_policy_denies_names_it(mesh: Mesh) -> None:
    """A policy applied while a connection is open closes it (``Registry.recheck``): its record
    names the policy and rule, as a refusal at its start would."""
    port = mesh.app(SERVER, echo_peer)
    closed = Closed()
    mesh.node2.core.registry.observers.append(closed)
    reader, writer = await mesh.connect(CLIENT, (SERVER, port))
    assert await reader.readline() == f"peer={CLIENT}\n".encode()
    set_policies(mesh.store, L4_DENY)
    assert await asyncio.wait_for(_read_until_closed(reader), 10) == b""
    writer.close()
    assert len(mesh.node2.core.registry) == 0  # closed and removed, as the recheck test shows
    assert [(r.failure, r.policy) for r in closed.records] == [
        ("policy_denied", "default/no-client:rules[1]")
    ]
