"""An OTLP/HTTP trace receiver for tests: what a collector would be, on a socket the test made.

It decodes each ``POST /v1/traces`` body (``ExportTraceServiceRequest``, protobuf) with the
``opentelemetry-proto`` package that ships with the exporter, keeps every span with its
resource's attributes, and answers an empty ``ExportTraceServiceResponse``. The socket is
passed in, so a lab test can create it inside a lab namespace (``agent.lab.netns.call_in``)
and serve it from the test process.
"""

from __future__ import annotations

import gzip
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

KIND_SERVER = 2  # opentelemetry.proto.trace.v1.Span.SpanKind
KIND_CLIENT = 3


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str  # hex
    span_id: str
    parent_span_id: str  # "" for a root span
    kind: int
    start_ns: int  # wall clock, nanoseconds since the epoch
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    return getattr(value, which) if which else None


class OtlpReceiver:
    """Serves ``sock`` (bound, not yet listening) until ``close()``; ``spans`` grows."""

    def __init__(self, sock: socket.socket) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                receiver._keep(ExportTraceServiceRequest.FromString(body))
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(sock.getsockname()[:2], Handler, bind_and_activate=False)
        self._server.socket.close()
        self._server.socket = sock
        self._server.server_address = sock.getsockname()[:2]
        sock.listen(16)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @classmethod
    def on_loopback(cls) -> OtlpReceiver:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        return cls(sock)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1/traces"

    def _keep(self, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    found.append(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            resource=resource,
                        )
                    )
        with self._lock:
            self.requests += 1
            self.spans.extend(found)

    def received(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)

    def close(self) -> None:
        """Stop serving and close the socket: the address refuses connections afterwards."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
