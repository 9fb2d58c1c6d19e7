"""The source node's HTTP/1.1 layer: one client connection, a different upstream per request.

Why not ``agent.proxy.http1.Http1Proxy``: that one pins the client connection to one upstream
connection (the destination node relays to one pod). Here each request may go to another
endpoint, so the upstream half is *attached* per request and *released* after it, to be pooled
by the shell (``agent.proxy.http_outbound``) and attached again to a later request, maybe of
another client connection. The interface to the shell is narrow on purpose, so that the h11
codec underneath can be swapped (the destination side is moving to httptools): bytes in
(``receive_client``, ``receive_upstream``), bytes out (``take_to_client``, ``take_to_upstream``),
and four decisions: ``pending`` (a request head waits for an upstream), ``attach``,
``respond_locally`` (503 for no endpoint, 403 for a same-node L7 denial) and ``take_released``
(the upstream half is free again; whether it can be reused).

Sans-IO: no sockets, no clock of its own (``clock`` is injected), tested byte for byte.

Per request, as at the destination (``http1``): a head that could be read two ways (both
``Content-Length`` and ``Transfer-Encoding``) is 400, a head over ``max_head_bytes`` 431, a
malformed one 400, each closing the client; hop-by-hop headers are removed (RFC 9110 7.6.1) and
h11 re-frames bodies; ``x-request-id`` is added when absent; ``Expect: 100-continue`` goes to
the endpoint and its ``100`` comes back; an upgrade answered ``101`` turns the connection into
an opaque tunnel to that upstream (``tunnel``), with what either side sent after the heads
handed over. The client connection does not inherit an upstream's ``Connection: close``: the
next request simply gets another upstream session.

Per request the shell may also edit the forwarded head (``edit_pending``: a route's header
modifier and rewrite), edit the response head (``edit_response``), end the request when its
time runs out (``expire``: 504 ``UT``, or the client connection closed once the response has
started), and ask to see each try's outcome before the client does (``retry_with``): a status
the hook claims, a reset before the response head or a per-try timeout (``try_expired``)
then releases the upstream unreusable and puts the request back in ``pending``, to be
attached to another upstream and sent again. Only a request held whole can be sent again: its
body is buffered while the hook is set, up to ``max_replay_bytes``, and the hook is told
whether the request is ``replayable`` (body complete and within the limit). A request to be
mirrored (``mirror_with``) is held the same way: once the client sent all of it, the forwarded
head with its body is handed to the shell (``take_mirrors``: the body is ``None`` when it went
past the limit, so the copy cannot be made), which sends the copy on its own, never in the
primary's way.

Failures, with Envoy's response flags: an upstream that closes, resets or garbles before its
response head is answered 503 ``UC`` (the client connection keeps serving unless its request
body cannot be skipped); after the head, the client connection is closed (``UC``). The shell
answers 503 ``UF``/``UH``/``UO`` through ``respond_locally`` when no upstream could be had.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import h11

from agent.proxy.http1 import (
    AMBIGUOUS_LENGTH,
    DEFAULT_MAX_HEAD_BYTES,
    DOWNSTREAM_CLOSED,
    HEADER_TIMEOUT,
    HEADERS_TOO_LARGE,
    HOP_BY_HOP,
    MALFORMED,
    UNSUPPORTED_CODING,
    UPSTREAM_CLOSED,
    UPSTREAM_PROTOCOL,
    Exchange,
    RequestHead,
)
from agent.telemetry.records import trace_headers_of

T = TypeVar("T")
# A try's outcome (a status, or None when no response head came) and whether the request can
# be sent again -> True to retry it (the hook decided and counted).
RetryHook = Callable[[int | None, bool], bool]
StrHeaders = list[tuple[str, str]]
DEFAULT_MAX_REPLAY_BYTES = 64 * 1024
UPSTREAM_TIMEOUT = "UT"

UPSTREAM_RESET_BODY = b"upstream connect error or disconnect/reset before headers\n"
_ENDED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)
# The request is complete (or proposes an upgrade): the client has nothing to send for now.
_QUIET = (*_ENDED, h11.MIGHT_SWITCH_PROTOCOL, h11.SWITCHED_PROTOCOL)
_REASONS = {
    301: b"Moved Permanently",
    302: b"Found",
    303: b"See Other",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


def new_upstream(max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES) -> h11.Connection:
    """The client half of one upstream session (kept with the session across requests)."""
    return h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head_bytes)


@dataclass(frozen=True, slots=True)
class Mirrored(Generic[T]):
    """A complete request to copy: the head as forwarded, the body (``None`` when it went past
    the limit: no copy can be made) and trailers; ``tag`` is the request's."""

    request: h11.Request
    body: bytes | None
    trailers: list[tuple[bytes, bytes]]
    tag: T | None


@dataclass
class _Current(Generic[T]):
    exchange: Exchange
    tag: T | None = None
    upstream: h11.Connection | None = None
    local: bool = False  # answered here: the request body is discarded
    upgrade: bool = False
    response_started: bool = False
    request: h11.Request | None = None  # the head as forwarded (kept to send it again)
    retry: RetryHook | None = None
    body: bytearray | None = None  # the request body, held while it may be sent again
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    request_done: bool = False  # the client's request ended (EndOfMessage)
    edit_response: Callable[[StrHeaders], StrHeaders] | None = None
    mirror: bool = False


@dataclass
class SourceHttp1(Generic[T]):
    """One client connection; ``T`` is the shell's per-request tag, handed back with each
    finished exchange (``take_completed``)."""

    clock: Callable[[], float] = time.monotonic
    new_request_id: Callable[[], str] = lambda: str(uuid.uuid4())
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES
    max_replay_bytes: int = DEFAULT_MAX_REPLAY_BYTES
    client: h11.Connection = field(init=False)
    closing: bool = field(default=False, init=False)  # close the client once flushed
    tunnel: bool = field(default=False, init=False)  # switched protocols: relay raw bytes
    head_started: float | None = field(default=None, init=False)
    pending: RequestHead | None = field(default=None, init=False)  # waits for attach/respond
    _request: h11.Request | None = field(default=None, init=False)  # the one to forward
    _current: _Current[T] | None = field(default=None, init=False)
    _to_client: bytearray = field(default_factory=bytearray, init=False)
    _to_upstream: bytearray = field(default_factory=bytearray, init=False)
    _completed: list[tuple[Exchange, T | None]] = field(default_factory=list, init=False)
    _rejections: list[str] = field(default_factory=list, init=False)
    _released: list[tuple[h11.Connection, bool]] = field(default_factory=list, init=False)
    _client_eof: bool = field(default=False, init=False)
    _mirrors: list[Mirrored[T]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.client = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head_bytes)

    # -- output ------------------------------------------------------------------------------
    def take_to_client(self) -> bytes:
        out = bytes(self._to_client)
        self._to_client.clear()
        return out

    def take_to_upstream(self) -> bytes:
        out = bytes(self._to_upstream)
        self._to_upstream.clear()
        return out

    def take_completed(self) -> list[tuple[Exchange, T | None]]:
        out, self._completed = self._completed, []
        return out

    def take_rejections(self) -> list[str]:
        out, self._rejections = self._rejections, []
        return out

    def take_mirrors(self) -> list[Mirrored[T]]:
        """Requests the client finished sending that are to be mirrored."""
        out, self._mirrors = self._mirrors, []
        return out

    def take_released(self) -> list[tuple[h11.Connection, bool]]:
        """Upstream halves done with their request: (half, reusable for another request)."""
        out, self._released = self._released, []
        return out

    @property
    def attached(self) -> bool:
        """A request is being served by an upstream (bytes from it are expected)."""
        current = self._current
        return current is not None and current.upstream is not None

    @property
    def current_tag(self) -> T | None:
        """The shell's tag of the request being served (or pending), if any."""
        return self._current.tag if self._current is not None else None

    @property
    def pending_target(self) -> str:
        """The pending request's target as sent (path and query)."""
        assert self._request is not None
        return self._request.target.decode("latin-1")

    def wants_client_data(self) -> bool:
        """Read the client now? Not while a head waits for an upstream, nor once the request
        is complete (a pipelined next request waits in the kernel, not in memory)."""
        if self.closing or self.tunnel or self.pending is not None or self._client_eof:
            return False
        return self.client.their_state not in _QUIET

    # -- input -------------------------------------------------------------------------------
    def receive_client(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` is its end of stream. Once ``tunnel``, bytes read
        before the shell switched to relaying pass through as they are."""
        if self.tunnel:
            self._to_upstream += data
            return
        if self.closing:
            return
        if data and self.head_started is None and self._current is None:
            self.head_started = self.clock()
        if not data:
            self._client_eof = True
        self.client.receive_data(data)
        self._pump_client()

    def receive_upstream(self, data: bytes) -> None:
        """Bytes from the attached upstream; ``b""`` is its end of stream (after ``tunnel``:
        passed through as they are, like ``receive_client``)."""
        if self.tunnel:
            self._to_client += data
            return
        current = self._current
        if self.closing or self.tunnel or current is None or current.upstream is None:
            return
        current.upstream.receive_data(data)
        self._pump_upstream(current, current.upstream)

    def header_timeout(self) -> None:
        """The head did not complete in time: 408 and close (slowloris)."""
        self._refuse(408, HEADER_TIMEOUT)

    def edit_pending(self, edit: Callable[[str, StrHeaders], tuple[str, StrHeaders]]) -> None:
        """Change the pending request's forwarded target and headers (lower-case names;
        ``host`` must stay)."""
        request = self._request
        assert request is not None and self.pending is not None
        target, headers = edit(
            request.target.decode("latin-1"),
            [(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.headers],
        )
        self._request = h11.Request(
            method=request.method,
            target=target.encode("latin-1"),
            headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers],
        )

    def edit_response(self, edit: Callable[[StrHeaders], StrHeaders]) -> None:
        """Change the response head of the pending request before the client sees it."""
        assert self._current is not None and self.pending is not None
        self._current.edit_response = edit

    def retry_with(self, hook: RetryHook) -> None:
        """Let ``hook`` decide, per try of the pending request, whether it is sent again."""
        current = self._current
        assert current is not None and self.pending is not None
        current.retry = hook
        if current.body is None and not current.request_done:
            current.body = bytearray()

    def mirror_with(self) -> None:
        """Hold the pending request whole, to hand it to ``take_mirrors`` once complete."""
        current = self._current
        assert current is not None and self.pending is not None
        current.mirror = True
        if current.body is None and not current.request_done:
            current.body = bytearray()

    def attach(self, upstream: h11.Connection, tag: T) -> None:
        """Serve the pending request with ``upstream`` (fresh from ``new_upstream`` or
        released reusable): its head goes out, then the body as it arrives (or, for a retry,
        the body held)."""
        current, request = self._current, self._request
        assert current is not None and request is not None and self.pending is not None
        assert upstream.our_state is h11.IDLE, "attach a fresh or released reusable upstream"
        self.pending, self._request = None, None
        current.upstream, current.tag, current.request = upstream, tag, request
        self._to_upstream += upstream.send(request)
        if current.request_done:
            if current.body:
                self._to_upstream += upstream.send(h11.Data(data=bytes(current.body)))
            self._to_upstream += upstream.send(h11.EndOfMessage(headers=current.trailers))
        self._pump_client()

    def respond_locally(
        self,
        status: int,
        flags: str,
        body: bytes,
        tag: T | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Answer the pending request here (no upstream); its body is read and discarded."""
        current = self._current
        assert current is not None and self.pending is not None
        self.pending, self._request = None, None
        current.tag, current.local = tag, True
        current.exchange.flags = flags
        self._answer(current, status, body, headers)
        if not self.closing:
            self._pump_client()

    def expire(self, body: bytes) -> None:
        """The request's time ran out (the shell's timer): 504 ``UT`` if its response has not
        started (the upstream released, not reusable), else the client connection closes."""
        current = self._current
        if current is None or self.closing or self.tunnel:
            return
        if self.pending is not None:
            self.respond_locally(504, UPSTREAM_TIMEOUT, body, current.tag)
            return
        self._end_try(current, timeout=True, retry=False, body=body)

    def try_expired(self, body: bytes) -> None:
        """The attached try's own time ran out (``backendRequest``): retried if the hook says
        so, else as ``expire``."""
        current = self._current
        if current is None or current.upstream is None or self.closing or self.tunnel:
            return
        self._end_try(current, timeout=True, retry=True, body=body)

    def upstream_failed(self) -> None:
        """The attached upstream broke (reset, closed, unreachable)."""
        current = self._current
        if current is None or current.upstream is None or self.closing or self.tunnel:
            return
        self._upstream_gone(current, current.upstream)

    # -- client side -------------------------------------------------------------------------
    def _pump_client(self) -> None:
        while not (self.closing or self.tunnel) and self.pending is None:
            try:
                event = self.client.next_event()
            except h11.RemoteProtocolError as e:
                if self._client_eof:  # the client went away mid-request: not bad input
                    self._client_left()
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
                    self._client_left()
                return

    def _client_left(self) -> None:
        current = self._current
        if current is not None:
            current.exchange.flags = DOWNSTREAM_CLOSED
            self._finish(current)
            if current.upstream is not None:  # its request or response is cut: not reusable
                self._released.append((current.upstream, False))
        self.pending, self._request = None, None
        self.closing = True

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
        """Answer bad input (if the client may still get a response) and close."""
        self._rejections.append(cause)
        current, respond = self._current, self.client.our_state in (h11.IDLE, h11.SEND_RESPONSE)
        if current is not None:
            if respond:
                current.exchange.status = status
            self._finish(current)
            if current.upstream is not None:
                self._released.append((current.upstream, False))
        self.pending, self._request = None, None
        self.closing = True
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
        headers, upgrade = forwarded_headers(req.headers)
        request_id = header(req.headers, b"x-request-id")
        if request_id is None:
            request_id = self.new_request_id()
            headers.append((b"x-request-id", request_id.encode()))
        target = req.target.decode("latin-1")
        head = RequestHead(
            method=req.method.decode("latin-1"),
            path=target.split("?", 1)[0].split("#", 1)[0],
            host=header(req.headers, b"host") or "",
            request_id=request_id,
            trace=trace_headers_of(req.headers),
            headers=req.headers,
        )
        self._current = _Current(Exchange(head, self.clock()), upgrade=upgrade)
        self._request = h11.Request(method=req.method, target=req.target, headers=headers)
        self.pending = head

    def _on_request_data(self, event: h11.Data) -> None:
        current = self._current
        if current is None:
            return
        current.exchange.request_bytes += len(event.data)
        if current.body is not None:
            if len(current.body) + len(event.data) > self.max_replay_bytes:
                current.body = None  # too large to hold: this request will not be sent again
            else:
                current.body += event.data
        if current.upstream is not None and not current.local:
            self._to_upstream += current.upstream.send(h11.Data(data=event.data))

    def _on_request_end(self, event: h11.EndOfMessage) -> None:
        current = self._current
        trailers = [(n, v) for n, v in event.headers if n.lower() not in HOP_BY_HOP]
        if current is not None:
            current.request_done, current.trailers = True, trailers
            if current.mirror and current.request is not None and not current.local:
                body = bytes(current.body) if current.body is not None else None
                self._mirrors.append(Mirrored(current.request, body, trailers, current.tag))
        if current is not None and current.upstream is not None and not current.local:
            self._to_upstream += current.upstream.send(h11.EndOfMessage(headers=trailers))
        self._maybe_next_cycle()

    # -- upstream side -----------------------------------------------------------------------
    def _pump_upstream(self, current: _Current[T], upstream: h11.Connection) -> None:
        while not (self.closing or self.tunnel) and self._current is current:
            try:
                event = upstream.next_event()
            except h11.RemoteProtocolError:
                self._rejections.append(UPSTREAM_PROTOCOL)
                self._upstream_gone(current, upstream)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.InformationalResponse):
                self._on_informational(current, upstream, event)
            elif isinstance(event, h11.Response):
                if self._retried(current, upstream, event.status_code):
                    return
                headers, _ = forwarded_headers(event.headers, keep_upgrade=False)
                if current.edit_response is not None:
                    headers = _edited(headers, current.edit_response)
                current.exchange.status = event.status_code
                current.response_started = True
                self._send_client(
                    h11.Response(
                        status_code=event.status_code, headers=headers, reason=event.reason
                    )
                )
            elif isinstance(event, h11.Data):
                current.exchange.response_bytes += len(event.data)
                self._send_client(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                trailers = [(n, v) for n, v in event.headers if n.lower() not in HOP_BY_HOP]
                self._send_client(h11.EndOfMessage(headers=trailers))
                self._maybe_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                self._upstream_gone(current, upstream)
                return

    def _on_informational(
        self, current: _Current[T], upstream: h11.Connection, event: h11.InformationalResponse
    ) -> None:
        if event.status_code == 101 and current.upgrade:
            headers = [(n, v) for n, v in event.headers if n not in HOP_BY_HOP]
            headers += [(n, v) for n, v in event.headers if n in (b"connection", b"upgrade")]
            self._send_client(
                h11.InformationalResponse(status_code=101, headers=headers, reason=event.reason)
            )
            current.exchange.status = 101
            self._finish(current)
            self.tunnel = True
            self._to_client += upstream.trailing_data[0]
            self._to_upstream += self.client.trailing_data[0]
            return
        if event.status_code == 101:  # a 101 nobody asked for: the endpoint is broken
            self._rejections.append(UPSTREAM_PROTOCOL)
            self._upstream_gone(current, upstream)
            return
        headers = [(n, v) for n, v in event.headers if n not in HOP_BY_HOP]
        self._send_client(
            h11.InformationalResponse(
                status_code=event.status_code, headers=headers, reason=event.reason
            )
        )

    def _upstream_gone(self, current: _Current[T], upstream: h11.Connection) -> None:
        self._end_try(current, timeout=False, retry=True, body=UPSTREAM_RESET_BODY)

    def _end_try(self, current: _Current[T], *, timeout: bool, retry: bool, body: bytes) -> None:
        """The attached try ends without (the rest of) its response: retried when allowed,
        else answered here (504 ``UT`` or 503 ``UC``) or, mid-response, the client closed."""
        upstream = current.upstream
        if upstream is not None:
            current.upstream = None
            self._released.append((upstream, False))
        if not current.response_started and retry and self._retry(current, None):
            return
        current.exchange.flags = UPSTREAM_TIMEOUT if timeout else UPSTREAM_CLOSED
        if current.response_started:
            self._finish(current)
            self.closing = True
            return
        current.local = True
        self._answer(current, 504 if timeout else 503, body)

    def _retried(self, current: _Current[T], upstream: h11.Connection, status: int) -> bool:
        """A response head arrived: if the hook retries its status, drop this try."""
        if current.retry is None or not self._retry(current, status):
            return False
        current.upstream = None
        self._released.append((upstream, False))
        return True

    def _retry(self, current: _Current[T], status: int | None) -> bool:
        """Ask the hook; on yes, the request waits in ``pending`` for another upstream."""
        if current.retry is None or current.request is None:
            return False
        replayable = current.request_done and current.body is not None
        if not current.retry(status, replayable):
            return False
        self.pending, self._request = current.exchange.head, current.request
        return True

    # -- cycles ------------------------------------------------------------------------------
    def _answer(
        self,
        current: _Current[T],
        status: int,
        body: bytes,
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        """A complete response made here; the connection goes on after it when it can."""
        if self.client.our_state is not h11.SEND_RESPONSE:
            self._finish(current)
            self.closing = True
            return
        headers = [
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(body)).encode()),
            *((n.encode("latin-1"), v.encode("latin-1")) for n, v in extra),
        ]
        # A client waiting for 100-continue has not sent its body and may never: where the
        # next request would start is unknowable, so this response is the last.
        last = self.client.they_are_waiting_for_100_continue
        if last:
            headers.append((b"connection", b"close"))
        reason = _REASONS.get(status, b"")
        self._send_client(h11.Response(status_code=status, headers=headers, reason=reason))
        self._send_client(h11.Data(data=body))
        self._send_client(h11.EndOfMessage())
        current.exchange.status = status
        current.exchange.response_bytes = len(body)
        current.response_started = True
        if last:
            self._finish(current)
            self.closing = True
            return
        self._maybe_next_cycle()

    def _send_client(self, event: h11.Event) -> None:
        data = self.client.send(event)
        if data:
            self._to_client += data

    def _finish(self, current: _Current[T]) -> None:
        current.exchange.ended = self.clock()
        self._completed.append((current.exchange, current.tag))
        self._current = None

    def _maybe_next_cycle(self) -> None:
        """After a message ended: once request and response are complete, report the exchange,
        release its upstream (reusable when both of its sides are DONE), and start the next
        cycle, or close if the client side must."""
        current = self._current
        if current is None:
            return
        ours, theirs = self.client.our_state, self.client.their_state
        if ours not in _ENDED or theirs not in _ENDED:
            return
        upstream = current.upstream
        if upstream is not None and upstream.their_state not in _ENDED:
            return
        self._finish(current)
        if upstream is not None:
            reusable = upstream.states == {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}
            if reusable:
                upstream.start_next_cycle()
            self._released.append((upstream, reusable))
        if not (ours is h11.DONE and theirs is h11.DONE):
            self.closing = True  # the client asked to close: this was the last request
            return
        self.client.start_next_cycle()
        self._pump_client()
        if self._current is None and self.head_started is None and self.client.trailing_data[0]:
            self.head_started = self.clock()  # a pipelined head is pending: its clock runs


def _edited(
    headers: Sequence[tuple[bytes, bytes]], edit: Callable[[StrHeaders], StrHeaders]
) -> list[tuple[bytes, bytes]]:
    """Response headers after a route's modifier; framing headers stay as the endpoint sent
    them (a modifier must not change how the body is delimited)."""
    framing = [(n, v) for n, v in headers if n in (b"content-length", b"transfer-encoding")]
    edited = edit([(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers])
    out = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in edited]
    return [(n, v) for n, v in out if n not in (b"content-length", b"transfer-encoding")] + framing


def mirror_request(
    upstream: h11.Connection, copy: Mirrored[T], body: bytes
) -> tuple[RequestHead, bytes]:
    """A mirrored request as sent on ``upstream`` (fresh): ``Host`` suffixed ``-shadow``, as
    Envoy marks shadow traffic; its head (for a same-node endpoint's authorization) and bytes."""
    request = copy.request
    headers = [(n, v + b"-shadow" if n == b"host" else v) for n, v in request.headers]
    target = request.target.decode("latin-1")
    head = RequestHead(
        method=request.method.decode("latin-1"),
        path=target.split("?", 1)[0],
        host=header(headers, b"host") or "",
        request_id=header(headers, b"x-request-id") or "",
        trace=trace_headers_of(headers),
        headers=headers,
    )
    out = upstream.send(h11.Request(method=request.method, target=request.target, headers=headers))
    if body:
        out = (out or b"") + (upstream.send(h11.Data(data=body)) or b"")
    out = (out or b"") + (upstream.send(h11.EndOfMessage(headers=copy.trailers)) or b"")
    return head, out


class DroppedResponse:
    """Reads one response to its end and keeps only its status (a mirror's answer)."""

    def __init__(self, upstream: h11.Connection) -> None:
        self.upstream = upstream
        self.status = 0

    def receive(self, data: bytes) -> bool:
        """Feed bytes (``b""``: end of stream); True once the response ended. Raises
        ``ConnectionResetError`` when the stream ends first or is not HTTP."""
        self.upstream.receive_data(data)
        while True:
            try:
                event = self.upstream.next_event()
            except h11.RemoteProtocolError as e:
                raise ConnectionResetError(f"the mirror's answer is not HTTP/1.1: {e}") from e
            if event is h11.NEED_DATA:
                return False
            if isinstance(event, h11.Response):
                self.status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                return True
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("the mirror closed before its response ended")


def header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    for n, v in headers:
        if n == name:
            return v.decode("latin-1")
    return None


def forwarded_headers(
    headers: Sequence[tuple[bytes, bytes]], *, keep_upgrade: bool = True
) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The headers without hop-by-hop ones; and whether this is an upgrade request (then
    ``Connection: upgrade`` and ``Upgrade`` are kept: the endpoint must see the proposal)."""
    listed = {
        t.strip().lower()
        for n, v in headers
        if n == b"connection"
        for t in v.split(b",")
        if t.strip()
    }
    upgrade = keep_upgrade and b"upgrade" in listed and header(headers, b"upgrade") is not None
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
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Error"))]
    lines += [n + b": " + v for n, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
