"""The source node's HTTP/1.1 layer: one client connection, a different upstream per request.

Why not ``agent.proxy.http1.Http1Proxy``: that one pins the client connection to one upstream
connection (the destination node relays to one pod). Here each request may go to another
endpoint, so the upstream half is *attached* per request and *released* after it, to be pooled
by the shell (``agent.proxy.http_outbound``) and attached again to a later request, maybe of
another client connection. The interface to the shell is narrow: bytes in (``receive_client``,
``receive_upstream``), bytes out (``take_to_client``, ``take_to_upstream``), and five
decisions: ``pending`` (a request head waits for an upstream), ``attach``, ``respond_locally``
(503 for no endpoint), ``answer_try`` (a same-node endpoint's refusal, 403 or 429: the try's
answer, which the retry hook sees as it sees an endpoint's response) and ``take_released``
(the upstream half is free again; whether it can be reused).

Why llhttp (``agent.proxy.http1_codec``): the destination measured h11 at about a quarter of
its agent's CPU per request and moved to llhttp; this side followed, with the same two halves:
a ``RequestReader`` for the client (we are its server) and, per upstream session, a
``ResponseReader`` (``UpstreamHalf``, we are the endpoint's client). Sans-IO: no sockets, no
clock of its own (``clock`` is injected), tested byte for byte.

Per request, as at the destination: a head that could be read two ways (both
``Content-Length`` and ``Transfer-Encoding``) is 400, a transfer coding other than ``chunked``
501, a head over ``max_head_bytes`` 431, a malformed one 400, each closing the client; a head
not complete in time is the shell's to time out (``header_timeout``: 408). Hop-by-hop headers
are removed (RFC 9110 7.6.1); a chunked body is re-chunked from the validated chunks, and a
response delimited by the endpoint's close is chunked for an HTTP/1.1 client (its end is then
the last chunk, not the close); ``x-request-id`` is added when absent; ``Expect: 100-continue``
goes to the endpoint and its ``100`` comes back; an upgrade answered ``101`` turns the
connection into an opaque tunnel to that upstream (``tunnel``), with what either side sent
after the heads handed over. The client connection does not inherit an upstream's
``Connection: close``: the next request simply gets another upstream session.

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
primary's way (``mirror_request`` writes it, ``DroppedResponse`` reads its answer). Neither
edit may change how a body is delimited: ``Content-Length`` and ``Transfer-Encoding`` stay as
they came.

Failures, with Envoy's response flags: an upstream that closes, resets or garbles before its
response head is answered 503 ``UC`` (502 for a ``direct`` upstream, a same-node pod: what its
destination proxy answers; the client connection keeps serving unless its request body cannot
be skipped); after the head, the client connection is closed (``UC``). The shell
answers 503 ``UF``/``UH``/``UO`` through ``respond_locally`` when no upstream could be had.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from agent.proxy.http1 import (
    DEFAULT_MAX_HEAD_BYTES,
    DOWNSTREAM_CLOSED,
    HEAD_NOT_COMPLETE,
    HEADER_TIMEOUT,
    PEER_RESPONSE,
    SHADOW_SUFFIX,
    UPSTREAM_CLOSED,
    UPSTREAM_PROTOCOL,
    ClientSide,
    Exchange,
    RequestHead,
    new_request_id,
    persistence,
)
from agent.proxy.http1_codec import (
    DEFAULT_MAX_FIELDS,
    HOP_BY_HOP,
    NO_ALLOWANCE,
    Body,
    End,
    Head,
    Headers,
    RequestReader,
    ResponseReader,
    chunk,
    forwarded_headers,
    header_value,
    last_chunk,
    request_head,
    response_head,
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
    429: b"Too Many Requests",  # a same-node endpoint's rate limit
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",  # a same-node pod lost before its response head (``direct``)
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}
_FRAMING = (b"content-length", b"transfer-encoding")


class UpstreamHalf:
    """The client half of one upstream session (kept with the session across requests): reads
    the responses to the requests sent on it."""

    __slots__ = ("direct", "reader")

    def __init__(
        self,
        max_head_bytes: int,
        direct: bool = False,
        max_fields: int = DEFAULT_MAX_FIELDS,
        peer: bool = False,
    ) -> None:
        # A response from a destination node (``peer``, over HBONE) may carry what that node
        # added to the pod's, which the limits do not count (``PEER_RESPONSE``)
        allowance = PEER_RESPONSE if peer else NO_ALLOWANCE
        self.reader = ResponseReader(*allowance.added_to(max_head_bytes, max_fields))
        # The pod itself, with no proxy of its own in front (a same-node endpoint, which this
        # node admits for its destination): a loss before the response head is answered 502,
        # as that proxy (a far node) answers the source for it, not 503.
        self.direct = direct

    @property
    def idle(self) -> bool:
        """Between responses with nothing unasked read: may carry another request."""
        reader = self.reader
        return not (
            reader.events or reader.mid_message or reader.failed or reader.upgraded is not None
        )


def new_upstream(
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
    *,
    direct: bool = False,
    max_fields: int = DEFAULT_MAX_FIELDS,
    peer: bool = False,
) -> UpstreamHalf:
    """The client half of one upstream session (``direct``: ``UpstreamHalf.direct``), reading
    response heads and trailer blocks of at most ``max_fields`` fields (``peer``: a
    destination node's, with what it adds on top)."""
    return UpstreamHalf(max_head_bytes, direct, max_fields, peer)


@dataclass(frozen=True, slots=True)
class Mirrored(Generic[T]):
    """A complete request to copy: the head as forwarded, the body (``None`` when it went past
    the limit: no copy can be made) and trailers; ``tag`` is the request's."""

    method: bytes
    target: bytes
    headers: Headers
    chunked: bool  # the body is sent chunked (its ``Transfer-Encoding`` says so)
    body: bytes | None
    trailers: Headers
    tag: T | None


@dataclass(slots=True)
class _Current(Generic[T]):
    exchange: Exchange
    method: bytes
    target: bytes
    headers: Headers  # as forwarded
    keep_alive: bool  # the client's request lets its connection carry another
    http10: bool  # an HTTP/1.0 client: no chunked response for it
    request_chunked: bool
    upgrade: bool  # the request proposes an upgrade, not answered yet
    waiting_for_100: bool  # the client sent Expect: 100-continue and no body yet
    tag: T | None = None
    upstream: UpstreamHalf | None = None
    local: bool = False  # answered here (or the upstream is gone): the request body is dropped
    request_done: bool = False
    response_started: bool = False
    response_done: bool = False
    response_chunked: bool = False  # chunk the response body for the client
    upstream_keep_alive: bool = True  # the upstream's response lets its session go on
    last: bool = False  # the client connection ends after this exchange
    retry: RetryHook | None = None
    body: bytearray | None = None  # the request body, held while it may be sent again
    trailers: Headers = field(default_factory=list)  # the request's, as forwarded
    edit_response: Callable[[StrHeaders], StrHeaders] | None = None
    mirror: bool = False


@dataclass
class SourceHttp1(ClientSide[_Current[T]], Generic[T]):
    """One client connection; ``T`` is the shell's per-request tag, handed back with each
    finished exchange (``take_completed``)."""

    clock: Callable[[], float] = time.monotonic
    new_request_id: Callable[[], str] = new_request_id
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES
    max_fields: int = DEFAULT_MAX_FIELDS  # per request head or trailer block
    max_replay_bytes: int = DEFAULT_MAX_REPLAY_BYTES
    client: RequestReader = field(init=False)
    closing: bool = field(default=False, init=False)  # close the client once flushed
    tunnel: bool = field(default=False, init=False)  # switched protocols: relay raw bytes
    head_started: float | None = field(default=None, init=False)
    pending: RequestHead | None = field(default=None, init=False)  # waits for attach/respond
    _current: _Current[T] | None = field(default=None, init=False)
    _to_client: list[bytes] = field(default_factory=list, init=False)
    _to_upstream: list[bytes] = field(default_factory=list, init=False)
    # What the ``take_*`` methods hand over; the shell looks at them (never changes them) to
    # skip an empty take: it flushes twice a request, and four takes were four frames a flush
    completed: list[tuple[Exchange, T | None]] = field(default_factory=list, init=False)
    rejections: list[str] = field(default_factory=list, init=False)
    released: list[tuple[UpstreamHalf, bool]] = field(default_factory=list, init=False)
    mirrors: list[Mirrored[T]] = field(default_factory=list, init=False)
    refusal: str | None = field(default=None, init=False)
    lingers: bool = field(default=False, init=False)
    _client_eof: bool = field(default=False, init=False)
    _reasons = _REASONS

    def __post_init__(self) -> None:
        self.client = RequestReader(self.max_head_bytes, self.max_fields)

    # -- output ------------------------------------------------------------------------------
    def take_completed(self) -> list[tuple[Exchange, T | None]]:
        out, self.completed = self.completed, []
        return out

    def take_mirrors(self) -> list[Mirrored[T]]:
        """Requests the client finished sending that are to be mirrored."""
        out, self.mirrors = self.mirrors, []
        return out

    def take_released(self) -> list[tuple[UpstreamHalf, bool]]:
        """Upstream halves done with their request: (half, reusable for another request)."""
        out, self.released = self.released, []
        return out

    @property
    def attached(self) -> bool:
        """A request is being served by an upstream (bytes from it are expected)."""
        current = self._current
        return current is not None and current.upstream is not None

    @property
    def between_requests(self) -> bool:
        """No request in flight nor begun (none served, pending, parsed or half read): the
        keep-alive connection is idle, which the Service's ``idleTimeout`` times."""
        client = self.client
        return (
            self._current is None
            and self.head_started is None
            and not (
                self.closing or self.tunnel or client.events or client.held or client.mid_message
            )
        )

    @property
    def current_tag(self) -> T | None:
        """The shell's tag of the request being served (or pending), if any."""
        return self._current.tag if self._current is not None else None

    @property
    def current_exchange(self) -> Exchange | None:
        """The exchange of the request being served (or pending), if any."""
        return self._current.exchange if self._current is not None else None

    @property
    def pending_target(self) -> str:
        """The pending request's target as it will be sent (path and query)."""
        assert self._current is not None and self.pending is not None
        return self._current.target.decode("latin-1")

    def wants_client_data(self) -> bool:
        """Read the client now? Not while a head waits for an upstream, nor once the request
        is complete (a pipelined next request waits in the kernel, not in memory), nor while
        what was read waits its turn (a parsed pipelined request, bytes after an upgrade
        proposal)."""
        if self.closing or self.tunnel or self.pending is not None or self._client_eof:
            return False
        client = self.client
        if client.events or client.held or client.upgraded is not None:
            return False
        current = self._current
        return current is None or not current.request_done

    # -- input -------------------------------------------------------------------------------
    def receive_upstream(self, data: bytes) -> None:
        """Bytes from the attached upstream; ``b""`` is its end of stream (after ``tunnel``:
        passed through as they are, like ``receive_client``)."""
        if self.tunnel:
            if data:
                self._to_client.append(data)
            return
        current = self._current
        if self.closing or current is None or current.upstream is None:
            return
        upstream = current.upstream
        if data:
            upstream.reader.feed(data)
            self._pump_upstream(current, upstream)
            return
        if upstream.reader.eof():  # it ended a body delimited by the close
            self._pump_upstream(current, upstream)
        if self._current is current and current.upstream is upstream and not self.closing:
            self._upstream_gone(current, upstream)

    def header_timeout(self) -> None:
        """The head did not complete in time: 408 and close (slowloris)."""
        if not (self.closing or self.tunnel):
            self._refuse(408, HEADER_TIMEOUT, HEAD_NOT_COMPLETE)

    def edit_pending(self, edit: Callable[[str, StrHeaders], tuple[str, StrHeaders]]) -> None:
        """Change the pending request's forwarded target and headers (lower-case names;
        ``host`` must stay; the body's framing headers stay as sent)."""
        current = self._current
        assert current is not None and self.pending is not None
        target, headers = edit(current.target.decode("latin-1"), _text(current.headers))
        current.target = target.encode("latin-1")
        current.headers = _framed(current.headers, headers)

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

    def attach(self, upstream: UpstreamHalf, tag: T) -> None:
        """Serve the pending request with ``upstream`` (fresh from ``new_upstream`` or
        released reusable): its head goes out, then the body as it arrives (or, for a retry,
        the body held)."""
        current = self._current
        assert current is not None and self.pending is not None
        assert upstream.idle, "attach a fresh or released reusable upstream"
        self.pending = None
        current.upstream, current.tag = upstream, tag
        upstream.reader.expect(current.method)
        self._to_upstream.append(request_head(current.method, current.target, current.headers))
        if current.request_done:  # sent again: the body was held whole
            self._to_upstream.append(
                _framed_body(current.request_chunked, current.body, current.trailers)
            )
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
        self.pending = None
        current.tag = tag
        self._answer_here(current, status, flags, body, headers)

    def _answer_here(
        self,
        current: _Current[T],
        status: int,
        flags: str,
        body: bytes,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        current.local = True
        current.exchange.flags = flags
        self._answer(current, status, body, headers)
        if not self.closing:
            self._pump_client()

    def answer_try(self, status: int, flags: str, body: bytes, tag: T) -> None:
        """The pending request's try was answered ``status`` by its endpoint's own proxy (a
        same-node endpoint's policy or rate limit, where its destination node would answer):
        as after that answer from an endpoint, the body the client sent so far is taken (held
        for a replay, sent nowhere) and the retry hook asked about ``status``; sent again
        (``pending`` again) if it says so, else answered here with ``flags``."""
        current = self._current
        assert current is not None and self.pending is not None
        self.pending = None
        current.tag = tag
        self._pump_client()
        if self.closing or self._current is not current:
            return  # the body was bad: refused (``_refuse``)
        if not self._retry(current, status):
            self._answer_here(current, status, flags, body)

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
    def _after_switch(self, data: bytes) -> None:
        """Bytes read before the shell switched to relaying pass through as they are."""
        if data:
            self._to_upstream.append(data)

    def _client_ended(self) -> None:
        """The client's end of stream: a request it cut short ends the connection; one it
        completed (and any complete one queued behind it) still gets its response."""
        current, events = self._current, self.client.events
        if current is not None:
            if not current.request_done and not any(isinstance(e, End) for e in events):
                self._client_left()
        elif not (events or self.client.held):
            self.closing = True

    def _client_left(self) -> None:
        current = self._current
        if current is not None:
            current.exchange.flags = DOWNSTREAM_CLOSED
            self._finish(current)
            if current.upstream is not None:  # its request or response is cut: not reusable
                self.released.append((current.upstream, False))
        self.pending = None
        self.closing = True

    def _refused(self, current: _Current[T] | None) -> None:
        """The refused request's upstream, if any, is released unreusable."""
        if current is not None and current.upstream is not None:
            self.released.append((current.upstream, False))
        self.pending = None

    def _on_request(self, req: Head, head: RequestHead, headers: Headers, upgrade: bool) -> None:
        self._current = _Current(  # by position, in its fields' order
            Exchange(head, self.clock()),
            req.method,
            req.target,
            headers,
            req.keep_alive,
            req.http10,
            req.chunked,  # request_chunked
            upgrade,
            req.expect_continue,  # waiting_for_100
        )
        self.pending = head

    def _on_request_data(self, current: _Current[T], data: bytes) -> None:
        current.exchange.request_bytes += len(data)
        current.waiting_for_100 = False
        body = current.body
        if body is not None:
            if len(body) + len(data) > self.max_replay_bytes:
                current.body = None  # too large to hold: this request will not be sent again
            else:
                body += data
        if current.upstream is not None and not current.local:
            self._to_upstream.append(chunk(data) if current.request_chunked else data)

    def _on_request_end(self, current: _Current[T], event: End) -> None:
        current.request_done = True
        current.waiting_for_100 = False
        trailers = [(n, v) for n, v in event.trailers if n not in HOP_BY_HOP]
        current.trailers = trailers
        if current.mirror and not current.local:
            body = bytes(current.body) if current.body is not None else None
            self.mirrors.append(
                Mirrored(
                    current.method,
                    current.target,
                    current.headers,
                    current.request_chunked,
                    body,
                    trailers,
                    current.tag,
                )
            )
        if current.upstream is not None and not current.local and current.request_chunked:
            self._to_upstream.append(last_chunk(trailers))
        self._maybe_next_cycle()

    # -- upstream side -----------------------------------------------------------------------
    def _pump_upstream(self, current: _Current[T], upstream: UpstreamHalf) -> None:
        events = upstream.reader.events
        while (
            events
            and self._current is current
            and current.upstream is upstream
            and not (self.closing or self.tunnel)
        ):
            event = events.popleft()
            if isinstance(event, Body):
                data = event.data
                current.exchange.response_bytes += len(data)
                self._to_client.append(chunk(data) if current.response_chunked else data)
            elif isinstance(event, Head):
                if current.response_started:  # a second response to one request
                    self.rejections.append(UPSTREAM_PROTOCOL)
                    self._upstream_gone(current, upstream)
                elif event.status < 200:
                    self._on_informational(current, upstream, event)
                elif not self._retried(current, upstream, event.status):
                    self._on_response(current, event)
            elif isinstance(event, End):
                if not current.response_started:
                    continue  # the end of an informational response
                self._response_ended(current, event)
            else:
                self.rejections.append(UPSTREAM_PROTOCOL)
                self._upstream_gone(current, upstream)

    def _on_informational(self, current: _Current[T], upstream: UpstreamHalf, event: Head) -> None:
        if event.status == 101 and current.upgrade:
            self._switch(current, event, upstream.reader.upgraded)
            return
        if event.status == 101:  # a 101 nobody asked for: the endpoint is broken
            self.rejections.append(UPSTREAM_PROTOCOL)
            self._upstream_gone(current, upstream)
            return
        headers = [(n, v) for n, v in event.headers if n not in HOP_BY_HOP]
        self._to_client.append(response_head(event.status, event.reason, headers))
        if event.status == 100:
            current.waiting_for_100 = False  # the client sends its body now

    def _on_response(self, current: _Current[T], event: Head) -> None:
        fields = event.headers
        headers, _ = forwarded_headers(
            fields, keep_upgrade=False, noted=fields if event.noted is None else event.noted
        )
        if current.edit_response is not None:
            headers = _framed(headers, current.edit_response(_text(headers)))
        current.upstream_keep_alive = event.keep_alive
        # Still waiting for 100-continue: the last exchange (``ClientSide._response_ended``)
        last = not current.keep_alive or current.waiting_for_100
        bodiless = event.status in (204, 304) or current.method == b"HEAD"
        if not bodiless and (event.chunked or event.length is None):
            # Chunked, or delimited by the endpoint's close: the client sees chunks (an
            # HTTP/1.0 one, which cannot read them, the body up to our close).
            headers = [(n, v) for n, v in headers if n != b"transfer-encoding"]
            if current.http10:
                last = True
            else:
                headers.append((b"Transfer-Encoding", b"chunked"))
                current.response_chunked = True
        headers += persistence(last, current.http10)
        current.last = last
        current.exchange.status = event.status
        current.response_started = True
        self._to_client.append(response_head(event.status, event.reason, headers))
        self._declined(current)

    def _declined(self, current: _Current[T]) -> None:
        """A final response other than 101 answered an upgrade proposal: what the client sent
        after it is requests after all."""
        if current.upgrade:
            current.upgrade = False
            if self.client.upgraded is not None:
                self.client.resume()

    def _upstream_gone(self, current: _Current[T], upstream: UpstreamHalf) -> None:
        status = 502 if upstream.direct else 503
        self._end_try(current, timeout=False, retry=True, body=UPSTREAM_RESET_BODY, status=status)

    def _end_try(
        self, current: _Current[T], *, timeout: bool, retry: bool, body: bytes, status: int = 503
    ) -> None:
        """The attached try ends without (the rest of) its response: retried when allowed,
        else answered here (504 ``UT``, or ``status`` ``UC``: 503, 502 for a ``direct``
        upstream) or, mid-response, the client closed. An upstream gone after a whole
        response only ends the exchange normally."""
        upstream = current.upstream
        if upstream is not None:
            current.upstream = None
            self.released.append((upstream, False))
        if current.response_done and not timeout:
            current.local = True  # what is left of the request body goes nowhere
            self._maybe_next_cycle()
            return
        if not current.response_started and retry and self._retry(current, None):
            return
        current.local = True
        current.exchange.flags = UPSTREAM_TIMEOUT if timeout else UPSTREAM_CLOSED
        if current.response_started:
            self._finish(current)
            self.closing = True
            return
        self._answer(current, 504 if timeout else status, body)

    def _retried(self, current: _Current[T], upstream: UpstreamHalf, status: int) -> bool:
        """A final response head arrived: if the hook retries its status, drop this try."""
        if current.retry is None or not self._retry(current, status):
            return False
        current.upstream = None
        self.released.append((upstream, False))
        return True

    def _retry(self, current: _Current[T], status: int | None) -> bool:
        """Ask the hook; on yes, the request waits in ``pending`` for another upstream."""
        if current.retry is None:
            return False
        replayable = current.request_done and current.body is not None
        if not current.retry(status, replayable):
            return False
        self.pending = current.exchange.head
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
        if current.response_started:
            self._finish(current)
            self.closing = True
            return
        if current.method == b"HEAD":
            body = b""
        headers = [
            (b"content-type", b"text/plain"),
            (b"content-length", b"%d" % len(body)),
            *((n.encode("latin-1"), v.encode("latin-1")) for n, v in extra),
        ]
        # A client waiting for 100-continue has not sent its body and may never: where the
        # next request would start is unknowable, so this response is the last.
        waiting = current.waiting_for_100
        last = waiting or not current.keep_alive
        headers += persistence(last, current.http10)
        self._to_client.append(response_head(status, _REASONS.get(status, b""), headers) + body)
        current.exchange.status = status
        current.exchange.response_bytes = len(body)
        current.response_started = current.response_done = True
        current.last = last
        if waiting:
            self._finish(current)
            self.closing = self.lingers = True
            return
        self._declined(current)
        self._maybe_next_cycle()

    def _finish(self, current: _Current[T]) -> None:
        current.exchange.ended = self.clock()
        self.completed.append((current.exchange, current.tag))
        self._current = None

    def _exchange_ended(self, current: _Current[T]) -> None:
        """Its upstream is released: reusable when its response let the session go on and
        nothing unasked followed it."""
        upstream = current.upstream
        if upstream is not None:
            self.released.append((upstream, current.upstream_keep_alive and upstream.idle))


def _text(headers: Headers) -> StrHeaders:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]


def _framed(sent: Headers, edited: StrHeaders) -> Headers:
    """Headers after a route's modifier, with the framing headers of ``sent`` as they were
    (a modifier must not change how the body is delimited)."""
    out = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in edited]
    return [(n, v) for n, v in out if n not in _FRAMING] + [
        (n, v) for n, v in sent if n in _FRAMING
    ]


def _framed_body(chunked: bool, body: bytes | bytearray | None, trailers: Headers) -> bytes:
    """A whole request body as framed on the wire (chunked: one chunk and the last one)."""
    data = bytes(body) if body else b""
    if not chunked:
        return data
    return (chunk(data) if data else b"") + last_chunk(trailers)


def mirror_request(
    upstream: UpstreamHalf, copy: Mirrored[T], body: bytes
) -> tuple[RequestHead, bytes]:
    """A mirrored request as sent on ``upstream`` (fresh): ``Host`` suffixed ``-shadow``, as
    Envoy marks shadow traffic; its head (for a same-node endpoint's authorization) and bytes."""
    headers = [(n, v + SHADOW_SUFFIX if n == b"host" else v) for n, v in copy.headers]
    target = copy.target.decode("latin-1")
    head = RequestHead(
        method=copy.method.decode("latin-1"),
        path=target.split("?", 1)[0].split("#", 1)[0],
        host=header_value(headers, b"host") or "",
        request_id=header_value(headers, b"x-request-id") or "",
        trace=trace_headers_of(headers),
        headers=headers,
    )
    upstream.reader.expect(copy.method)
    data = request_head(copy.method, copy.target, headers)
    return head, data + _framed_body(copy.chunked, body, copy.trailers)


class DroppedResponse:
    """Reads one response to its end and keeps only its status (a mirror's answer)."""

    __slots__ = ("final", "status", "upstream")

    def __init__(self, upstream: UpstreamHalf) -> None:
        self.upstream = upstream
        self.status = 0
        self.final = False  # the final (non-1xx) head came

    def receive(self, data: bytes) -> bool:
        """Feed bytes (``b""``: end of stream); True once the response ended. Raises
        ``ConnectionResetError`` when the stream ends first or is not HTTP."""
        reader = self.upstream.reader
        if data:
            reader.feed(data)
        elif not reader.eof():
            raise ConnectionResetError("the mirror closed before its response ended")
        events = reader.events
        while events:
            event = events.popleft()
            if isinstance(event, Head):
                self.status = event.status
                self.final = event.status >= 200
                if event.status == 101:
                    return True  # switched protocols: nothing more to read as HTTP
            elif isinstance(event, End):
                if self.final:
                    return True
            elif not isinstance(event, Body):
                raise ConnectionResetError(f"the mirror's answer is not HTTP/1.1: {event.cause}")
        return False
