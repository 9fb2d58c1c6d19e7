"""Traces: a span per HTTP request (and optionally per TCP connection), exported over OTLP.

With ``nodemesh agent --otlp-endpoint URL`` the agent is a ``RequestObserver``: every request the
HTTP layer reports (``RequestRecord``) becomes one span, built after the request ended (its
start is the record's wall-clock ``started_at``, its end that plus the duration), so nothing is
added to the request's own path but the observer call. The span joins the caller's trace when
the request carried W3C ``traceparent``/``tracestate`` or B3 headers (W3C wins when both are
there), else it starts a trace. Its kind is SERVER when the reporter is the destination node,
CLIENT when it is the source node (an outbound record). Attributes are OpenTelemetry's HTTP
conventions (``http.request.method``, ``url.path``, ``server.address``,
``http.response.status_code``, ``rpc.grpc.status_code``) plus the mesh's view under
``nodemesh.*`` with Istio's metric label names (``source_principal``, ``destination_workload``,
``response_flags``, ``reporter``, ...), so a span and its ``istio_requests_total`` series read
alike. With ``--trace-tcp``, every closed connection is a span too (its bytes, mTLS, failure).

Sampling (``--trace-sample RATE``) is OpenTelemetry's parent-based ratio: a request whose caller
sent a sampled (or unsampled) context follows the caller's decision, so a trace is whole or
absent; a request that starts a trace is kept with probability RATE, by trace id.

The proxy does not rewrite the trace headers it forwards (the HTTP layer passes them untouched),
so the workload's own span is a sibling of this span under the caller's, not its child.

A slow or absent collector never slows the data path: spans go to a bounded queue and are
exported by a thread (``agent.telemetry.traceexport``); what could not be queued or exported is
counted on ``/metrics``. The agent starts and serves whether the collector is there or not.
The queue bounds spans by count; what a span holds is bounded too: its name and every
attribute value at most ``MAX_TEXT`` characters (the SDK's ``SpanLimits``), since the path,
authority and request id are the client's, up to the head limit (60 KiB each on HTTP/1.1, so a
full queue of 2,048 spans could otherwise hold 120 MiB of them while the collector is away).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagators.b3 import B3MultiFormat
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from agent.base.component import Component
from agent.base.promtext import Collector, CounterMetricFamily, GaugeMetricFamily
from agent.state import StateStore
from agent.telemetry.labels import TcpLabels, endpoint_services, host_of, tcp_labels
from agent.telemetry.records import OUTBOUND, ConnectionRecord, RequestRecord
from agent.telemetry.traceexport import BoundedBatchProcessor, rate_limit_logger
from agent.telemetry.tracesettings import TraceSettings

EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
SERVICE_NAME = "nodemesh"
EXPORT_TIMEOUT = 5.0  # seconds per export request, retries included (the SDK's default is 10)
STOP_TIMEOUT = 2.0  # seconds the agent waits at exit for queued spans to be exported
MAX_TEXT = 1024  # characters of a span's name and of each attribute value kept

SPANS_DROPPED = "nodemesh_trace_spans_dropped_total"
SPANS_EXPORTED = "nodemesh_trace_spans_exported_total"
SPANS_FAILED = "nodemesh_trace_spans_failed_total"
EXPORT_FAILURES = "nodemesh_trace_export_failures_total"
QUEUED = "nodemesh_trace_spans_queued"

_B3 = B3MultiFormat()
_W3C = TraceContextTextMapPropagator()


def parent_context(headers: tuple[tuple[str, str], ...]) -> Context | None:
    """The caller's span as a context to parent on (W3C over B3), or None: a new trace."""
    if not headers:
        return None
    carrier = dict(headers)
    context = _W3C.extract(carrier, _B3.extract(carrier))
    span = trace.get_current_span(context)
    return context if span.get_span_context().is_valid else None


# The labels a span carries: who talked to whom (the metrics' other labels derive from these).
SPAN_LABELS = (
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
)


def _mesh_attributes(labels: TcpLabels) -> dict[str, AttributeValue]:
    values = labels._asdict()
    return {f"nodemesh.{name}": values[name] for name in SPAN_LABELS}


def request_attributes(
    connection: ConnectionRecord, request: RequestRecord, labels: TcpLabels
) -> dict[str, AttributeValue]:
    """The attributes of a request's span."""
    attrs: dict[str, AttributeValue] = {
        "http.request.method": request.method,
        "url.path": request.path,
        "server.address": request.authority,
        "client.address": host_of(connection.source),
        "http.request.body.size": request.request_bytes,
        "http.response.body.size": request.response_bytes,
        **_mesh_attributes(labels),
        "nodemesh.response_flags": request.response_flags,
        "nodemesh.request_id": request.request_id,
    }
    if request.status:
        attrs["http.response.status_code"] = request.status
    if request.grpc_status.isdigit():
        attrs["rpc.grpc.status_code"] = int(request.grpc_status)
    return attrs


def request_kind(connection: ConnectionRecord) -> SpanKind:
    return SpanKind.CLIENT if connection.direction == OUTBOUND else SpanKind.SERVER


def request_failed(request: RequestRecord, kind: SpanKind) -> bool:
    """OpenTelemetry's rule: 5xx fails a server span, 4xx and 5xx a client span; no response
    at all (status 0: the client left, the pod failed) fails both; so does a gRPC error."""
    bound = 400 if kind is SpanKind.CLIENT else 500
    grpc_error = request.grpc_status.isdigit() and request.grpc_status != "0"
    return request.status == 0 or request.status >= bound or grpc_error


def connection_attributes(record: ConnectionRecord, labels: TcpLabels) -> dict[str, AttributeValue]:
    """The attributes of a TCP connection's span (``--trace-tcp``)."""
    return {
        "client.address": host_of(record.source),
        "server.address": host_of(record.destination),
        "network.transport": "tcp",
        **_mesh_attributes(labels),
        "nodemesh.response_flags": labels.response_flags,
        "nodemesh.bytes_sent": record.bytes_sent,
        "nodemesh.bytes_received": record.bytes_received,
        "nodemesh.path": record.path,
        "nodemesh.failure": record.failure or "-",
    }


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class Tracing(Component, Collector):
    """The agent's tracer: a ``RequestObserver`` (and, with ``tcp``, a ``ConnectionObserver``),
    a component (the export thread's life cycle) and a collector of its own counters."""

    name = "traces"

    def __init__(
        self,
        settings: TraceSettings,
        store: StateStore,
        node: str,
        *,
        exporter: SpanExporter | None = None,
    ) -> None:
        self.settings = settings
        self._store = store
        self._endpoints: tuple[int, Mapping[str, str]] = (-1, {})
        if exporter is None:
            rate_limit_logger(EXPORTER_LOGGER)
            exporter = OTLPSpanExporter(endpoint=settings.endpoint, timeout=EXPORT_TIMEOUT)
        self.processor = BoundedBatchProcessor(
            exporter,
            queue_size=settings.queue_size,
            batch_size=settings.batch_size,
            delay=settings.delay,
            target=settings.endpoint,
        )
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": SERVICE_NAME, "k8s.node.name": node}),
            sampler=ParentBased(TraceIdRatioBased(settings.sample_rate)),
            shutdown_on_exit=False,  # ``stop`` shuts it down; no atexit hook per tracer
            span_limits=SpanLimits(max_span_attribute_length=MAX_TEXT),
        )
        self.provider.add_span_processor(self.processor)
        self._tracer = self.provider.get_tracer("nodemesh")

    # -- Component -----------------------------------------------------------------------------
    async def start(self) -> None:
        self.processor.start()

    def degraded(self) -> list[str]:
        since = self.processor.failing_since
        if since is None:
            return []
        ago = time.monotonic() - since
        return [
            f"traces: export to {self.settings.endpoint} failing for {ago:.0f}s "
            f"({self.processor.failed} spans lost); requests are served, spans are not kept"
        ]

    async def stop(self) -> None:
        await asyncio.to_thread(self.processor.shutdown, STOP_TIMEOUT)
        self.provider.shutdown()

    # -- RequestObserver -----------------------------------------------------------------------
    def requested(self, connection: ConnectionRecord, request: RequestRecord) -> None:
        kind = request_kind(connection)
        end = time.time()
        start = request.started_at or end - request.duration_ms / 1000
        span = self._tracer.start_span(
            f"{request.method} {request.authority or '-'}"[:MAX_TEXT],
            context=parent_context(request.trace_headers),
            kind=kind,
            start_time=_ns(start),
        )
        if span.is_recording():  # sampled: only then are the attributes worth building
            span.set_attributes(request_attributes(connection, request, self._labels(connection)))
            if request_failed(request, kind):
                span.set_status(Status(StatusCode.ERROR, request.response_flags))
        span.end(end_time=_ns(start + request.duration_ms / 1000))

    def rejected(self, cause: str) -> None:
        return  # a refused request is not a span: it is counted by HttpMetrics

    def would_deny(self, policy: str) -> None:
        return

    # -- ConnectionObserver (--trace-tcp) ------------------------------------------------------
    def opened(self, record: ConnectionRecord) -> None:
        return

    def closed(self, record: ConnectionRecord) -> None:
        labels = self._labels(record)
        span = self._tracer.start_span(
            f"tcp {labels.destination_service}",
            kind=request_kind(record),
            start_time=_ns(record.started),
        )
        if span.is_recording():
            span.set_attributes(connection_attributes(record, labels))
            if record.failure:
                span.set_status(Status(StatusCode.ERROR, record.failure))
        span.end()

    # -- collector -----------------------------------------------------------------------------
    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        p = self.processor
        for name, doc, value in (
            (SPANS_DROPPED, "Spans dropped because the export queue was full", p.dropped),
            (SPANS_EXPORTED, "Spans the OTLP collector accepted", p.exported),
            (SPANS_FAILED, "Spans in batches that could not be exported", p.failed),
            (EXPORT_FAILURES, "OTLP export requests that failed", p.failed_batches),
        ):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            yield family
        queued = GaugeMetricFamily(QUEUED, "Spans waiting to be exported")
        queued.add_metric([], p.queued())
        yield queued

    def _labels(self, connection: ConnectionRecord) -> TcpLabels:
        snap = self._store.snapshot()
        if self._endpoints[0] != snap.version:
            self._endpoints = (snap.version, endpoint_services(snap))
        return tcp_labels(connection, snap, self._endpoints[1])
