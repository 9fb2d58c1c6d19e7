"""The ring of recent requests, its filters, and the access log's sampling (sans-IO)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest

from agent.proxy.records import Registry
from agent.telemetry.accesslog import RequestSampler, SampleRateError
from agent.telemetry.agentmetrics import AgentSources
from agent.telemetry.component import TelemetryComponent
from agent.telemetry.http import HttpMetrics
from agent.telemetry.records import RequestRecord
from agent.telemetry.tap import (
    MAX_FIELD_CHARS,
    FilterError,
    RequestFilter,
    RequestRing,
    parse_status,
)
from tests.unit.telemetry.telemetry_helpers import CLIENT_ID, SERVER_ID, inbound, make_store

LABELS = {
    "source_workload": "client",
    "source_workload_namespace": "default",
    "source_principal": CLIENT_ID,
    "destination_service": "server.default.svc.cluster.local",
    "destination_workload": "server",
    "destination_workload_namespace": "default",
    "destination_principal": SERVER_ID,
    "connection_security_policy": "mutual_tls",
}


def rec(
    path: str = "/a", status: int = 200, method: str = "GET", flags: str = "-"
) -> RequestRecord:
    return RequestRecord(method, path, "server:80", status, 1.5, 0, 2, flags, f"id{path}")


def ring_of(*paths: str, size: int = 8) -> RequestRing:
    ring = RequestRing(size)
    for p in paths:
        ring.add(inbound(), rec(p), LABELS)
    return ring


def paths(entries: list[dict[str, object]]) -> list[object]:
    return [e["path"] for e in entries]


def test_a_cursor_gets_what_came_after_it_in_order() -> None:
    ring = ring_of("/a", "/b")
    assert ring.cursor == 2
    batch = ring.since(0)
    assert (paths(batch.entries), batch.next, batch.missed) == (["/a", "/b"], 2, 0)
    assert ring.since(2) == ([], 2, 0)
    ring.add(inbound(), rec("/c"), LABELS)
    assert paths(ring.since(2).entries) == ["/c"]


def test_no_cursor_gives_the_latest_requests_held() -> None:
    ring = ring_of("/a", "/b", "/c")
    batch = ring.since(None, limit=2)
    assert (paths(batch.entries), batch.next) == (["/b", "/c"], 3)


def test_a_limit_pages_from_the_cursor() -> None:
    ring = ring_of("/a", "/b", "/c")
    first = ring.since(0, limit=2)
    assert (paths(first.entries), first.next) == (["/a", "/b"], 2)
    assert paths(ring.since(first.next, limit=2).entries) == ["/c"]


def test_the_ring_is_bounded_and_a_late_viewer_is_told_what_it_missed() -> None:
    ring = ring_of(*(f"/{i}" for i in range(20)), size=8)
    batch = ring.since(5)
    assert batch.missed == 7  # 5 and 6 .. 11 are gone; 12 .. 19 are held
    assert paths(batch.entries) == [f"/{i}" for i in range(12, 20)]
    assert ring.missed_total == 7
    assert len(ring.since(None, limit=1000).entries) == 8


def test_what_a_client_sent_is_held_whole_up_to_the_bound_and_trimmed_past_it() -> None:
    """Path, authority, request id and trace headers are the client's, up to the head limit:
    2,048 records of 60 KiB held 120 MiB. Past ``MAX_HELD_CHARS`` a record is kept trimmed
    (each field at most ``MAX_FIELD_CHARS`` and a note of what was cut); the reported record
    itself, which the access log writes, is untouched; ordinary ones are kept as they came."""
    ring = RequestRing(4)
    usual = replace(rec("/p" * 900), trace_headers=(("traceparent", "00-" + "a" * 52),))
    huge = replace(
        rec("/" + "x" * 60_000),
        authority="h" * 20_000,
        request_id="i" * 5_000,
        trace_headers=(("b3", "t" * 9_000),) * 3,
    )
    ring.add(inbound(), usual, LABELS)
    ring.add(inbound(), huge, LABELS)
    kept = [t.request for t in ring._entries]
    assert kept[0] is usual
    cut = kept[1]
    assert cut.trace_headers == () and huge.trace_headers != ()
    assert cut.path == "/" + "x" * (MAX_FIELD_CHARS - 1) + "...(58977 more)"
    assert len(huge.path) == 60_001 and len(huge.authority) == 20_000
    held = sum(len(f) for f in (cut.method, cut.path, cut.authority, cut.request_id))
    assert held <= 4 * (MAX_FIELD_CHARS + 20)
    entry = ring.since(None)[0][1]
    assert str(entry["path"]).endswith("...(58977 more)") and entry["response_code"] == 200


def test_a_cursor_from_the_future_waits_for_the_next_request() -> None:
    ring = ring_of("/a")
    assert ring.since(99) == ([], 1, 0)


def test_filtered_entries_still_move_the_cursor() -> None:
    ring = ring_of("/api/a", "/other", "/api/b")
    batch = ring.since(0, RequestFilter(path="/api/"))
    assert (paths(batch.entries), batch.next) == (["/api/a", "/api/b"], 3)
    assert ring.since(1, RequestFilter(path="/nothing")) == ([], 3, 0)


def test_wake_ups_are_called_once_on_the_next_request_and_can_be_withdrawn() -> None:
    ring = ring_of()
    calls: list[str] = []

    def first() -> None:
        calls.append("first")

    def gone() -> None:
        calls.append("gone")

    ring.on_next(first)
    ring.on_next(gone)
    ring.forget(gone)
    ring.add(inbound(), rec(), LABELS)
    ring.add(inbound(), rec(), LABELS)
    assert calls == ["first"]


def test_entries_carry_the_access_log_fields() -> None:
    ring = RequestRing(4)
    conn = replace(inbound(), upstream="10.244.2.2:9080", id=7)
    ring.add(conn, replace(rec("/x", 503, flags="UC"), grpc_status="14"), LABELS)
    (entry,) = ring.since(None).entries
    assert {k: entry[k] for k in ("connection_id", "method", "path", "authority")} == {
        "connection_id": 7,
        "method": "GET",
        "path": "/x",
        "authority": "server:80",
    }
    assert entry["response_code"] == 503 and entry["grpc_status"] == "14"
    assert entry["response_flags"] == "UC" and entry["request_id"] == "id/x"
    assert entry["upstream_address"] == "10.244.2.2:9080"
    assert entry["source_identity"] == CLIENT_ID and entry["destination_identity"] == SERVER_ID
    assert entry["source_workload"] == "client" and entry["destination_namespace"] == "default"
    assert entry["duration_ms"] == 1.5


def entry(
    src: str = "client",
    dst: str = "server",
    method: str = "GET",
    path: str = "/a",
    status: int = 200,
    grpc: str = "",
) -> dict[str, object]:
    return {
        "grpc_status": grpc,
        "source_workload": src,
        "source_namespace": "default",
        "destination_workload": dst,
        "destination_namespace": "prod",
        "method": method,
        "path": path,
        "response_code": status,
    }


@pytest.mark.parametrize(
    ("selected", "matched", "missed"),
    [
        (RequestFilter(workload="client"), entry(), entry(src="x")),
        (RequestFilter(workload="server"), entry(), entry(dst="x")),
        (RequestFilter(workload="prod/server"), entry(), entry(src="server", dst="x")),
        (RequestFilter(workload="default/client"), entry(), entry(src="server", dst="client")),
        (RequestFilter(source="client"), entry(), entry(src="server", dst="client")),
        (RequestFilter(destination="server"), entry(), entry(src="server", dst="client")),
        (RequestFilter(method="post"), entry(method="POST"), entry()),
        (RequestFilter(path="/api"), entry(path="/api/v1"), entry(path="/ap")),
        (RequestFilter(status="5xx"), entry(status=503), entry(status=404)),
        (RequestFilter(status="5xx"), entry(status=500), entry(status=600)),
        (RequestFilter(status="404"), entry(status=404), entry(status=403)),
        (RequestFilter(status="2XX"), entry(status=204), entry(status=0)),
        (RequestFilter(method="GET", status="2xx"), entry(), entry(method="PUT")),
        (RequestFilter(grpc_status="NOT_FOUND"), entry(grpc="5"), entry(grpc="0")),
        (RequestFilter(grpc_status="not_found"), entry(grpc="5"), entry(grpc="14")),
        (RequestFilter(grpc_status="14"), entry(grpc="14"), entry(grpc="")),  # "": not gRPC
        (RequestFilter(grpc_status="error"), entry(grpc="7"), entry(grpc="0")),
        (RequestFilter(grpc_status="error"), entry(grpc="2"), entry(status=500)),
    ],
)
def test_filters(
    selected: RequestFilter, matched: dict[str, object], missed: dict[str, object]
) -> None:
    assert selected.matches(matched)
    assert not selected.matches(missed)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"status": "5x"}, "expected a status code such as 404 or a class such as 5xx"),
        ({"status": "600"}, "status '600'"),
        ({"status": "6xx"}, "status '6xx'"),
        ({"workload": "a/b/c"}, "expected NAME or NAMESPACE/NAME"),
        ({"source": "ns/"}, "source 'ns/'"),
        ({"path": "api"}, "expected a path prefix such as /api"),
        ({"grpc_status": "17"}, "expected a code 0-16, its name such as NOT_FOUND"),
        ({"grpc_status": "NOTFOUND"}, "grpc status 'NOTFOUND'"),
        ({"status": "NOT_FOUND"}, "a gRPC status is filtered apart: grpc_status"),
    ],
)
def test_bad_filters_say_what_is_expected(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(FilterError, match=message.replace("(", r"\(")):
        RequestFilter(**kwargs)


def refused(policy: str = "", dry_run: str = "") -> dict[str, object]:
    return {**entry(), "policy": policy, "dry_run_policy": dry_run}


@pytest.mark.parametrize(
    ("selected", "matched", "missed"),
    [
        # any rule of the policy, in any namespace or in the one given
        (RequestFilter(policy="no-admin"), refused("prod/no-admin:rules[1]"), refused()),
        (
            RequestFilter(policy="prod/no-admin"),
            refused("prod/no-admin:rules[0]"),
            refused("dev/no-admin:rules[0]"),
        ),
        (
            RequestFilter(policy="prod/no-admin:rules[1]"),
            refused("prod/no-admin:rules[1]"),
            refused("prod/no-admin:rules[0]"),
        ),
        # a dry-run policy that would have denied it, among others
        (
            RequestFilter(policy="strict"),
            refused(dry_run="prod/loose,prod/strict:rules[2]"),
            refused(dry_run="prod/stricter:rules[2]"),
        ),
        (RequestFilter(policy="no-allow-match"), refused("no-allow-match"), refused("x/y")),
        (RequestFilter(policy="web-limit"), refused("prod/web-limit"), entry()),  # RL
    ],
)
def test_the_policy_filter(
    selected: RequestFilter, matched: dict[str, object], missed: dict[str, object]
) -> None:
    assert selected.matches(matched)
    assert not selected.matches(missed)


@pytest.mark.parametrize("bad", ["", "a/b/c", "ns/", "name:rules[1]", "ns/name:rules[x]"])
def test_a_policy_filter_that_names_no_policy_is_refused(bad: str) -> None:
    with pytest.raises(FilterError, match="expected NAME, NAMESPACE/NAME or NAMESPACE/NAME:rules"):
        RequestFilter(policy=bad)


def test_a_filter_travels_as_a_query() -> None:
    selected = RequestFilter(workload="web", method="GET", status="5xx", policy="ns/p")
    assert selected.query() == {
        "workload": "web",
        "method": "GET",
        "status": "5xx",
        "policy": "ns/p",
    }
    assert RequestFilter.from_query({**selected.query(), "since": "3"}) == selected
    assert parse_status("5xx") == (500, 600)


def test_the_sampler_keeps_errors_and_denials_and_samples_the_rest() -> None:
    draws = iter([0.05, 0.5, 0.09, 0.99])
    sampler = RequestSampler(0.1, draw=lambda: next(draws))
    assert [sampler.keep(rec()) for _ in range(4)] == [True, False, True, False]
    never = RequestSampler(0.0, draw=lambda: 0.0)
    assert not never.keep(rec())
    for always in (
        rec(status=500),
        rec(status=503),
        rec(status=403, flags="RBAC"),
        rec(flags="DC"),
        # allowed, but a dry-run policy would have denied it: the line a policy's trial wants
        replace(rec(), dry_run_policy="default/no-admin"),
    ):
        assert never.keep(always)
    assert RequestSampler().keep(rec())


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
def test_a_sample_rate_outside_0_to_1_is_refused(rate: float) -> None:
    with pytest.raises(SampleRateError, match="expected a fraction of requests to log between 0"):
        RequestSampler(rate)


def test_metrics_log_sampled_requests_and_tap_every_one(caplog: pytest.LogCaptureFixture) -> None:
    registry = Registry()
    component = TelemetryComponent(
        store=make_store(), address=("127.0.0.1", 0), sources=AgentSources(), access_log_sample=0
    )
    registry.request_observers.append(component.http)
    conn = inbound()
    with caplog.at_level(logging.INFO, logger="nodemesh.access"):
        registry.request_done(conn, rec("/ok"))
        registry.request_done(conn, rec("/bad", 502, flags="UC"))
        registry.request_done(conn, rec("/denied", 403, flags="RBAC"))
    lines = [json.loads(r.getMessage()) for r in caplog.records]
    assert [line["path"] for line in lines] == ["/bad", "/denied"]
    assert lines[0]["source_identity"] == CLIENT_ID and lines[0]["grpc_status"] == ""
    assert paths(component.http.tap.since(0).entries) == ["/ok", "/bad", "/denied"]
    assert conn.requests == 3


def test_requests_a_viewer_missed_are_counted_in_a_metric() -> None:
    registry = Registry()
    metrics = HttpMetrics(make_store(), tap=RequestRing(2))
    registry.request_observers.append(metrics)
    for path in ("/1", "/2", "/3", "/4", "/5"):
        registry.request_done(inbound(), rec(path))
    assert metrics.tap.since(0).missed == 3
    families = {f.name: f for f in metrics.collect()}
    (sample,) = families["nodemesh_tap_missed_requests"].samples
    assert sample.value == 3


def test_the_ring_shows_the_policy_that_refused_a_request() -> None:
    """``/requests`` and ``nodemesh requests`` read the ring: a refusal names its policy (and
    a dry-run policy's would-deny), an allowed request has neither field."""
    ring = RequestRing(4)
    ring.add(inbound(), rec("/ok"), LABELS)
    denied = replace(rec("/admin", 403, flags="RBAC"), policy="default/no-admin")
    ring.add(inbound(), denied, LABELS)
    ring.add(inbound(), replace(rec("/try"), dry_run_policy="default/strict"), LABELS)
    ok, refused, tried = ring.since(0).entries
    assert "policy" not in ok and "dry_run_policy" not in ok
    assert (refused["response_flags"], refused["policy"]) == ("RBAC", "default/no-admin")
    assert (tried["response_flags"], tried["dry_run_policy"]) == ("-", "default/strict")
