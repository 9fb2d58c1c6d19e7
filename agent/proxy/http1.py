"""The destination node's HTTP/1.1 layer: parse, authorize and forward requests, sans-IO.

Why sans-IO: framing and request-smuggling rules are where an HTTP proxy goes wrong, and they
must be tested byte for byte without sockets. ``Http1Proxy`` holds two h11 connections, the
client side (we are its server) and the upstream side (we are the pod's client, one upstream
connection per client connection). The shell (``agent.proxy.http_inbound``) feeds it bytes from
either side and writes out what it produced (``take_to_client``, ``take_to_upstream``); finished
requests come out as ``Exchange`` records for telemetry.

What it does per request:

* refuses what could be read two ways by two parsers (request smuggling): both
  ``Content-Length`` and ``Transfer-Encoding``, conflicting lengths, a transfer coding other
  than ``chunked`` (400, 501), a malformed request line or header (400), a head over
  ``max_head_bytes`` (431). Each refusal closes the connection and is named by its cause
  (``take_rejections``); a head that is not complete ``header_timeout`` after its first byte is
  the shell's to time out (``head_started``, ``header_timeout()``: 408);
* removes hop-by-hop headers (RFC 9110 7.6.1: ``Connection`` and what it lists,
  ``Keep-Alive``, ``Proxy-Connection``, ``TE`` except ``trailers``, ``Trailer``, ``Upgrade``
  unless the request asks for an upgrade); h11 re-frames the body itself (chunked or by length),
  so ``Transfer-Encoding: chunked`` and ``Content-Length`` reach the pod as framing only;
* adds ``x-request-id`` when absent (kept when present); trace headers pass untouched;
* asks ``authorize`` (L7 policy) with the request's method, path and host: a denied request is
  answered ``403 RBAC: access denied`` and its body discarded, and the connection keeps serving;
* ``Expect: 100-continue`` is passed to the pod, whose ``100 Continue`` is passed back;
* an upgrade (WebSocket) answered ``101`` switches the connection to an opaque tunnel
  (``tunnel``): what either side sent after the head is handed over, then the shell relays bytes.

An upstream that closes or garbles before its response head is answered 502 (flag ``UC``); after
it, the client connection is closed, as a client of Envoy would see.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import h11

from agent.telemetry.records import trace_headers_of

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
    }
)
DENIED_BODY = b"RBAC: access denied"
DEFAULT_MAX_HEAD_BYTES = 60 * 1024  # Envoy's default max_request_headers_kb is 60

# Causes of a refused request (``nodemesh_http_rejected_requests_total{cause}``).
MALFORMED = "malformed"
HEADERS_TOO_LARGE = "headers_too_large"
AMBIGUOUS_LENGTH = "ambiguous_length"
UNSUPPORTED_CODING = "unsupported_transfer_coding"
HEADER_TIMEOUT = "header_timeout"
UPSTREAM_PROTOCOL = "upstream_protocol_error"

# Envoy response flags as Istio labels them.
NO_FLAGS = "-"
RBAC_DENIED = "RBAC"
UPSTREAM_CLOSED = "UC"
DOWNSTREAM_CLOSED = "DC"


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What authorization and telemetry see of one request."""

    method: str
    path: str  # the target without its query
    host: str  # the Host header, as sent
    request_id: str
    trace: tuple[tuple[str, str], ...] = ()  # the trace-context headers sent (telemetry)
    # as received, for L7 ``request.headers`` conditions (not part of the head's identity)
    headers: Sequence[tuple[bytes, bytes]] = field(default=(), compare=False, repr=False)


@dataclass(slots=True)
class Exchange:
    """One request and its response, as telemetry reports it."""

    head: RequestHead
    started: float
    status: int = 0
    request_bytes: int = 0  # body bytes
    response_bytes: int = 0  # body bytes
    flags: str = NO_FLAGS
    denied_by: str | None = None  # the deciding policy (or reason) when refused by policy
    ended: float = 0.0


Authorize = Callable[[RequestHead], "Verdict"]


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    reason: str = ""


@dataclass
class _Current:
    exchange: Exchange
    denied: bool = False
    upgrade: bool = False
    response_started: bool = False


@dataclass
class Http1Proxy:
    authorize: Authorize
    clock: Callable[[], float] = time.monotonic
    new_request_id: Callable[[], str] = lambda: str(uuid.uuid4())
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES
    client: h11.Connection = field(init=False)
    upstream: h11.Connection = field(init=False)
    closing: bool = field(default=False, init=False)  # close the client once flushed
    tunnel: bool = field(default=False, init=False)  # switched protocols: relay raw bytes
    head_started: float | None = field(default=None, init=False)
    _to_client: bytearray = field(default_factory=bytearray, init=False)
    _to_upstream: bytearray = field(default_factory=bytearray, init=False)
    _completed: list[Exchange] = field(default_factory=list, init=False)
    _rejections: list[str] = field(default_factory=list, init=False)
    _current: _Current | None = field(default=None, init=False)
    _client_eof: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.client = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head_bytes)
        self.upstream = h11.Connection(h11.CLIENT, max_incomplete_event_size=self.max_head_bytes)

    # -- output ------------------------------------------------------------------------------
    def take_to_client(self) -> bytes:
        out = bytes(self._to_client)
        self._to_client.clear()
        return out

    def take_to_upstream(self) -> bytes:
        out = bytes(self._to_upstream)
        self._to_upstream.clear()
        return out

    def take_completed(self) -> list[Exchange]:
        out, self._completed = self._completed, []
        return out

    def take_rejections(self) -> list[str]:
        out, self._rejections = self._rejections, []
        return out

    # -- input -------------------------------------------------------------------------------
    def receive_client(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` is its end of stream."""
        if self.closing or self.tunnel:
            return
        if data and self.head_started is None and self._current is None:
            self.head_started = self.clock()
        if not data:
            self._client_eof = True
        self.client.receive_data(data)
        self._pump_client()

    def receive_upstream(self, data: bytes) -> None:
        """Bytes from the pod; ``b""`` is its end of stream."""
        if self.closing or self.tunnel:
            return
        self.upstream.receive_data(data)
        self._pump_upstream()

    def header_timeout(self) -> None:
        """The head did not complete in time: 408 and close (slowloris)."""
        self._refuse(408, HEADER_TIMEOUT)

    def upstream_failed(self) -> None:
        """The upstream connection broke (reset, unreachable)."""
        self._upstream_gone()

    # -- client side -------------------------------------------------------------------------
    def _pump_client(self) -> None:
        while not (self.closing or self.tunnel):
            try:
                event = self.client.next_event()
            except h11.RemoteProtocolError as e:
                if self._client_eof:  # the client went away mid-request: not bad input
                    if self._current is not None:
                        self._current.exchange.flags = DOWNSTREAM_CLOSED
                        self._finish(self._current)
                    self.closing = True
                else:
                    self._bad_request(e)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.head_started = None
                self._on_request(event)
            elif isinstance(event, h11.Data):
                self._on_request_data(event)
            elif isinstance(event, h11.EndOfMessage):
                self._on_request_end(event)
            elif isinstance(event, h11.ConnectionClosed):
                # A client that half-closed after its request still gets the response.
                if self._current is None or self.client.our_state is not h11.SEND_RESPONSE:
                    if self._current is not None:
                        self._current.exchange.flags = DOWNSTREAM_CLOSED
                        self._finish(self._current)
                    self.closing = True
                return

    def _bad_request(self, error: h11.RemoteProtocolError) -> None:
        hint = error.error_status_hint
        text = str(error).lower()
        if hint == 431:
            cause = HEADERS_TOO_LARGE
        elif hint == 501:
            cause = UNSUPPORTED_CODING
        elif "content-length" in text or "transfer-encoding" in text:
            cause = AMBIGUOUS_LENGTH
        else:
            cause = MALFORMED
        self._refuse(hint, cause)

    def _refuse(self, status: int, cause: str) -> None:
        """Answer a refused request (if the client may still get a response) and close."""
        self._rejections.append(cause)
        self.closing = True
        current, respond = self._current, self.client.our_state in (h11.IDLE, h11.SEND_RESPONSE)
        if current is not None:  # its body was bad: the request is reported with the refusal
            if respond:
                current.exchange.status = status
            self._finish(current)
        if respond:
            body = f"{cause.replace('_', ' ')}\n".encode()
            headers = [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            self._to_client += _raw_response(status, headers, body)

    def _on_request(self, req: h11.Request) -> None:
        names = [name for name, _ in req.headers]
        if b"transfer-encoding" in names and b"content-length" in names:
            self._refuse(400, AMBIGUOUS_LENGTH)
            return
        size = len(req.method) + len(req.target) + sum(len(n) + len(v) + 4 for n, v in req.headers)
        if size > self.max_head_bytes:
            self._refuse(431, HEADERS_TOO_LARGE)
            return
        headers, upgrade = _forwarded_headers(req.headers)
        request_id = _header(req.headers, b"x-request-id")
        if request_id is None:
            request_id = self.new_request_id()
            headers.append((b"x-request-id", request_id.encode()))
        target = req.target.decode("latin-1")
        head = RequestHead(
            method=req.method.decode("latin-1"),
            path=target.split("?", 1)[0].split("#", 1)[0],
            host=(_header(req.headers, b"host") or ""),
            request_id=request_id,
            trace=trace_headers_of(req.headers),
            headers=req.headers,
        )
        current = _Current(Exchange(head, self.clock()), upgrade=upgrade)
        self._current = current
        verdict = self.authorize(head)
        if not verdict.allowed:
            current.denied = True
            current.exchange.flags = RBAC_DENIED
            current.exchange.denied_by = verdict.reason
            self._deny(current)
            return
        self._to_upstream += self.upstream.send(
            h11.Request(method=req.method, target=req.target, headers=headers)
        )

    def _deny(self, current: _Current) -> None:
        headers = [
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(DENIED_BODY)).encode()),
        ]
        # A client waiting for 100-continue has not sent its body and may never: where the
        # next request would start is unknowable, so this response is the last.
        last = self.client.they_are_waiting_for_100_continue
        if last:
            headers.append((b"connection", b"close"))
        self._send_client(h11.Response(status_code=403, headers=headers, reason=b"Forbidden"))
        self._send_client(h11.Data(data=DENIED_BODY))
        self._send_client(h11.EndOfMessage())
        current.exchange.status = 403
        current.exchange.response_bytes = len(DENIED_BODY)
        current.response_started = True
        if last:
            self._finish(current)
            self.closing = True
            return
        self._maybe_next_cycle()

    def _on_request_data(self, event: h11.Data) -> None:
        current = self._current
        if current is None:
            return
        current.exchange.request_bytes += len(event.data)
        if not current.denied:
            self._to_upstream += self.upstream.send(h11.Data(data=event.data))

    def _on_request_end(self, event: h11.EndOfMessage) -> None:
        current = self._current
        if current is not None and not current.denied:
            trailers = [(n, v) for n, v in event.headers if n.lower() not in HOP_BY_HOP]
            self._to_upstream += self.upstream.send(h11.EndOfMessage(headers=trailers))
        self._maybe_next_cycle()

    # -- upstream side -----------------------------------------------------------------------
    def _pump_upstream(self) -> None:
        while not (self.closing or self.tunnel):
            try:
                event = self.upstream.next_event()
            except h11.RemoteProtocolError:
                self._rejections.append(UPSTREAM_PROTOCOL)
                self._upstream_gone()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.InformationalResponse):
                self._on_informational(event)
            elif isinstance(event, h11.Response):
                self._on_response(event)
            elif isinstance(event, h11.Data):
                if self._current is not None:
                    self._current.exchange.response_bytes += len(event.data)
                self._send_client(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                trailers = [(n, v) for n, v in event.headers if n.lower() not in HOP_BY_HOP]
                self._send_client(h11.EndOfMessage(headers=trailers))
                self._maybe_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                self._upstream_gone()
                return

    def _on_informational(self, event: h11.InformationalResponse) -> None:
        current = self._current
        if event.status_code == 101 and current is not None and current.upgrade:
            headers = [(n, v) for n, v in event.headers if n not in HOP_BY_HOP]
            headers += [(n, v) for n, v in event.headers if n in (b"connection", b"upgrade")]
            self._send_client(
                h11.InformationalResponse(status_code=101, headers=headers, reason=event.reason)
            )
            current.exchange.status = 101
            self._finish(current)
            self.tunnel = True
            self._to_client += self.upstream.trailing_data[0]
            self._to_upstream += self.client.trailing_data[0]
            return
        if event.status_code == 101:  # a 101 nobody asked for: the pod is broken
            self._rejections.append(UPSTREAM_PROTOCOL)
            self._upstream_gone()
            return
        headers = [(n, v) for n, v in event.headers if n not in HOP_BY_HOP]
        self._send_client(
            h11.InformationalResponse(
                status_code=event.status_code, headers=headers, reason=event.reason
            )
        )

    def _on_response(self, event: h11.Response) -> None:
        current = self._current
        headers, _ = _forwarded_headers(event.headers, keep_upgrade=False)
        if self.upstream.their_state is h11.MUST_CLOSE or _closes(event.headers):
            headers.append((b"connection", b"close"))
        if current is not None:
            current.exchange.status = event.status_code
            current.response_started = True
        self._send_client(
            h11.Response(status_code=event.status_code, headers=headers, reason=event.reason)
        )

    def _upstream_gone(self) -> None:
        current = self._current
        if current is not None and not current.denied:
            current.exchange.flags = UPSTREAM_CLOSED
            if not current.response_started:
                current.exchange.status = 502
                body = b"upstream connect error or disconnect/reset before headers\n"
                headers = [
                    (b"content-type", b"text/plain"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ]
                if self.client.our_state is h11.SEND_RESPONSE:
                    self._send_client(
                        h11.Response(status_code=502, headers=headers, reason=b"Bad Gateway")
                    )
                    self._send_client(h11.Data(data=body))
                    self._send_client(h11.EndOfMessage())
            self._finish(current)
        self.closing = True

    # -- cycles ------------------------------------------------------------------------------
    def _send_client(self, event: h11.Event) -> None:
        data = self.client.send(event)
        if data:
            self._to_client += data

    def _finish(self, current: _Current) -> None:
        current.exchange.ended = self.clock()
        self._completed.append(current.exchange)
        self._current = None

    def _maybe_next_cycle(self) -> None:
        """After a message ended: once request and response are both complete, report the
        exchange and start the next cycle, or close if either side said it must."""
        current = self._current
        if current is None:
            return
        ended = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)
        ours, theirs = self.client.our_state, self.client.their_state
        if ours not in ended or theirs not in ended:
            return
        if not current.denied and self.upstream.their_state not in ended:
            return
        self._finish(current)
        reusable = ours is h11.DONE and theirs is h11.DONE
        if not current.denied:
            reusable = reusable and self.upstream.states == {
                h11.CLIENT: h11.DONE,
                h11.SERVER: h11.DONE,
            }
        if not reusable:
            self.closing = True  # one side asked to close: this was the last request
            return
        self.client.start_next_cycle()
        if not current.denied:
            self.upstream.start_next_cycle()
        self._pump_client()
        if self._current is None and self.head_started is None and self.client.trailing_data[0]:
            self.head_started = self.clock()  # a pipelined head is pending: its clock runs


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    for n, v in headers:
        if n == name:
            return v.decode("latin-1")
    return None


def _closes(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    return any(
        n == b"connection" and b"close" in (t.strip().lower() for t in v.split(b","))
        for n, v in headers
    )


def _forwarded_headers(
    headers: Sequence[tuple[bytes, bytes]], *, keep_upgrade: bool = True
) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The headers without hop-by-hop ones; and whether this is an upgrade request (then
    ``Connection: upgrade`` and ``Upgrade`` are kept, since the pod must see the proposal)."""
    listed = {
        t.strip().lower()
        for n, v in headers
        if n == b"connection"
        for t in v.split(b",")
        if t.strip()
    }
    upgrade = keep_upgrade and b"upgrade" in listed and _header(headers, b"upgrade") is not None
    out: list[tuple[bytes, bytes]] = []
    for n, v in headers:
        if (
            (n == b"te" and v.strip().lower() == b"trailers")
            or (n == b"upgrade" and upgrade)
            or (n not in HOP_BY_HOP and n not in listed)
        ):
            out.append((n, v))
    if upgrade:
        out.append((b"connection", b"upgrade"))
    return out, upgrade


def _raw_response(status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> bytes:
    """A complete response written without h11 (the client's h11 state may be ERROR)."""
    reason = {
        400: b"Bad Request",
        408: b"Request Timeout",
        431: b"Request Header Fields Too Large",
        501: b"Not Implemented",
    }.get(status, b"Error")
    lines = [b"HTTP/1.1 %d %s" % (status, reason)]
    lines += [n + b": " + v for n, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
