"""Spans per request and their export queue (agent.telemetry.traces, agent.telemetry.traceexport),
fed through a real proxy registry into the SDK's in-memory exporter: no collector, no sockets."""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from agent.config import ConfigError, add_arguments, from_args
from agent.proxy.http1 import Http1Proxy, Verdict
from agent.proxy.records import Registry
from agent.telemetry import records
from agent.telemetry.agentmetrics import AgentSources
from agent.telemetry.component import TelemetryComponent
from agent.telemetry.records import INBOUND, ConnectionRecord, RequestRecord
from agent.telemetry.traceexport import LOG_EVERY, BoundedBatchProcessor
from agent.telemetry.traces import MAX_TEXT, Tracing
from agent.telemetry.tracesettings import TraceSettings
from tests.unit.telemetry.telemetry_helpers import (
    CLIENT_ID,
    SERVER_ID,
    inbound,
    make_store,
    outbound,
    samples,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
STARTED = 1_700_000_000.25


def tracing(
    exporter: SpanExporter | None = None, *, rate: float = 1.0, queue: int = 64, tcp: bool = False
) -> tuple[Registry, Tracing, InMemorySpanExporter | SpanExporter]:
    exporter = exporter or InMemorySpanExporter()
    settings = TraceSettings(
        "http://127.0.0.1:4318/v1/traces", rate, tcp, queue_size=queue, batch_size=min(8, queue)
    )
    tracer = Tracing(settings, make_store(), "node2", exporter=exporter)
    registry = Registry()
    registry.request_observers.append(tracer)
    if tcp:
        registry.observers.append(tracer)
    return registry, tracer, exporter


def request(
    trace: tuple[tuple[str, str], ...] = (), status: int = 200, flags: str = "-", grpc: str = ""
) -> RequestRecord:
    return RequestRecord(
        "GET", "/items/42", "server:80", status, 12.5, 10, 2000, flags, "rid-7",
        trace_headers=trace, started_at=STARTED, grpc_status=grpc,
    )  # fmt: skip


def exported(tracer: Tracing, exporter: InMemorySpanExporter | SpanExporter) -> list[ReadableSpan]:
    tracer.processor.start()
    assert tracer.processor.force_flush(10_000)
    assert isinstance(exporter, InMemorySpanExporter)
    return list(exporter.get_finished_spans())


@pytest.fixture(autouse=True)
def _stop_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every export thread a test starts is stopped when it ends, also on failure."""
    started: list[BoundedBatchProcessor] = []
    original = BoundedBatchProcessor.start

    def start(self: BoundedBatchProcessor) -> None:
        started.append(self)
        original(self)

    monkeypatch.setattr(BoundedBatchProcessor, "start", start)
    yield
    for processor in started:
        processor.shutdown(timeout=5)


def test_a_request_span_joins_the_callers_trace_with_identities_and_http_attributes() -> None:
    registry, tracer, exporter = tracing()
    trace = (("traceparent", TRACEPARENT), ("tracestate", "vendor=abc"))
    registry.request_done(inbound(), request(trace))
    (span,) = exported(tracer, exporter)
    assert span.context is not None and span.parent is not None
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert f"{span.parent.span_id:016x}" == PARENT_ID and span.parent.is_remote
    assert span.context.span_id != span.parent.span_id
    assert span.context.trace_state.get("vendor") == "abc"
    assert span.kind is SpanKind.SERVER
    assert span.name == "GET server:80"
    assert (span.start_time, span.end_time) == (
        int(STARTED * 1e9),
        int((STARTED + 0.0125) * 1e9),
    )
    assert dict(span.attributes or {}) == {
        "http.request.method": "GET",
        "url.path": "/items/42",
        "server.address": "server:80",
        "client.address": "10.244.1.2",
        "http.request.body.size": 10,
        "http.response.body.size": 2000,
        "http.response.status_code": 200,
        "nodemesh.reporter": "destination",
        "nodemesh.source_workload": "client",
        "nodemesh.source_workload_namespace": "default",
        "nodemesh.source_principal": CLIENT_ID,
        "nodemesh.source_app": "client",
        "nodemesh.destination_service": "server.default.svc.cluster.local",
        "nodemesh.destination_workload": "server",
        "nodemesh.destination_workload_namespace": "default",
        "nodemesh.destination_principal": SERVER_ID,
        "nodemesh.connection_security_policy": "mutual_tls",
        "nodemesh.response_flags": "-",
        "nodemesh.request_id": "rid-7",
    }
    assert span.status.status_code is StatusCode.UNSET
    assert span.resource.attributes["service.name"] == "nodemesh"
    assert span.resource.attributes["k8s.node.name"] == "node2"


def test_what_a_span_holds_of_the_clients_text_is_bounded() -> None:
    """Path, authority and request id come from the client, up to the head limit; a span
    keeps at most ``MAX_TEXT`` characters of its name and of each attribute."""
    registry, tracer, exporter = tracing()
    long = replace(
        request(), path="/" + "p" * 60_000, authority="a" * 20_000, request_id="r" * 9_000
    )
    registry.request_done(inbound(), long)
    registry.request_done(inbound(), request())
    cut, usual = exported(tracer, exporter)
    attrs = dict(cut.attributes or {})
    assert attrs["url.path"] == "/" + "p" * (MAX_TEXT - 1)
    assert attrs["server.address"] == "a" * MAX_TEXT
    assert attrs["nodemesh.request_id"] == "r" * MAX_TEXT
    assert cut.name == ("GET " + "a" * MAX_TEXT)[:MAX_TEXT]
    assert all(len(v) <= MAX_TEXT for v in attrs.values() if isinstance(v, str))
    assert usual.name == "GET server:80" and dict(usual.attributes or {})["url.path"] == "/items/42"


def test_without_trace_headers_a_request_starts_a_trace() -> None:
    registry, tracer, exporter = tracing()
    registry.request_done(inbound(), request())
    registry.request_done(inbound(), request())
    first, second = exported(tracer, exporter)
    assert first.parent is None and second.parent is None
    assert first.context is not None and second.context is not None
    assert first.context.trace_id != second.context.trace_id


def test_b3_headers_are_joined_and_w3c_wins_when_both_are_sent() -> None:
    registry, tracer, exporter = tracing()
    b3_trace, b3_span = "80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1"
    registry.request_done(inbound(), request((("b3", f"{b3_trace}-{b3_span}-1"),)))
    multi = (("x-b3-traceid", b3_trace), ("x-b3-spanid", b3_span), ("x-b3-sampled", "1"))
    registry.request_done(inbound(), request(multi))
    registry.request_done(inbound(), request((*multi, ("traceparent", TRACEPARENT))))
    single, multiple, both = exported(tracer, exporter)
    for span in (single, multiple):
        assert span.context is not None and span.parent is not None
        assert (f"{span.context.trace_id:032x}", f"{span.parent.span_id:016x}") == (
            b3_trace,
            b3_span,
        )
    assert both.context is not None and both.parent is not None
    assert (f"{both.context.trace_id:032x}", f"{both.parent.span_id:016x}") == (
        TRACE_ID,
        PARENT_ID,
    )


def test_a_malformed_traceparent_starts_a_new_trace() -> None:
    registry, tracer, exporter = tracing()
    registry.request_done(inbound(), request((("traceparent", "00-abc-def-01"),)))
    (span,) = exported(tracer, exporter)
    assert span.parent is None


def test_the_source_node_reports_client_spans_and_errors_follow_the_kind() -> None:
    registry, tracer, exporter = tracing()
    registry.request_done(outbound(), request(status=404))
    registry.request_done(inbound(), request(status=404))
    registry.request_done(inbound(), request(status=503, flags="UC"))
    registry.request_done(inbound(), request(status=200, grpc="14"))
    registry.request_done(inbound(), request(status=0, flags="DC"))
    client, server_404, server_503, grpc, gone = exported(tracer, exporter)
    assert client.kind is SpanKind.CLIENT
    assert (client.attributes or {})["nodemesh.reporter"] == "source"
    assert client.status.status_code is StatusCode.ERROR  # 4xx fails a client span
    assert server_404.kind is SpanKind.SERVER
    assert server_404.status.status_code is StatusCode.UNSET  # ... not a server span
    assert server_503.status.status_code is StatusCode.ERROR
    assert server_503.status.description == "UC"
    assert (grpc.attributes or {})["rpc.grpc.status_code"] == 14
    assert grpc.status.status_code is StatusCode.ERROR
    assert "http.response.status_code" not in (gone.attributes or {})
    assert gone.status.status_code is StatusCode.ERROR


def test_sampling_keeps_new_traces_at_the_rate_and_follows_the_callers_decision() -> None:
    registry, tracer, exporter = tracing(rate=0.0)
    registry.request_done(inbound(), request())  # a new trace: rate 0 drops it
    registry.request_done(inbound(), request((("traceparent", TRACEPARENT),)))  # sampled: kept
    (span,) = exported(tracer, exporter)
    assert span.context is not None and f"{span.context.trace_id:032x}" == TRACE_ID

    registry, tracer, exporter = tracing(rate=1.0)
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"
    registry.request_done(inbound(), request((("traceparent", unsampled),)))
    assert exported(tracer, exporter) == []


def test_a_full_queue_drops_new_spans_counts_them_on_metrics_and_does_not_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry, tracer, exporter = tracing(queue=3)  # the export thread is not started yet
    component = TelemetryComponent(
        store=make_store(), address=("127.0.0.1", 0), sources=AgentSources()
    )
    component.registry.register(tracer)
    with caplog.at_level(logging.DEBUG):
        for _ in range(7):
            registry.request_done(inbound(), request())
    assert caplog.records == []
    parsed = samples(component.exposition())
    assert parsed[("nodemesh_trace_spans_dropped_total", frozenset())] == 4
    assert parsed[("nodemesh_trace_spans_queued", frozenset())] == 3
    assert len(exported(tracer, exporter)) == 3
    parsed = samples(component.exposition())
    assert parsed[("nodemesh_trace_spans_exported_total", frozenset())] == 3
    assert parsed[("nodemesh_trace_spans_queued", frozenset())] == 0


class Blocked(SpanExporter):
    """A collector that does not answer until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.exported = threading.Event()  # an export returned (its spans counted)
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait()
        self.spans += len(spans)
        self.exported.set()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


def test_a_stuck_collector_never_blocks_requests_the_queue_bounds_memory() -> None:
    exporter = Blocked()
    registry, tracer, _ = tracing(exporter, queue=4)
    tracer.processor.start()
    try:
        registry.request_done(inbound(), request())
        assert exporter.entered.wait(10)  # the thread holds one span in a stuck export
        for _ in range(10):  # each returns at once although the collector does not answer
            registry.request_done(inbound(), request())
        assert (tracer.processor.queued(), tracer.processor.dropped) == (4, 6)
    finally:
        exporter.release.set()
    assert tracer.processor.force_flush(10_000)
    assert exporter.spans == 5 and tracer.processor.exported == 5


class Refusing(SpanExporter):
    def __init__(self, raises: bool = False) -> None:
        self.raises = raises
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        if self.raises:
            raise ConnectionError("connection refused")
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        return


@pytest.mark.parametrize("raises", [False, True])
def test_export_failures_are_counted_logged_once_per_interval_and_reported_degraded(
    raises: bool, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = Refusing(raises)
    registry, tracer, _ = tracing(exporter)
    now = [1000.0]
    tracer.processor._clock = lambda: now[0]
    tracer.processor.start()
    with caplog.at_level(logging.WARNING, logger="agent.telemetry.traceexport"):
        for _ in range(3):
            registry.request_done(inbound(), request())
            assert tracer.processor.force_flush(10_000)
        now[0] += LOG_EVERY
        registry.request_done(inbound(), request())
        assert tracer.processor.force_flush(10_000)
    assert exporter.calls == 4
    assert (tracer.processor.failed, tracer.processor.failed_batches) == (4, 4)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "1 span batch(es) could not be exported to http://127.0.0.1:4318/v1/traces" in lines[0]
    assert "3 span batch(es)" in lines[1]  # the three since the first line
    (reason,) = tracer.degraded()
    assert "traces: export to http://127.0.0.1:4318/v1/traces failing" in reason


def test_tcp_connections_become_spans_with_trace_tcp() -> None:
    registry, tracer, exporter = tracing(tcp=True)
    record = outbound()
    record.bytes_sent, record.bytes_received = 100, 2000
    registry.remove(registry.add(record, lambda _reason: None))
    failed = ConnectionRecord(INBOUND, "10.244.1.2:5555", "10.244.2.2:8080")
    failed.failure = "policy_denied"
    registry.remove(registry.add(failed, lambda _reason: None))
    ok, denied = exported(tracer, exporter)
    assert ok.kind is SpanKind.CLIENT and ok.name == "tcp server.default.svc.cluster.local"
    attrs = dict(ok.attributes or {})
    assert attrs["nodemesh.bytes_sent"] == 100 and attrs["nodemesh.bytes_received"] == 2000
    assert attrs["nodemesh.source_principal"] == CLIENT_ID
    assert attrs["nodemesh.response_flags"] == "-"
    assert ok.status.status_code is StatusCode.UNSET
    assert denied.kind is SpanKind.SERVER
    assert (denied.attributes or {})["nodemesh.response_flags"] == "DENY"
    assert denied.status.status_code is StatusCode.ERROR


def test_the_http_layer_records_the_trace_headers_of_each_request() -> None:
    proxy = Http1Proxy(authorize=lambda _h: Verdict(True))
    proxy.receive_client(
        b"GET / HTTP/1.1\r\nHost: s\r\nTraceparent: " + TRACEPARENT.encode() + b"\r\n"
        b"tracestate: a=1\r\nX-B3-Sampled: 1\r\nx-other: no\r\n\r\n"
    )
    proxy.receive_upstream(b"HTTP/1.1 204 No Content\r\n\r\n")
    (done,) = proxy.take_completed()
    assert done.head.trace == (
        ("traceparent", TRACEPARENT),
        ("tracestate", "a=1"),
        ("x-b3-sampled", "1"),
    )


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"host", b"s"), (b"x-request-id", b"r1")],  # the usual head: no trace context
        [(b"traceparent", TRACEPARENT.encode())],
        [(b"host", b"s"), (b"b3", b"1-2-1"), (b"x-other", b"no"), (b"tracestate", b"a=\xe9")],
        [(b"x-b3-traceid", b"1"), (b"x-b3-spanid", b"2"), (b"x-b3-flags", b"1"), (b"b3", b"0")],
    ],
)
def test_trace_headers_are_the_trace_context_fields_in_order(
    headers: list[tuple[bytes, bytes]],
) -> None:
    expected = tuple(
        (n.decode(), v.decode("latin-1")) for n, v in headers if n in records.TRACE_HEADERS
    )
    assert records.trace_headers_of(headers) == expected
    assert records.trace_headers_of(tuple(headers)) == expected


def parse(*argv: str) -> TraceSettings | None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(["--node", "n", "--in-cluster", *argv])).traces


def test_trace_flags_are_validated_and_a_bare_collector_address_gets_the_traces_path() -> None:
    assert parse() is None
    settings = parse("--otlp-endpoint", "http://collector:4318", "--trace-sample", "0.25")
    assert settings == TraceSettings("http://collector:4318/v1/traces", 0.25)
    assert parse("--otlp-endpoint", "https://tempo/otlp/v1/traces", "--trace-tcp") == (
        TraceSettings("https://tempo/otlp/v1/traces", 1.0, tcp=True)
    )
    for argv, message in (
        (("--otlp-endpoint", "collector:4318"), "expected an http.s. URL"),
        (("--otlp-endpoint", "http://collector:99999"), "--otlp-endpoint"),
        (("--otlp-endpoint", "http://c:4318", "--trace-sample", "1.5"), "between 0 and 1"),
        (("--otlp-endpoint", "https://u:secret@tempo"), "OTEL_EXPORTER_OTLP_TRACES_HEADERS"),
        (("--trace-sample", "0.5"), "need --otlp-endpoint"),
        (("--trace-tcp",), "need --otlp-endpoint"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse(*argv)


def test_stopping_with_a_stuck_collector_returns_and_shuts_the_exporter_once() -> None:
    class Counted(Blocked):
        shutdowns = 0

        def shutdown(self) -> None:
            self.shutdowns += 1
            super().shutdown()

    exporter = Counted()
    registry, tracer, _ = tracing(exporter)
    asyncio.run(tracer.start())
    registry.request_done(inbound(), request())
    assert exporter.entered.wait(10)  # the export thread is stuck in the collector
    asyncio.run(tracer.stop())  # waits STOP_TIMEOUT, then shuts the exporter (releasing it)
    # The released export ends on its own thread, which stop() no longer waits for.
    assert exporter.exported.wait(10)
    assert exporter.shutdowns == 1 and exporter.spans == 1
