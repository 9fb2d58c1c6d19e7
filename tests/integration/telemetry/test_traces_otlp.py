"""The real OTLP/HTTP exporter against a receiver on loopback (tests/otlp.py): spans arrive
as protobuf with their parent and attributes; with nothing listening, requests are still
observed at once and the failed exports are counted."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from agent.proxy.records import Registry
from agent.telemetry.records import RequestRecord
from agent.telemetry.traces import Tracing
from agent.telemetry.tracesettings import TraceSettings
from tests.otlp import KIND_SERVER, OtlpReceiver
from tests.unit.telemetry.telemetry_helpers import CLIENT_ID, SERVER_ID, inbound, make_store

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


def record(traceparent: str) -> RequestRecord:
    return RequestRecord(
        "POST", "/orders", "server:80", 201, 4.0, 120, 30, "-", "rid-1",
        trace_headers=(("traceparent", traceparent),), started_at=1_750_000_000.0,
    )  # fmt: skip


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver.on_loopback()
    try:
        yield server
    finally:
        server.close()


def tracer(endpoint: str) -> tuple[Registry, Tracing]:
    settings = TraceSettings(endpoint, batch_size=2, queue_size=16, delay=0.05)
    tracing = Tracing(settings, make_store(), "node2")
    registry = Registry()
    registry.request_observers.append(tracing)
    tracing.processor.start()
    return registry, tracing


def test_spans_reach_an_otlp_receiver_with_the_callers_parent(receiver: OtlpReceiver) -> None:
    registry, tracing = tracer(receiver.url)
    try:
        for _ in range(3):
            registry.request_done(inbound(), record(f"00-{TRACE_ID}-{PARENT_ID}-01"))
        assert tracing.processor.force_flush(30_000)
    finally:
        tracing.processor.shutdown()
    spans = receiver.received()
    assert len(spans) == 3 and 2 <= receiver.requests <= 3  # in batches of at most two
    for span in spans:
        assert (span.trace_id, span.parent_span_id, span.kind) == (TRACE_ID, PARENT_ID, KIND_SERVER)
        assert span.name == "POST server:80"
        assert span.attributes["nodemesh.source_principal"] == CLIENT_ID
        assert span.attributes["nodemesh.destination_principal"] == SERVER_ID
        assert span.attributes["http.response.status_code"] == 201
        assert span.resource["service.name"] == "nodemesh"
    assert len({s.span_id for s in spans}) == 3
    assert (tracing.processor.exported, tracing.processor.failed) == (3, 0)


def test_with_no_collector_requests_are_observed_and_failed_exports_counted() -> None:
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    registry, tracing = tracer(f"http://127.0.0.1:{port}/v1/traces")
    try:
        for _ in range(4):
            registry.request_done(inbound(), record(f"00-{TRACE_ID}-{PARENT_ID}-01"))
        assert tracing.processor.force_flush(60_000)
    finally:
        tracing.processor.shutdown()
    assert tracing.processor.exported == 0
    assert tracing.processor.failed == 4 and tracing.processor.failed_batches >= 2
    assert tracing.degraded()
