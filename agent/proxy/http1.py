"""The destination node's HTTP/1.1 layer: parse, authorize and forward requests, sans-IO.

Why sans-IO: framing and request-smuggling rules are where an HTTP proxy goes wrong, and they
must be tested byte for byte without sockets. ``Http1Proxy`` holds the two halves of
``agent.proxy.http1_codec`` (llhttp): a ``RequestReader`` on the client side (we are its server)
and a ``ResponseReader`` on the upstream side (we are the pod's client, one upstream connection
per client connection). The shell (``agent.proxy.http_inbound``) feeds it bytes from
either side and writes out what it produced (``take_to_client``, ``take_to_upstream``); finished
requests come out as ``Exchange`` records for telemetry.

What it does per request:

* refuses what could be read two ways by two parsers (request smuggling): both
  ``Content-Length`` and ``Transfer-Encoding``, conflicting lengths, a transfer coding other
  than ``chunked`` (400, 501), a malformed request line or header (400), a head over
  ``max_head_bytes`` or of more than ``max_fields`` fields (431) (``http1_codec``; from a
  source node, with what it added on top: ``PEER_REQUEST``). Each
  refusal closes the connection and is named by its cause (``take_rejections``); a head that
  is not complete ``header_timeout`` after its first byte is the shell's to time out
  (``head_started``, ``header_timeout()``: 408);
* removes hop-by-hop headers (RFC 9110 7.6.1: ``Connection`` and what it lists,
  ``Keep-Alive``, ``Proxy-Connection``, ``TE`` except ``trailers``, ``Trailer``, ``Upgrade``
  unless the request asks for an upgrade); a body framed by ``Content-Length`` is forwarded as
  it came, a chunked one re-chunked from the validated chunks (extensions dropped);
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

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Protocol, TypeVar

from agent.proxy.http1_codec import (
    AMBIGUOUS_LENGTH,
    DEFAULT_MAX_FIELDS,
    FIELD_SIZE_MIN,
    HEADERS_TOO_LARGE,
    HOP_BY_HOP,
    MALFORMED,
    NO_ALLOWANCE,
    UNSUPPORTED_CODING,
    Allowance,
    Body,
    End,
    Head,
    Headers,
    RequestReader,
    ResponseReader,
    chunk,
    forwarded_headers,
    last_chunk,
    request_head,
    response_head,
)
from agent.telemetry.records import RequestRecord, trace_headers_of

__all__ = [  # the names this module had before the codec moved out, still importable here
    "AMBIGUOUS_LENGTH",
    "HEADERS_TOO_LARGE",
    "HOP_BY_HOP",
    "MALFORMED",
    "UNSUPPORTED_CODING",
]

DENIED_BODY = b"RBAC: access denied"
DEFAULT_MAX_HEAD_BYTES = 60 * 1024  # Envoy's default max_request_headers_kb is 60
# What ``nodemesh agent --max-header-fields`` may choose for ``max_fields``. At least 10: an
# ordinary client's own fields come near it (``Host``, ``User-Agent``, ``Accept``, a body's
# ``Content-Type`` and ``Content-Length``, trace context: B3's are four), and so do a pod's
# (``Date``, ``Server``, ``Content-Type``, ``Content-Length``), so fewer refuses ordinary
# traffic. What the proxies add (``x-request-id``) is not counted: a peer node's reader admits
# it on top (``PEER_REQUEST``, ``PEER_RESPONSE``). At most what a head of
# ``DEFAULT_MAX_HEAD_BYTES`` can hold (``FIELD_SIZE_MIN`` bytes a field): past it the count
# bounds nothing the bytes do not.
MIN_FIELDS_SETTING = 10
MAX_FIELDS_SETTING = DEFAULT_MAX_HEAD_BYTES // FIELD_SIZE_MIN

# What one node adds, at most, to an HTTP/1.1 head it forwards to the other over HBONE; the
# reader at the other end admits it on top of ``max_head_bytes`` and ``max_fields``, so that
# the limits stay the client's (and the pod's), checked where its head enters the mesh, and a
# head the first node admitted is never refused by the second for the mesh's own additions.
# To a request (the source node's): ``x-request-id`` when absent, an empty ``Host`` when an
# HTTP/1.0 request had none, and a mirrored copy's ``Host`` suffixed ``-shadow``
# (``http_outbound_codec.mirror_request``). Trace headers pass untouched and no
# ``x-forwarded-*`` is added (the client's address travels on the HBONE ``CONNECT``). What a
# route's filters add (RequestHeaderModifier, URLRewrite) is the route author's and counts.
REQUEST_ID_LENGTH = 36  # ``new_request_id``'s: a UUID as text
SHADOW_SUFFIX = b"-shadow"
PEER_REQUEST = Allowance.of(
    (b"x-request-id", b"0" * REQUEST_ID_LENGTH), (b"host", b""), lengthened=len(SHADOW_SUFFIX)
)
# To a response (the destination node's): ``connection: close`` when the pod's HTTP/1.0
# response did not keep its connection alive (``Http1Proxy._on_response``); a chunked one's
# ``Transfer-Encoding`` is replaced, not added.
PEER_RESPONSE = Allowance.of((b"connection", b"close"))

# Causes of a refused request (``nodemesh_http_rejected_requests_total{cause}``); the parser's
# own are defined in ``http1_codec``.
HEADER_TIMEOUT = "header_timeout"
HEAD_NOT_COMPLETE = "the head was not complete in time"  # its detail
UPSTREAM_PROTOCOL = "upstream_protocol_error"

# Envoy response flags as Istio labels them.
NO_FLAGS = "-"
RBAC_DENIED = "RBAC"
RATE_LIMITED = "RL"  # Envoy's flag: refused by a local rate limit
UPSTREAM_CLOSED = "UC"
DOWNSTREAM_CLOSED = "DC"

GRPC_PERMISSION_DENIED = 7  # a policy denial of a gRPC call (HTTP/2 layer)
GRPC_RESOURCE_EXHAUSTED = 8  # a rate-limited gRPC call
RATE_LIMITED_BODY = b"local_rate_limited"  # Envoy's body for the same refusal

_REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    408: b"Request Timeout",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
}


CLOSE = [(b"connection", b"close")]
KEEP_ALIVE = [(b"connection", b"keep-alive")]
NO_HEADERS: Headers = []


def persistence(last: bool, http10: bool) -> Headers:
    """The ``Connection`` header of a response to the client: ``close`` on its connection's
    last, ``keep-alive`` to an HTTP/1.0 client whose connection goes on (it asked for it: an
    HTTP/1.0 client that is not told reads until the close, as ``ab -k`` does, and waited
    for a close that never came; Envoy and nginx say it too), else none."""
    if last:
        return CLOSE
    return KEEP_ALIVE if http10 else NO_HEADERS


class RequestIds:
    """Random UUIDs (version 4) as text, as ``str(uuid.uuid4())`` makes them, from the OS's
    random bytes as ``uuid4`` takes them, but fetched 256 at a time: one ``getrandom`` system
    call per request was a visible share of a request's CPU. A forked process (``--workers``)
    drops the bytes it inherited, so no two processes hand out the same ids."""

    BATCH = 256

    def __init__(self) -> None:
        self._bytes = b""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._bytes, self._at = b"", 0

    def __call__(self) -> str:
        at = self._at
        if at >= len(self._bytes):
            self._bytes, at = os.urandom(16 * self.BATCH), 0
        self._at = at + 16
        b = bytearray(self._bytes[at : at + 16])
        b[6] = (b[6] & 0x0F) | 0x40  # version 4
        b[8] = (b[8] & 0x3F) | 0x80  # variant RFC 9562
        h = b.hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


new_request_id: Callable[[], str] = RequestIds()


@dataclass(slots=True)
class RequestHead:
    """What authorization and telemetry see of one request (not frozen, though nothing changes
    it once made: a frozen dataclass's ``__init__`` cost a few us per request)."""

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
    dry_run: str = ""  # the dry-run policies that would have denied it (``Verdict.dry_run``)


Authorize = Callable[[RequestHead], "Verdict"]


class Finished(Protocol):
    """What telemetry needs of a finished exchange, HTTP/1.1 (``Exchange``) or HTTP/2 (a
    stream: ``agent.proxy.h2exchange.H2Exchange``); times are ``time.monotonic()``."""

    head: RequestHead
    status: int
    started: float
    ended: float
    request_bytes: int
    response_bytes: int
    flags: str
    denied_by: str | None
    dry_run: str


def request_record(
    exchange: Finished,
    *,
    flags: str | None = None,
    protocol: str = "http",
    grpc_status: str = "",
    upstream: str = "",
) -> RequestRecord:
    """The ``RequestRecord`` of a finished exchange, as every HTTP path reports it (``flags``
    overrides the exchange's own, e.g. with a route's ``DI`` added)."""
    head = exchange.head
    # Every field, in ``RequestRecord``'s order, passed by position: one is made per request at
    # each end, and sixteen keywords cost more than the rest of the call (2.0 against 0.8 us).
    return RequestRecord(
        head.method,
        head.path,
        head.host,  # authority
        exchange.status,
        max(0.0, (exchange.ended - exchange.started) * 1000),  # duration_ms
        exchange.request_bytes,
        exchange.response_bytes,
        exchange.flags if flags is None else flags,  # response_flags
        head.request_id,
        head.trace,  # trace_headers
        time.time() - (time.monotonic() - exchange.started),  # started_at
        protocol,
        grpc_status,
        upstream,
        exchange.denied_by or "",  # policy
        exchange.dry_run,  # dry_run_policy
    )


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a request may go on; a refusal says how it is answered (by default policy's
    ``403``, flag ``RBAC``; a rate limit's is ``429``, flag ``RL``, gRPC status 8). ``reason``
    of a refusal names what refused it (the policy), ``dry_run`` the dry-run policies that
    would have denied it, allowed or not: both reach the request's record."""

    allowed: bool
    reason: str = ""
    status: int = 403
    flag: str = RBAC_DENIED
    body: bytes = DENIED_BODY
    grpc_status: int = GRPC_PERMISSION_DENIED
    dry_run: str = ""


@dataclass(slots=True)
class _Current:
    """One exchange in flight; the fields a request head sets come first (``_on_request`` makes
    it by position)."""

    exchange: Exchange
    keep_alive: bool  # the client's request let the connection carry another
    head_only: bool = False  # a HEAD request: its response has no body
    upgrade: bool = False
    waiting_for_100: bool = False  # the client sent Expect: 100-continue and no body yet
    request_chunked: bool = False  # re-chunk the request body for the pod
    http10: bool = False  # an HTTP/1.0 client: no chunked response for it
    denied: bool = False
    request_done: bool = False
    response_started: bool = False
    response_done: bool = False
    response_chunked: bool = False  # re-chunk the response body for the client
    last: bool = False  # the response said this is the connection's last exchange


class _InFlight(Protocol):
    exchange: Exchange
    waiting_for_100: bool
    request_done: bool
    response_started: bool
    response_done: bool
    response_chunked: bool
    keep_alive: bool
    last: bool


C = TypeVar("C", bound=_InFlight)


class ClientSide(ABC, Generic[C]):
    """What both HTTP/1.1 proxies do alike, the destination's ``Http1Proxy`` and the source's
    ``agent.proxy.http_outbound_codec.SourceHttp1``: the bytes they owe either side, the
    refusals they made, the order in which the client's parsed events are taken (one exchange
    at a time: a pipelined head waits for the exchange before it to end, and bad input after a
    complete request is refused in its turn), how a request head is read (hop-by-hop headers
    removed, ``x-request-id`` added when absent, the ``RequestHead`` policy and telemetry see),
    how a refusal is answered, a response's end, the switch to a tunnel after a ``101``, and
    the next exchange's start. ``C`` is the proxy's in-flight exchange.

    What differs is each proxy's own (the abstract methods): what a request head leads to (the
    destination authorizes and forwards it to its one pod; the source waits, ``pending``, for
    the shell to attach an upstream or answer), the bodies, the client's end, what a refusal
    or an exchange's end does to an upstream, and bytes read after the switch (the destination
    drops them: its shell reads no more once ``tunnel``; the source passes them through). The
    hooks run where the code they replace ran inline, and ``pending`` replaced a method asked
    per client event, so a request costs no more calls than before."""

    clock: Callable[[], float]
    new_request_id: Callable[[], str]
    closing: bool
    tunnel: bool
    head_started: float | None
    pending: RequestHead | None  # a head waiting for the shell to act on it (the source's)
    client: RequestReader
    _current: C | None
    _to_client: list[bytes]
    _to_upstream: list[bytes]
    rejections: list[str]  # ``take_rejections``' (read, never changed, by a shell)
    refusal: str | None  # what the refusal of bad input answered (one: it closes)
    # The connection ends while the client may still send a body it was told to wait for
    # (100-continue): the shell's close lingers, as after a refusal, so that those bytes
    # unread do not reset the answer away (``agent.proxy.linger``)
    lingers: bool
    _client_eof: bool
    _reasons: ClassVar[dict[int, bytes]]  # the reason phrase of each status it answers

    # -- output ------------------------------------------------------------------------------
    def take_to_client(self) -> bytes:
        out = self._to_client
        if not out:
            return b""
        self._to_client = []
        return out[0] if len(out) == 1 else b"".join(out)

    def take_to_upstream(self) -> bytes:
        out = self._to_upstream
        if not out:
            return b""
        self._to_upstream = []
        return out[0] if len(out) == 1 else b"".join(out)

    def take_rejections(self) -> list[str]:
        out, self.rejections = self.rejections, []
        return out

    # -- input -------------------------------------------------------------------------------
    def receive_client(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` is its end of stream."""
        if self.tunnel:
            self._after_switch(data)
            return
        if self.closing:
            return
        if not data:
            self._client_eof = True
            self._client_ended()
            return
        reader = self.client
        if self.head_started is None and self._current is None and not reader.mid_message:
            self.head_started = self.clock()
        reader.feed(data)
        self._pump_client()

    # -- the client's events -----------------------------------------------------------------
    def _pump_client(self) -> None:
        client = self.client
        events = client.events
        while True:
            while events and self.pending is None and not (self.closing or self.tunnel):
                event = events[0]
                current = self._current
                if isinstance(event, Body):
                    events.popleft()
                    if current is not None:
                        self._on_request_data(current, event.data)
                elif isinstance(event, Head):
                    if current is not None:
                        return  # pipelined: its turn comes when this exchange ends
                    events.popleft()
                    self.head_started = None
                    if event.size > client.max_head_bytes:  # with its allowance, if any
                        self._refuse(431, HEADERS_TOO_LARGE, "head over the size limit")
                        continue
                    fields = event.headers
                    # What the passes below look at, gathered as it was parsed (``Head.noted``)
                    noted = fields if event.noted is None else event.noted
                    headers, upgrade = forwarded_headers(fields, noted=noted)
                    host = request_id = None  # the first of each, as ``header_value`` finds them
                    for name, value in noted:
                        if name == b"host":
                            if host is None:
                                host = value.decode("latin-1")
                        elif name == b"x-request-id" and request_id is None:
                            request_id = value.decode("latin-1")
                    if host is None:  # HTTP/1.0 (1.1 without it is refused by the reader)
                        headers.append((b"host", b""))  # forwarded as 1.1: empty (RFC 9112 3.2)
                    if request_id is None:
                        request_id = self.new_request_id()
                        headers.append((b"x-request-id", request_id.encode()))
                    path = event.target.decode("latin-1")
                    if "?" in path or "#" in path:
                        path = path.split("?", 1)[0].split("#", 1)[0]
                    head = RequestHead(  # by position (keywords cost more than the rest of it)
                        event.method.decode("latin-1"),
                        path,
                        host or "",
                        request_id,
                        trace_headers_of(noted),
                        fields,
                    )
                    self._on_request(event, head, headers, upgrade)
                elif isinstance(event, End):
                    events.popleft()
                    if current is not None:
                        self._on_request_end(current, event)
                else:
                    if current is not None and current.request_done:
                        return  # bad input after a complete request: refused in its turn
                    events.popleft()
                    self._refuse(event.status, event.cause, event.detail)
            # Every event taken: the pipelined requests the reader held back come next.
            if events or not client.held or self.pending is not None or self.closing:
                return
            client.release()  # not after a switch: the reader holds nothing once upgraded

    def _refuse(self, status: int, cause: str, detail: str) -> None:
        """Answer bad input (if the client may still get a response) and close; the answer
        names the cause and what was wrong (``refusal``, for the shell's log line too)."""
        self.rejections.append(cause)
        self.refusal = f"{cause.replace('_', ' ')}: {detail}"
        self.closing = True
        current = self._current
        respond = current is None or not current.response_started
        if current is not None:  # its body was bad: the request is reported with the refusal
            if respond:
                current.exchange.status = status
            self._finish(current)
        self._refused(current)
        if respond:
            body = f"{self.refusal}\n".encode()
            headers = [
                (b"content-type", b"text/plain"),
                (b"content-length", b"%d" % len(body)),
                (b"connection", b"close"),
            ]
            self._to_client.append(response_head(status, self._reasons[status], headers) + body)

    # -- the upstream's response -------------------------------------------------------------
    def _response_ended(self, current: C, event: End) -> None:
        """The response's end: its trailers in the last chunk when it is re-chunked; then the
        exchange may be over."""
        if current.response_chunked:
            trailers = [(n, v) for n, v in event.trailers if n not in HOP_BY_HOP]
            self._to_client.append(last_chunk(trailers))
        current.response_done = True
        if current.waiting_for_100 and not current.request_done:
            # A final response to a client waiting for 100-continue (RFC 9110 10.1.1): it may
            # never send the body, so where its next request would begin is unknowable. The
            # response said it is the last (``connection: close``); the connection ends here
            # (Envoy's too), as after a refusal, rather than read the next request as the body.
            self._finish(current)
            self._refused(current)
            self.closing = self.lingers = True
            return
        self._maybe_next_cycle()

    def _switch(self, current: C, event: Head, upstream_read: bytes | None) -> None:
        """A ``101`` answered the upgrade the request proposed: the response goes out with
        its ``Connection``/``Upgrade``, then the connection is a tunnel, and what either side
        sent after its head is handed over (``upstream_read``: the upstream's)."""
        headers = [(n, v) for n, v in event.headers if n not in HOP_BY_HOP]
        headers += [(n, v) for n, v in event.headers if n in (b"connection", b"upgrade")]
        self._to_client.append(response_head(101, event.reason, headers))
        current.exchange.status = 101
        self._finish(current)
        self.tunnel = True
        if upstream_read:
            self._to_client.append(upstream_read)
        if self.client.upgraded:
            self._to_upstream.append(bytes(self.client.upgraded))

    # -- cycles ------------------------------------------------------------------------------
    def _maybe_next_cycle(self) -> None:
        """Once request and response are both complete: report the exchange (``_finish``,
        then ``_exchange_ended``), and start the next cycle, or close if either side said it
        must (``last``)."""
        current = self._current
        if current is None or not (current.request_done and current.response_done):
            return
        self._finish(current)
        self._exchange_ended(current)
        if current.last or not current.keep_alive:
            self.closing = True  # one side asked to close: this was the last request
            return
        self._pump_client()
        if self._client_eof:
            self._client_ended()
        elif self._current is None and self.head_started is None and self.client.mid_message:
            self.head_started = self.clock()  # a pipelined head is pending: its clock runs

    @abstractmethod
    def _on_request(self, req: Head, head: RequestHead, headers: Headers, upgrade: bool) -> None:
        """A request head, read: ``headers`` as forwarded, ``upgrade`` when it proposes one."""

    @abstractmethod
    def _on_request_data(self, current: C, data: bytes) -> None:
        """(each proxy's own)"""

    @abstractmethod
    def _on_request_end(self, current: C, event: End) -> None:
        """(each proxy's own)"""

    @abstractmethod
    def _client_ended(self) -> None:
        """The client's end of stream (each proxy's own)."""

    @abstractmethod
    def _refused(self, current: C | None) -> None:
        """After a refusal (``current``, if any, finished): what the proxy releases."""

    @abstractmethod
    def _finish(self, current: C) -> None:
        """The exchange is over: reported (``take_completed``), no longer current."""

    @abstractmethod
    def _exchange_ended(self, current: C) -> None:
        """After an exchange completed both ways (``_maybe_next_cycle``, finished)."""

    @abstractmethod
    def _after_switch(self, data: bytes) -> None:
        """Client bytes the shell read after the switch to a tunnel."""


@dataclass
class Http1Proxy(ClientSide[_Current]):
    authorize: Authorize
    clock: Callable[[], float] = time.monotonic
    new_request_id: Callable[[], str] = new_request_id
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES
    max_fields: int = DEFAULT_MAX_FIELDS  # per head or trailer block, either side's
    # On top of both limits for the client's heads: ``PEER_REQUEST`` when the client is a
    # source node (HBONE), none for a plaintext client, whose heads are its own
    allowance: Allowance = NO_ALLOWANCE
    closing: bool = field(default=False, init=False)  # close the client once flushed
    tunnel: bool = field(default=False, init=False)  # switched protocols: relay raw bytes
    head_started: float | None = field(default=None, init=False)
    pending: RequestHead | None = field(default=None, init=False)  # never: acted on at once
    client: RequestReader = field(init=False)
    upstream: ResponseReader = field(init=False)
    _to_client: list[bytes] = field(default_factory=list, init=False)
    _to_upstream: list[bytes] = field(default_factory=list, init=False)
    _completed: list[Exchange] = field(default_factory=list, init=False)
    rejections: list[str] = field(default_factory=list, init=False)
    refusal: str | None = field(default=None, init=False)
    lingers: bool = field(default=False, init=False)
    _current: _Current | None = field(default=None, init=False)
    _client_eof: bool = field(default=False, init=False)
    _reasons = _REASONS

    def __post_init__(self) -> None:
        self.client = RequestReader(*self.allowance.added_to(self.max_head_bytes, self.max_fields))
        self.upstream = ResponseReader(self.max_head_bytes, self.max_fields)

    # -- output ------------------------------------------------------------------------------
    def take_completed(self) -> list[Exchange]:
        out, self._completed = self._completed, []
        return out

    @property
    def client_paused(self) -> bool:
        """Read no more from the client for now: what it sent already waits its turn (a
        pipelined request behind the current exchange, bytes after the requests the reader
        parsed ahead, or bytes after an upgrade proposal)."""
        client = self.client
        return bool(client.events) or bool(client.held) or client.upgraded is not None

    # -- input -------------------------------------------------------------------------------
    def receive_upstream(self, data: bytes) -> None:
        """Bytes from the pod; ``b""`` is its end of stream."""
        if self.closing or self.tunnel:
            return
        reader = self.upstream
        if not data:
            if reader.eof():
                self._pump_upstream()
            if not (self.closing or self.tunnel):
                self._upstream_gone()
            return
        reader.feed(data)
        self._pump_upstream()

    def header_timeout(self) -> None:
        """The head did not complete in time: 408 and close (slowloris)."""
        self._refuse(408, HEADER_TIMEOUT, HEAD_NOT_COMPLETE)

    def upstream_failed(self) -> None:
        """The upstream connection broke (reset, unreachable)."""
        self._upstream_gone()

    def client_failed(self) -> None:
        """The client's side broke (its stream reset, a write to it failed): the request in
        progress, whatever its stage, is finished with ``DC`` so that it is still reported
        (with the status of a response that had begun), and the connection ends."""
        current = self._current
        if current is not None:
            current.exchange.flags = DOWNSTREAM_CLOSED
            self._finish(current)
        self.closing = True

    # -- client side -------------------------------------------------------------------------
    def _client_ended(self) -> None:
        """The client's end of stream: a request it cut short ends the connection; one it
        completed (and any complete one queued behind it) still gets its response."""
        current = self._current
        if current is not None and not current.request_done:
            current.exchange.flags = DOWNSTREAM_CLOSED
            self._finish(current)
            self.closing = True
        elif current is None and not (self.client.events or self.client.held):
            self.closing = True

    def _refused(self, current: _Current | None) -> None:
        """Nothing to release: the pod's connection goes with the client's."""

    def _after_switch(self, data: bytes) -> None:
        """Dropped: once ``tunnel`` the shell relays the client's bytes itself."""

    def _on_request(self, req: Head, head: RequestHead, headers: Headers, upgrade: bool) -> None:
        current = _Current(  # by position, in its fields' order (``_Current``)
            Exchange(head, self.clock()),
            req.keep_alive,
            req.method == b"HEAD",  # head_only
            upgrade,
            req.expect_continue,  # waiting_for_100
            req.chunked,  # request_chunked
            req.http10,
        )
        self._current = current
        verdict = self.authorize(head)
        if not verdict.allowed:
            current.denied = True
            current.exchange.flags = verdict.flag
            current.exchange.denied_by = verdict.reason
            current.exchange.dry_run = verdict.dry_run
            self._deny(current, verdict)
            return
        if verdict.dry_run:
            current.exchange.dry_run = verdict.dry_run
        if not req.keep_alive and not upgrade:
            headers.append((b"connection", b"close"))
        self.upstream.expect(req.method)
        self._to_upstream.append(request_head(req.method, req.target, headers))

    def _deny(self, current: _Current, verdict: Verdict) -> None:
        body = verdict.body
        headers = [
            (b"content-type", b"text/plain"),
            (b"content-length", b"%d" % len(body)),
        ]
        # A client waiting for 100-continue has not sent its body and may never: where the
        # next request would start is unknowable, so this response is the last.
        last = current.waiting_for_100 or not current.keep_alive
        headers += persistence(last, current.http10)
        reason = _REASONS.get(verdict.status, b"Refused")
        self._to_client.append(response_head(verdict.status, reason, headers) + body)
        current.exchange.status = verdict.status
        current.exchange.response_bytes = len(body)
        current.response_started = current.response_done = True
        current.last = last
        if current.waiting_for_100:
            self._finish(current)
            self.closing = self.lingers = True
            return
        self._maybe_next_cycle()

    def _on_request_data(self, current: _Current, data: bytes) -> None:
        current.exchange.request_bytes += len(data)
        current.waiting_for_100 = False
        if not current.denied:
            if current.request_chunked:
                self._to_upstream.append(chunk(data))
            else:
                self._to_upstream.append(data)

    def _on_request_end(self, current: _Current, event: End) -> None:
        current.request_done = True
        if not current.denied:
            if current.request_chunked:
                trailers = [(n, v) for n, v in event.trailers if n not in HOP_BY_HOP]
                self._to_upstream.append(last_chunk(trailers))
            if current.upgrade:
                return  # the answer decides what the bytes after the head are
        self._maybe_next_cycle()

    # -- upstream side -----------------------------------------------------------------------
    def _pump_upstream(self) -> None:
        events = self.upstream.events
        while events and not (self.closing or self.tunnel):
            event = events.popleft()
            current = self._current
            if isinstance(event, Body):
                if current is not None:
                    current.exchange.response_bytes += len(event.data)
                    if current.response_chunked:
                        self._to_client.append(chunk(event.data))
                    else:
                        self._to_client.append(event.data)
            elif isinstance(event, Head):
                if current is None or current.denied:
                    self.rejections.append(UPSTREAM_PROTOCOL)  # a response nobody asked for
                    self._upstream_gone()
                    return
                if event.status < 200:
                    self._on_informational(current, event)
                else:
                    self._on_response(current, event)
            elif isinstance(event, End):
                if current is None or current.response_done or not current.response_started:
                    continue  # the end of an informational response
                self._response_ended(current, event)
            else:
                self.rejections.append(UPSTREAM_PROTOCOL)
                self._upstream_gone()
                return

    def _on_informational(self, current: _Current, event: Head) -> None:
        if event.status == 101 and current.upgrade:
            self._switch(current, event, self.upstream.upgraded)
            return
        if event.status == 101:  # a 101 nobody asked for: the pod is broken
            self.rejections.append(UPSTREAM_PROTOCOL)
            self._upstream_gone()
            return
        headers = [(n, v) for n, v in event.headers if n not in HOP_BY_HOP]
        self._to_client.append(response_head(event.status, event.reason, headers))
        if event.status == 100:
            current.waiting_for_100 = False  # the client sends its body now

    def _on_response(self, current: _Current, event: Head) -> None:
        fields = event.headers
        headers, _ = forwarded_headers(
            fields, keep_upgrade=False, noted=fields if event.noted is None else event.noted
        )
        # Still waiting for 100-continue: the last exchange (``_response_ended``)
        current.last = not (event.keep_alive and current.keep_alive) or current.waiting_for_100
        if event.chunked:
            headers = [(n, v) for n, v in headers if n != b"transfer-encoding"]
            if current.http10:
                current.last = True  # an HTTP/1.0 client reads the body until the close
            else:
                headers.append((b"Transfer-Encoding", b"chunked"))
                current.response_chunked = True
        headers += persistence(current.last, current.http10)
        current.exchange.status = event.status
        current.response_started = True
        self._to_client.append(response_head(event.status, event.reason, headers))
        if current.upgrade:
            current.upgrade = False
            self.client.resume()  # the upgrade was declined: what followed is requests

    def _upstream_gone(self) -> None:
        current = self._current
        if current is not None and not current.denied:
            current.exchange.flags = UPSTREAM_CLOSED
            if not current.response_started:
                current.exchange.status = 502
                body = b"upstream connect error or disconnect/reset before headers\n"
                headers = [
                    (b"content-type", b"text/plain"),
                    (b"content-length", b"%d" % len(body)),
                    (b"connection", b"close"),
                ]
                self._to_client.append(response_head(502, b"Bad Gateway", headers) + body)
            self._finish(current)
        self.closing = True

    # -- cycles ------------------------------------------------------------------------------
    def _finish(self, current: _Current) -> None:
        current.exchange.ended = self.clock()
        self._completed.append(current.exchange)
        self._current = None

    def _exchange_ended(self, current: _Current) -> None:
        """Nothing to release: the pod's connection carries the next request."""
