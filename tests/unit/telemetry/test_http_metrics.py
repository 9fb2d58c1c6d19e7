"""Istio request metrics at the destination, fed by a real registry (agent.telemetry.http)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest

from agent.policy.authz import Decision
from agent.proxy.records import Registry
from agent.telemetry.accesslog import request_entry
from agent.telemetry.agentmetrics import AgentSources
from agent.telemetry.component import TelemetryComponent
from agent.telemetry.records import ConnectionRecord, RequestRecord, same_node_destination
from tests.unit.telemetry.telemetry_helpers import (
    CLIENT_ID,
    SERVER_ID,
    inbound,
    make_store,
    outbound,
)
from tests.unit.telemetry.telemetry_helpers import samples as parse
from tests.workloads import workload

# The labels of an allowed request that ``inbound()`` carried (client -> server, mTLS).
OK_LABELS = {
    "reporter": "destination",
    "source_workload": "client",
    "source_canonical_service": "client",
    "source_canonical_revision": "latest",
    "source_workload_namespace": "default",
    "source_principal": CLIENT_ID,
    "source_app": "client",
    "source_version": "unknown",
    "source_cluster": "Kubernetes",
    "destination_service": "server.default.svc.cluster.local",
    "destination_service_namespace": "default",
    "destination_service_name": "server",
    "destination_workload": "server",
    "destination_canonical_service": "server",
    "destination_canonical_revision": "latest",
    "destination_workload_namespace": "default",
    "destination_principal": SERVER_ID,
    "destination_app": "server",
    "destination_version": "unknown",
    "destination_cluster": "Kubernetes",
    "connection_security_policy": "mutual_tls",
    "response_flags": "-",
    "request_protocol": "http",
    "response_code": "200",
    "grpc_response_status": "",
}


def telemetry() -> tuple[Registry, TelemetryComponent]:
    registry = Registry()
    component = TelemetryComponent(
        store=make_store(), address=("127.0.0.1", 0), sources=AgentSources()
    )
    registry.request_observers.append(component.http)
    return registry, component


def request(status: int = 200, ms: float = 3.0, flags: str = "-") -> RequestRecord:
    return RequestRecord("GET", "/items/42", "server:80", status, ms, 10, 2000, flags, "rid")


def test_requests_are_counted_with_istio_labels_and_no_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry, component = telemetry()
    conn = inbound()
    with caplog.at_level(logging.INFO, logger="nodemesh.access"):
        registry.request_done(conn, request(200))
        registry.request_done(conn, request(200, ms=700.0))
        registry.request_done(conn, request(403, flags="RBAC"))
    parsed = parse(component.exposition())
    ok = dict(OK_LABELS)
    assert parsed[("istio_requests_total", frozenset(ok.items()))] == 2
    denied = {**ok, "response_code": "403", "response_flags": "RBAC"}
    assert parsed[("istio_requests_total", frozenset(denied.items()))] == 1
    # Istio's duration buckets: 3 ms is in le=5 and not le=1; 700 ms in le=1000 only.
    bucket = "istio_request_duration_milliseconds_bucket"
    assert parsed[(bucket, frozenset({**ok, "le": "1"}.items()))] == 0
    assert parsed[(bucket, frozenset({**ok, "le": "5"}.items()))] == 1
    assert parsed[(bucket, frozenset({**ok, "le": "500"}.items()))] == 1
    assert parsed[(bucket, frozenset({**ok, "le": "1000"}.items()))] == 2
    assert parsed[(bucket, frozenset({**ok, "le": "+Inf"}.items()))] == 2
    assert parsed[("istio_request_duration_milliseconds_sum", frozenset(ok.items()))] == 703.0
    assert parsed[("istio_request_bytes_bucket", frozenset({**ok, "le": "10"}.items()))] == 2
    assert parsed[("istio_response_bytes_bucket", frozenset({**ok, "le": "1000"}.items()))] == 0
    assert parsed[("istio_response_bytes_bucket", frozenset({**ok, "le": "10000"}.items()))] == 2
    assert not any("/items" in v for (_, labels) in parsed for _, v in labels)
    lines = [json.loads(r.getMessage()) for r in caplog.records]
    assert [(e["method"], e["path"], e["response_code"]) for e in lines] == [
        ("GET", "/items/42", 200),
        ("GET", "/items/42", 200),
        ("GET", "/items/42", 403),
    ]


def test_grpc_statuses_outside_grpcs_codes_share_one_series_and_the_log_keeps_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An upstream chooses ``grpc-status``: labelled as received, each distinct text was a new
    series kept for the agent's life. 200 different texts now make one series (UNKNOWN)."""
    registry, component = telemetry()
    conn = inbound()
    with caplog.at_level(logging.INFO, logger="nodemesh.access"):
        for i in range(200):
            registry.request_done(conn, replace(request(), protocol="grpc", grpc_status=f"x{i}"))
        for code in ("0", "14"):
            registry.request_done(conn, replace(request(), protocol="grpc", grpc_status=code))
    parsed = parse(component.exposition())
    grpc = {k: v for k, v in OK_LABELS.items() if k != "grpc_response_status"}
    grpc["request_protocol"] = "grpc"
    counts = {
        dict(labels)["grpc_response_status"]: value
        for (name, labels), value in parsed.items()
        if name == "istio_requests_total"
    }
    assert counts == {"2": 200, "0": 1, "14": 1}
    key = frozenset({**grpc, "grpc_response_status": "2"}.items())
    assert parsed[("istio_requests_total", key)] == 200
    lines = [json.loads(r.getMessage()) for r in caplog.records]
    assert [e["grpc_status"] for e in lines][:2] == ["x0", "x1"]


def test_rejections_by_cause_and_dry_run_denials_by_policy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Dry-run denials are counted per policy (a series per policy, not per rule), while the
    log line names the rule that matched, as the request's record does."""
    registry, component = telemetry()
    registry.http_rejected("ambiguous_length", "a -> b")
    registry.http_rejected("ambiguous_length", "a -> b")
    registry.http_rejected("header_timeout", "a -> b")
    would = Decision(
        True,
        "ok",
        would_deny=("default/no-post",),
        would_deny_rules=("default/no-post:rules[1]",),
    )
    with caplog.at_level(logging.INFO, logger="agent.proxy.records"):
        registry.request_denied(would, "a -> b POST /x")
    registry.request_denied(Decision(False, "no", "default/deny"), "a -> b")
    parsed = parse(component.exposition())
    rejected = "nodemesh_http_rejected_requests_total"
    assert parsed[(rejected, frozenset({("cause", "ambiguous_length")}))] == 2
    assert parsed[(rejected, frozenset({("cause", "header_timeout")}))] == 1
    dry = "nodemesh_http_dry_run_denials_total"
    assert parsed[(dry, frozenset({("policy", "default/no-post")}))] == 1
    assert registry.denials["default/deny"] == 1
    assert [r.getMessage() for r in caplog.records if "dry-run" in r.getMessage()] == [
        "HTTP request a -> b POST /x: dry-run policy default/no-post:rules[1] would deny it"
    ]


def test_labels_follow_the_connections_endpoint_and_the_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The metrics remember a connection's labels between its requests (``_Series``); what
    they are made of changing still changes them: the source pointing the connection at
    another endpoint (here the ``client`` pod), or a state change (that pod's app renamed)."""
    registry, component = telemetry()
    conn = outbound()
    with caplog.at_level(logging.INFO, logger="nodemesh.access"):
        registry.request_done(conn, request(200))
        conn.upstream = "10.244.1.2:8080"
        registry.request_done(conn, request(200))
        with component.http._store.update() as txn:
            txn.put_workload(workload("client", "node1", "10.244.1.2", app="v2"))
        registry.request_done(conn, request(200))
    parsed = parse(component.exposition())
    counted = {
        dict(labels)["destination_workload"]: value
        for (name, labels), value in parsed.items()
        if name == "istio_requests_total" and dict(labels)["reporter"] == "source"
    }
    assert counted == {"server": 1, "client": 1, "v2": 1}
    lines = [json.loads(r.getMessage()) for r in caplog.records]
    assert [(e["upstream_address"], e["destination_workload"]) for e in lines] == [
        ("10.244.2.2:8080", "server"),
        ("10.244.1.2:8080", "client"),
        ("10.244.1.2:8080", "v2"),
    ]


def test_each_line_carries_its_own_series_label_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request line's label fields are rendered once per series (``_Series.log_tail``): on
    one connection, requests of other codes, another peer identity and a state change between
    them each get the line ``json.dumps`` makes of their own fields, and their own series."""
    registry, component = telemetry()
    conn = inbound()
    expected = dict(OK_LABELS)
    other_id = "spiffe://cluster.local/ns/other/sa/client"
    sent: list[tuple[RequestRecord, dict[str, str]]] = []
    with caplog.at_level(logging.INFO, logger="nodemesh.access"):
        for req, labels in (
            (request(200), expected),
            (
                request(503, flags="UC"),
                {**expected, "response_code": "503", "response_flags": "UC"},
            ),
            (request(200), expected),
        ):
            registry.request_done(conn, req)
            sent.append((req, labels))
        conn.source_identity = other_id
        peer = {**expected, "source_principal": other_id}
        registry.request_done(conn, request(200))
        sent.append((request(200), peer))
        with component.http._store.update() as txn:
            txn.put_workload(workload("client", "node1", "10.244.1.2", app="renamed"))
        renamed = {
            **peer,
            "source_workload": "renamed",
            "source_canonical_service": "renamed",
            "source_app": "renamed",
        }
        registry.request_done(conn, request(200))
        sent.append((request(200), renamed))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == len(sent)
    for line, (req, labels) in zip(lines, sent, strict=True):
        entry = request_entry(conn, req, labels, 0.0)
        entry["time"] = json.loads(line)["time"]
        assert line == json.dumps(entry, separators=(",", ":"))
    parsed = parse(component.exposition())
    counted = {
        labels: value for (name, labels), value in parsed.items() if name == "istio_requests_total"
    }
    assert counted == {
        frozenset(expected.items()): 2,
        frozenset(sent[1][1].items()): 1,
        frozenset(peer.items()): 1,
        frozenset(renamed.items()): 1,
    }


def test_the_access_log_line_is_compact_json_of_the_documented_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry, _ = telemetry()
    conn = inbound()
    with caplog.at_level(logging.INFO, logger="nodemesh.access"):
        registry.request_done(conn, request(503, ms=1.5, flags="UC"))
    (record,) = caplog.records
    line = record.getMessage()
    entry = json.loads(line)
    assert line == json.dumps(entry, separators=(",", ":"))
    assert (record.name, record.levelno, record.funcName) == (
        "nodemesh.access",
        logging.INFO,
        "write_request_log",
    )
    assert entry["response_code"] == 503
    assert entry["response_flags"] == "UC"
    assert entry["duration_ms"] == 1.5


def test_a_record_copy_has_every_field_and_is_its_own() -> None:
    """The source reports each request on a copy of its connection's record."""
    record = ConnectionRecord(
        "outbound", "10.0.0.1:4000", "10.96.0.1:80", "spiffe://a", "spiffe://b", path="hbone"
    )
    record.upstream, record.requests, record.service = "10.0.0.2:8080", 3, "web"
    twin = record.copy()
    assert twin == record and type(twin) is ConnectionRecord
    twin.upstream = "10.0.0.3:8080"
    assert record.upstream == "10.0.0.2:8080"


def test_a_same_node_request_is_reported_as_its_destination_would(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The source's record of a request to a pod on its own node, turned into the one the
    destination would hold (``same_node_destination``), labels it ``reporter="destination"``
    exactly as that pod's own inbound record does (but for the path's security: no TLS), and
    its access-log line is the inbound one, under the client connection's id."""
    registry, component = telemetry()
    sent = outbound()
    sent.id, sent.path, sent.protocol = 7, "local", "http/1.1"
    service = "server.default.svc.cluster.local"
    with caplog.at_level(logging.INFO, logger="nodemesh.access"):
        registry.request_done(same_node_destination(sent, service), request(200))
    parsed = parse(component.exposition())
    (labels,) = (dict(ls) for (name, ls) in parsed if name == "istio_requests_total")
    registry2, component2 = telemetry()
    registry2.request_done(inbound(), request(200))
    (theirs,) = (
        dict(ls) for (n, ls) in parse(component2.exposition()) if n == "istio_requests_total"
    )
    assert labels == {**theirs, "connection_security_policy": "none"}
    assert labels["reporter"] == "destination"
    (line,) = [json.loads(r.getMessage()) for r in caplog.records]
    assert line["direction"] == "inbound"
    assert line["connection_id"] == 7
    assert line["source_address"] == "10.244.1.2:40000"
    assert line["destination_address"] == line["upstream_address"] == "10.244.2.2:8080"
    assert line["destination_service"] == service
