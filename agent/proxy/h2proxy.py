"""The destination node's HTTP/2 (h2c) and gRPC layer: authorize and forward each stream, sans-IO.

Why sans-IO, as for HTTP/1.1 (``agent.proxy.http1``): stream multiplexing, flow control and the
flood limits are where an HTTP/2 proxy goes wrong, and they must be tested frame by frame
without sockets. ``H2Proxy`` holds two ``h2`` connections: the client side (we are its server,
h2c with prior knowledge inside the HBONE stream or on the plaintext listener) and the upstream
side (we are the pod's client, one h2c connection per client connection). The shell
(``agent.proxy.h2inbound``) feeds it bytes from either side and writes out what it produced
(``take_to_client``, ``take_to_upstream``); finished requests come out as ``H2Exchange``
records for telemetry, refusals of bad input as causes (``take_rejections``).

Per stream:

* the request's method, path (without its query) and ``:authority`` go to ``authorize`` (L7
  policy). A denied HTTP/2 request is answered ``403 RBAC: access denied``; a denied gRPC call
  (``content-type: application/grpc*``) a trailers-only response with ``grpc-status: 7``
  (PERMISSION_DENIED). Other streams on the connection go on;
* an allowed one gets ``x-request-id`` when absent and is opened on the upstream connection;
  headers, DATA and trailers are forwarded as they come, trailers-only responses stay
  trailers-only (a gRPC client needs that);
* ``grpc-status`` is read from the response trailers, or from the headers of a trailers-only
  response.

Flow control, both ways: DATA received from one side is acknowledged to it (its window
reopened) only once it was handed to the other side's connection, which happens only within
that side's send window. So what the proxy holds per connection is bounded by the windows it
advertised (``H2Limits``), and a side that stops reading (no WINDOW_UPDATE) stops the other.

An upstream that fails (closed, reset, garbled) is answered per stream as a client of Envoy would
see it: before response headers 502, or for gRPC a trailers-only ``grpc-status: 14``
(UNAVAILABLE), flag ``UC`` (``UR`` for a stream the pod reset); after them, the stream is reset.
The client is then sent GOAWAY so that it reconnects (and so gets a fresh pod connection).

On the source side the shell's ``pick`` may also answer a request itself (``LocalAnswer``: a
route's 404 ``NR``, which a gRPC call sees as ``UNIMPLEMENTED``), edit its forwarded and
response header blocks, and give it a timeout: the shell's timer (``next_deadline``,
``expire``) then resets the upstream stream and answers 504, or ``DEADLINE_EXCEEDED`` for
gRPC, flag ``UT`` (a response already begun is reset instead), or a per-try timeout whose
expiry is first offered to its retries, and give it ``Retries``: the
proxy then keeps the request's head and body (up to ``max_replay_body``) and, while nothing of
the response reached the client, asks them after a response head, a reset or a lost upstream;
a retried request waits its backoff on the same timer and is sent again where ``next`` says,
and a request the choice delays (an injected fault) waits on it too before its head goes out.
A choice's ``Resend`` (the backend Service's TrafficPolicy retries) is asked first, with no
backoff, about a try the endpoint never processed (RFC 9113 8.7): its upstream could not be
opened (``upstream_unreachable``), the pod refused the stream (REFUSED_STREAM), or its stream
was above the pod's GOAWAY; it is sent again at once while nothing of the response reached the
client and the proxy still holds all of its body that went upstream. The shell's ``admit`` is
asked about each try where its head is about to go: it may hold it (parked, until ``unpark``:
a same-node endpoint's connection is still opening) or answer it there (that endpoint's
policy or rate limit, as its destination node answers), an answer its ``retries`` see as that
try's response (a gRPC call's trailers-only answer as status 200), settled once the input at
hand is taken, so the body that came with the head is held for a replay (and copied, if it
mirrors, as a request a far node refuses is). A try dropped for a retry is kept as its upstream
saw it (``take_dropped``: the shell reports a same-node endpoint's as its destination would).
For an upstream the shell says is the pod itself (``direct``: a same-node endpoint, no proxy
of its own in front) a reset or loss before the response head is what that proxy would have
answered, 502 (gRPC: ``UNAVAILABLE``), to the ``retries``, as a far node's answer is.

Flood limits, as on HBONE (``agent.proxy.hbone_limits``): header blocks and CONTINUATIONs
(``agent.proxy.h2guard``), replies the client's frames made us queue since the shell last took
our output (PING and SETTINGS floods), streams reset by the client before their response
began and within a second of their start (rapid reset, counted like Envoy's premature resets:
beyond a number *and* over half the streams), runs of empty DATA frames, a header block still
open 10 s after it began (the shell's timer, ``head_started``, as for HTTP/1.1's head), and
``h2``'s own checks (frame size, header list size: a source node's blocks with what it added on
top, ``PEER_HEADER_LIST``, concurrent streams). Each closes the connection with GOAWAY and is
named by its cause.

This module holds ``H2Proxy``'s stream logic alone. Around it: ``agent.proxy.h2exchange`` (the
records and callbacks it shares with the shells and the router: ``H2Exchange``, ``Choice``,
``LocalAnswer``, ``Retries``...), ``agent.proxy.h2limits`` (``H2Limits``, the flood causes,
``new_connection``), ``agent.proxy.h2core`` (``H2Core``, what it shares with the frame relay:
the preface sniff, the flood counts, a request's exchange) and ``agent.proxy.h2streams`` (its
per-stream and per-upstream state, and the move of DATA within the windows).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    InformationalResponseReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.exceptions import FrameTooLargeError, ProtocolError, TooManyStreamsError
from h2.settings import SettingCodes
from hpack import NeverIndexedHeaderTuple

from agent.policy.traffic.attempts import REFUSED
from agent.proxy.grpcframing import MessageEnds
from agent.proxy.h2core import POD_LOST, H2Core, passed_on, with_path
from agent.proxy.h2exchange import (
    GRPC_DEADLINE_EXCEEDED,
    GRPC_UNAVAILABLE,
    LOST_BODY,
    NO_HEALTHY_UPSTREAM,
    NO_REPORTS,
    TIMEOUT_BODY,
    UPSTREAM_CONNECT_FAILURE,
    UPSTREAM_OVERFLOW,
    UPSTREAM_RESET,
    UPSTREAM_TIMEOUT,
    Admit,
    Authorize,
    Choice,
    H2Exchange,
    H2Mirrored,
    H2Reports,
    Header,
    LocalAnswer,
    Pick,
    PickRequest,
    grpc_status_for,
    header,
)
from agent.proxy.h2headers import Block, CheckedBlocks, MalformedHeaders, check_block
from agent.proxy.h2limits import (
    CONTROL_FLOOD,
    EMPTY_FRAMES,
    OVERSIZED_FRAME,
    PROTOCOL_ERROR,
    RAPID_RESET,
    TOO_MANY_STREAMS,
    H2Limits,
    new_connection,
)
from agent.proxy.h2streams import Stream, Upstream, move_queued
from agent.proxy.h2wire import (
    WALK_FROM,
    acknowledge_on,
    move_output,
    receive_on,
    send_headers_on,
)
from agent.proxy.http1 import (
    DOWNSTREAM_CLOSED,
    NO_FLAGS,
    UPSTREAM_CLOSED,
    UPSTREAM_PROTOCOL,
    new_request_id,
)

# Never reached the endpoint: answered 503 (a try lost on its way, 502).
_NOT_OPENED = frozenset({UPSTREAM_CONNECT_FAILURE, UPSTREAM_OVERFLOW})

# Request headers forwarded as never-indexed literals (RFC 7541 section 7.1.3). Values new on
# every call: indexed, they would fill the HPACK tables of the proxy's upstream connections (and
# the pod's) with entries never used again, evicting the ones every call reuses (hpack searches
# its dynamic table entry by entry for each header it encodes). And credentials, kept out of
# any compression context as ``h2``'s outbound normalisation (off here) would have.
NEVER_INDEXED = frozenset(
    (b"x-request-id", b"grpc-timeout", b"traceparent", b"b3", b"x-b3-traceid", b"x-b3-spanid",
     b"x-b3-parentspanid", b"authorization", b"proxy-authorization")
)  # fmt: skip


class H2Proxy(H2Core):
    """One client h2c connection and its upstream h2c connection(s).

    Without ``pick`` (the destination), every stream goes to one upstream (``uid`` 0, the pod),
    whose loss ends the client connection. With ``pick`` (the source), each request goes to the
    upstream ``pick`` names, one h2c connection per key, opened on first use: the shell learns
    of each new one from ``take_new_upstreams`` and connects it; one that fails or closes is
    forgotten, and the next request for its key opens another.
    """

    def __init__(
        self,
        authorize: Authorize,
        *,
        pick: Pick | None = None,
        admit: Admit | None = None,
        direct: Callable[[object], bool] | None = None,
        limits: H2Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
        new_request_id: Callable[[], str] = new_request_id,
    ) -> None:
        super().__init__(authorize, limits, clock, new_request_id)
        limits = self.limits
        self.pick, self.admit = pick, admit
        # Is upstream ``key`` the pod itself, with no proxy of its own in front (the source
        # side's same-node endpoint, which ``admit`` admits for its destination)?
        self.direct = direct
        # Tries dropped to be sent again (``take_dropped``): as each one's upstream saw it.
        self._dropped: list[H2Exchange] = []
        self._answered: list[tuple[Stream, LocalAnswer]] = []  # by ``admit``, to settle
        self.client = new_connection(client_side=False, limits=limits)
        # Blocks checked as they arrive (``check_block``), keeping the ones each side sends again
        self._requests = CheckedBlocks(Block.REQUEST)
        self._responses = CheckedBlocks(Block.RESPONSE)  # from any upstream of this client
        self._trailers = CheckedBlocks(Block.TRAILERS)  # the upstreams' (a client's: checked)
        self._streams: dict[int, Stream] = {}  # by client stream id
        self._upstreams: dict[int, Upstream] = {}  # by uid
        self._current: dict[object, Upstream] = {}  # by key: where new requests go
        self._new_upstreams: list[tuple[int, object]] = []
        self._next_uid = 0
        self._to_client = bytearray(self.client.data_to_send())
        self._mirrors: list[H2Mirrored] = []
        self._client_gone = False  # the client sent GOAWAY: no new streams will come
        self._upstream_gone = False  # destination: the pod's connection is unusable
        if pick is None:
            self._upstream_for(None)  # uid 0, connected by the shell from the start
            self._new_upstreams.clear()

    # -- the shell's interface ---------------------------------------------------------------
    def take_to_client(self) -> bytes:
        if self._sniff is not None:  # the client's preface not seen yet
            return self._held_output()
        move_output(self.client, self._to_client)
        self._unsent_replies = 0
        if not self._to_client:  # most passes of the shell (no new bytes made, none copied)
            return b""
        out, self._to_client = bytes(self._to_client), bytearray()
        return out

    def take_to_upstream(self, uid: int = 0) -> bytes:
        u = self._upstreams.get(uid)
        return u.conn.data_to_send() if u is not None else b""

    def has_upstream(self, key: object) -> bool:
        """Does a request for ``key`` go to an upstream that is open or opening (no new one)?"""
        return key in self._current

    def take_new_upstreams(self) -> list[tuple[int, object]]:
        """(uid, key) of each upstream opened since the last call: the shell connects them."""
        out, self._new_upstreams = self._new_upstreams, []
        return out

    def upstream_live(self, uid: int) -> bool:
        """Does the shell still need upstream ``uid`` (open streams, or new ones may come)?"""
        u = self._upstreams.get(uid)
        return u is not None and not (u.gone and not u.streams)

    def take_dropped(self) -> list[H2Exchange]:
        """The tries dropped before the client saw anything, to send the request again, each
        as its upstream saw it: its ``upstream``, ``sent``, ``ended``, the ``status`` of its
        response head (0: none came; ``flags`` then says what ended it: ``DC`` its time ran
        out, ``UR`` reset, ``UC`` lost) or its answer there (``admit``)."""
        out, self._dropped = self._dropped, []
        return out

    def take_mirrors(self) -> list[H2Mirrored]:
        """Complete requests whose choice asked for a copy, since the last call."""
        out, self._mirrors = self._mirrors, []
        return out

    def take_reports(self) -> H2Reports:
        """What ``take_completed``, ``take_dropped``, ``take_rejections`` and ``take_mirrors``
        would give, in one call: the source's shell asks after every input, and most inputs
        finish nothing (four calls and four new lists each, before)."""
        if not (self._completed or self._dropped or self._rejections or self._mirrors):
            return NO_REPORTS
        return (
            self.take_completed() if self._completed else (),
            self.take_dropped() if self._dropped else (),
            self.take_rejections() if self._rejections else (),
            self.take_mirrors() if self._mirrors else (),
        )

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def replay_held(self) -> int:
        """Request body bytes kept to send again (retries, resends) or to copy (mirrors)."""
        return sum(s.replay_size for s in self._streams.values() if s.replay_body is not None)

    def receive_client(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` when it closed its side."""
        if self.closing:
            return
        if not data:
            self._abort_all(DOWNSTREAM_CLOSED)
            return
        if self._sniff is not None:  # the client's first bytes: its preface?
            opened = self._opening(data)
            if opened is None:
                return
            data = opened
        if not self._guard(data):
            return
        move_output(self.client, self._to_client)  # ours, not replies to these bytes
        try:
            events = receive_on(self.client, data)
        except TooManyStreamsError:
            detail = f"a stream over the limit of {self.limits.max_concurrent_streams} open"
            self._fail_client(TOO_MANY_STREAMS, None, detail)
            return
        except FrameTooLargeError as e:
            self._fail_client(OVERSIZED_FRAME, None, str(e))
            return
        except ProtocolError as e:
            self._fail_client(PROTOCOL_ERROR, None, str(e))
            return
        # before we act: only h2's own answers
        self._unsent_replies += move_output(self.client, self._to_client)
        if (flood := self._replies_over()) is not None:
            self._fail_client(CONTROL_FLOOD, ErrorCodes.ENHANCE_YOUR_CALM, flood)
            return
        for event in events:
            try:
                self._client_event(event)
            except MalformedHeaders as e:
                self._fail_client(PROTOCOL_ERROR, ErrorCodes.PROTOCOL_ERROR, str(e))
            if self.closing:
                return
        self._pump()
        self._check_done()

    def receive_upstream(self, data: bytes, uid: int = 0) -> None:
        """Bytes from upstream ``uid``; ``b""`` when it closed its side."""
        u = self._upstreams.get(uid)
        if self.closing or u is None:
            return
        if not data:
            self.upstream_failed(uid)
            return
        try:
            events = receive_on(u.conn, data)
        except ProtocolError as e:
            self._reject(UPSTREAM_PROTOCOL, f"the pod's HTTP/2: {e}")
            self.upstream_failed(uid, code=ErrorCodes.INTERNAL_ERROR)
            return
        for event in events:
            try:
                self._upstream_event(u, event)
            except MalformedHeaders as e:
                self._reject(UPSTREAM_PROTOCOL, f"the pod's HTTP/2: {e}")
                self.upstream_failed(uid, code=ErrorCodes.INTERNAL_ERROR)
                return
        self._forget_if_done(u)
        self._pump()
        self._check_done()

    def next_deadline(self) -> float | None:
        """The clock time the soonest request timeout expires (the shell's timer), if any."""
        soonest: float | None = None  # ``min`` of them, without a list and two calls
        for s in self._streams.values():
            for t in (s.deadline, s.try_deadline, s.retry_at, s.send_at):
                if t and (soonest is None or t < soonest):
                    soonest = t
        return soonest

    def expire(self) -> None:
        """The shell's timer: every request whose timeout passed is reset upstream and, before
        its response began, answered 504 / ``DEADLINE_EXCEEDED``; after, its stream is reset
        (as Envoy does). Flag ``UT``. A try whose own time ran out is retried if its
        ``retries`` allow; a retry or a delayed request whose time came is sent."""
        if self.closing:
            return
        now = self.clock()
        for s in list(self._streams.values()):
            if s.deadline is not None and s.deadline <= now:
                self._time_out(s)
            elif s.try_deadline is not None and s.try_deadline <= now:
                s.try_deadline = None
                if not self._retried(s, None, DOWNSTREAM_CLOSED):
                    self._time_out(s)
            elif s.retry_at is not None and s.retry_at <= now:
                self._try_again(s)
            elif s.send_at is not None and s.send_at <= now:
                if s.parked:
                    s.send_at = None  # the delay is over; it still waits for ``unpark``
                else:
                    self._send_held(s)
        self._pump()
        self._check_done()

    def _resent(self, s: Stream, cause: str) -> bool:
        """The try of ``s`` was never processed by its endpoint (``cause``): if its ``resend``
        says so, send it again at once (answered instead when no endpoint is left)."""
        if s.resend is None or s.response_started or s.upstream is None:
            return False
        replayable = s.replay_head is not None and s.replay_body is not None
        choice = s.resend.unprocessed(cause, replayable=replayable)
        if choice is None:
            return False
        assert s.replay_head is not None and s.replay_body is not None
        # Nothing to reset upstream: the stream was never opened, refused, or above a GOAWAY.
        self._discard_request(s)
        self._release_response(s)
        s.upstream.streams.pop(s.upstream_id, None)
        s.upstream, s.upstream_id, s.request_sent, s.try_deadline = None, 0, False, None
        ex = s.exchange
        if isinstance(choice, LocalAnswer):
            self._answer_locally(s, choice)
            return True
        ex.upstream = choice.key
        # All of the body received so far goes again (its window was acknowledged already);
        # what the client sends from now on follows it.
        s.to_upstream.extend((chunk, 0) for chunk in s.replay_body)
        self._send_head(s, self._upstream_for(choice.key), s.replay_head)
        return True

    def _retried(self, s: Stream, status: int | None, lost: str = NO_FLAGS) -> bool:
        """The try of ``s`` ended with ``status`` (None: no response head; ``lost``: how it
        ended) before anything reached the client: if its ``retries`` say so, drop the try
        (``take_dropped``) and wait to send again."""
        if s.retries is None or s.response_started or s.upstream is None:
            return False
        ex = s.exchange
        replayable = s.request_end and s.replay_body is not None and s.replay_head is not None
        backoff = s.retries.after(status, ex.first_byte, replayable=replayable)
        if backoff is None:
            return False
        self._dropped.append(replace(ex, flags=lost, ended=self.clock()))
        self._reset_upstream(s)
        self._discard_request(s)
        self._release_response(s)
        s.upstream.streams.pop(s.upstream_id, None)
        s.upstream, s.upstream_id, s.request_sent = None, 0, False
        ex.status, ex.grpc_status, ex.first_byte = 0, "", 0.0
        s.retry_at, s.try_deadline = self.clock() + backoff, None
        return True

    def _try_again(self, s: Stream) -> None:
        """Send ``s`` again, exactly as first sent, where its ``retries`` now point."""
        s.retry_at = None
        assert s.retries is not None and s.replay_head is not None and s.replay_body is not None
        choice = s.retries.next()
        ex = s.exchange
        if isinstance(choice, LocalAnswer):
            self._answer_locally(s, choice)
            return
        ex.upstream = choice.key
        s.to_upstream.extend((chunk, 0) for chunk in s.replay_body)  # acknowledged already
        self._send_head(s, self._upstream_for(choice.key), s.replay_head)

    def _send_held(self, s: Stream) -> None:
        """The injected delay of ``s`` is over: its head (and the body that waited) go out."""
        assert s.held is not None
        head, s.held, s.send_at = s.held, None, None
        self._send_head(s, self._upstream_for(s.held_key), head)

    def _time_out(self, s: Stream) -> None:
        s.deadline = s.retry_at = s.try_deadline = s.send_at = None
        s.held = None
        s.exchange.flags = UPSTREAM_TIMEOUT
        whole = self._whole(s)
        self._reset_upstream(s)
        self._discard_request(s)
        self._release_response(s)
        if s.upstream is not None:
            s.upstream.streams.pop(s.upstream_id, None)
            s.upstream, s.upstream_id = None, 0
        if whole:  # ``DEADLINE_EXCEEDED`` as gRPC ends a call, not a reset (grpcio: CANCELLED)
            self._end_grpc(s, GRPC_DEADLINE_EXCEEDED, TIMEOUT_BODY)
        elif s.response_started:
            self._reset_client(s, ErrorCodes.CANCEL)
            self._complete(s)
        else:
            self._answer(s, 504, GRPC_DEADLINE_EXCEEDED, TIMEOUT_BODY)

    def unpark(self, tag: object, choice: Choice | LocalAnswer) -> bool:
        """The parked request whose choice carried ``tag`` may go: to ``choice.key`` (now, or
        when its delay ends), or answered with the ``LocalAnswer``. False if no such request
        waits (it ended meanwhile: answered, timed out, reset)."""
        s = next((x for x in self._streams.values() if x.parked and x.exchange.tag is tag), None)
        if s is None or self.closing:
            return False
        s.parked = False
        if isinstance(choice, LocalAnswer):
            s.held, s.send_at = None, None
            self._answer_locally(s, choice)
        else:
            s.held_key = s.exchange.upstream = choice.key
            if s.send_at is None:
                self._send_held(s)
        self._pump()
        self._check_done()
        return True

    def upstream_failed(
        self, uid: int = 0, flag: str = UPSTREAM_CLOSED, *, code: int | None = None
    ) -> None:
        """Upstream ``uid`` is gone (or could not be opened): answer or reset its open streams
        (``flag``: ``UO`` when the proxy had no room to open it, answered 503 as Envoy answers
        an overflow; ``code``: the reset of a response begun, ``_upstream_lost``'s unless
        given). At the destination the client is then sent GOAWAY, so that it reconnects."""
        u = self._upstreams.get(uid)
        if u is None:
            return
        self._retire(u)
        self._upstreams.pop(uid, None)
        for s in list(u.streams.values()):
            self._upstream_lost(s, flag, code)
        self._pump()  # the answers first: a client may stop reading streams at the GOAWAY
        if self.pick is None:
            self._goaway_client()
        self._check_done()

    def idle_close(self) -> bool:
        """The shell's idle timeout (the Service's ``idleTimeout``): with no stream open nor
        begun, GOAWAY (no error, the last stream taken) and close; False, and nothing done,
        while one is."""
        if self._streams or self.head_started is not None or self.closing:
            return False
        self._goaway_client()
        self._check_done()
        return True

    def upstream_unreachable(self, uid: int, cause: str) -> bool:
        """Upstream ``uid`` could not be opened (``cause``: a TrafficPolicy ``retryOn`` value):
        none of its requests reached the endpoint, so each is sent again where its ``resend``
        says, else answered 503 ``UF`` (gRPC ``UNAVAILABLE``) or retried by its ``retries`` as
        after a lost upstream. True if any of them was not sent again at once (the shell then
        counts the failure, as the last failed attempt of a connection is counted)."""
        u = self._upstreams.get(uid)
        if u is None:
            return False
        self._retire(u)
        self._upstreams.pop(uid, None)
        failed = False
        for s in list(u.streams.values()):
            if not self._resent(s, cause):
                failed = True
                self._upstream_lost(s, UPSTREAM_CONNECT_FAILURE)
        self._pump()
        self._check_done()
        return failed

    # -- client events -----------------------------------------------------------------------
    def _client_event(self, event: Event) -> None:
        # Told apart by the event's class, not ``isinstance`` (a call per test, some 30 per
        # gRPC call across both connections): ``h2`` subclasses none of these classes, as
        # ``test_h2s_events_the_proxy_tells_apart_have_no_subclasses`` checks.
        kind = type(event)
        e: Any = event  # narrowed by ``kind``
        if kind is RequestReceived:
            headers = self._requests.check(e.headers)
            self._on_request(e.stream_id, headers, ended=e.stream_ended is not None)
        elif kind is DataReceived:
            self._on_request_data(e.stream_id, e.data, e.flow_controlled_length)
        elif kind is TrailersReceived:
            trailers = check_block(e.headers, Block.TRAILERS)
            stream = self._streams.get(e.stream_id)
            if stream is not None:
                stream.request_trailers = list(trailers)
        elif kind is StreamEnded:
            stream = self._streams.get(e.stream_id)
            if stream is not None:
                stream.request_end = True
                if stream.mirror:  # (``_copy``'s first test, without a call per request)
                    self._copy(stream)
        elif kind is StreamReset:
            self._on_client_reset(e.stream_id)
        elif kind is ConnectionTerminated:
            if e.error_code == ErrorCodes.NO_ERROR:
                self._client_gone = True
            else:
                self._abort_all(DOWNSTREAM_CLOSED)

    def _on_request(self, stream_id: int, headers: Sequence[Header], *, ended: bool) -> None:
        if self._crossed_goaway(stream_id):
            self.client.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        exchange, made_id, path = self._new_exchange(headers)
        if path is not None:  # forwarded and routed as policy sees it
            headers = with_path(headers, path)
        forwarded = [NeverIndexedHeaderTuple(*h) if h[0] in NEVER_INDEXED else h for h in headers]
        if made_id is not None:
            forwarded.append(NeverIndexedHeaderTuple(b"x-request-id", made_id))
        head = exchange.head
        s = Stream(stream_id, exchange, request_end=ended)
        self._streams[stream_id] = s
        verdict = self.authorize(head)
        if not verdict.allowed:
            s.exchange.flags = verdict.flag
            s.exchange.denied_by = verdict.reason
            s.exchange.dry_run = verdict.dry_run
            self._answer(s, verdict.status, verdict.grpc_status, verdict.body)
            return
        if verdict.dry_run:
            exchange.dry_run = verdict.dry_run
        u = self._choose(s, (header(headers, b":path") or b"").decode("latin-1"))  # with its query
        if u is None and s.send_at is None and not s.parked:
            return
        if s.edit_request is not None:
            forwarded = s.edit_request(forwarded)
            s.edit_request = None
        if s.keeps_request:
            s.replay_head = forwarded
            if s.mirror:
                self._copy(s)
        if u is None:  # an injected delay (``expire`` sends it) or parked (``unpark`` does)
            s.held = forwarded
            return
        self._send_head(s, u, forwarded)

    def _copy(self, s: Stream) -> None:
        """Hand the copy of ``s`` over once the client sent all of it and its head went
        upstream (as Envoy's router copies after the fault filter: a delayed or parked request
        is copied when it is sent; one answered or reset before is not copied). A head its
        upstream's own proxy answered where it went (``admit``: a same-node endpoint's policy
        or rate limit) was sent, as one a far node refuses is: it is copied too. (Its callers
        ask ``s.mirror`` first: most requests are not copied, and this was three calls each.)"""
        if not s.mirror or not s.request_end or s.replay_head is None:
            return
        if s.upstream is None and not s.answered_there:
            return
        s.mirror = False
        body = b"".join(s.replay_body) if s.replay_body is not None else None
        self._mirrors.append(H2Mirrored(s.replay_head, body, s.request_trailers, s.exchange.tag))

    def _send_head(self, s: Stream, u: Upstream, head: list[Header]) -> None:
        if self.admit is not None:
            admitted = self.admit(s.exchange, u.key, u.uid)
            if admitted is False:  # held until the shell's ``unpark``
                s.held, s.held_key, s.parked = head, u.key, True
                return
            if admitted is not True:
                # Settled once the input at hand is taken (``_pump``): a far node's answer
                # comes after the source forwarded what it had, so the body that came with
                # the head is there for a replay. Held meanwhile, it keeps coming in.
                s.held, s.held_key, s.exchange.sent = head, u.key, self.clock()
                s.answered_there = True
                self._answered.append((s, admitted))
                if s.mirror:
                    self._copy(s)
                return
        s.exchange.sent = self.clock()
        up = u.conn
        # Fewer streams known than could reach the limit: no walk (``h2wire.WALK_FROM``).
        if len(up.streams) >= min(u.peer_limit, WALK_FROM) and (
            up.open_outbound_streams >= u.peer_limit
        ):
            # The pod's own limit: REFUSED_STREAM tells the client it is safe to retry.
            self._refuse(s, UPSTREAM_OVERFLOW)
            return
        s.upstream, s.upstream_id = u, up.get_next_available_stream_id()
        u.streams[s.upstream_id] = s
        if s.try_timeout is not None:
            s.try_deadline = self.clock() + s.try_timeout
        ended = s.request_end and not s.to_upstream and s.request_trailers is None
        # Counted just above (nothing opened or closed since): not counted again.
        send_headers_on(up, s.upstream_id, head, end_stream=ended, below_limit=True)
        s.request_sent = ended
        if s.mirror:
            self._copy(s)

    def _answered_there(self, s: Stream, answer: LocalAnswer) -> None:
        """The try of ``s`` was answered where its head was to go (``admit``), as the
        upstream's own proxy answers it: that try's response, so its ``retries`` may drop it
        (``take_dropped``) and send the request again; else it is the client's answer."""
        if self._streams.get(s.client_id) is not s or s.held is None:
            return  # it ended meanwhile (reset, timed out)
        s.held, s.answered_there = None, False
        ex = s.exchange
        now = ex.first_byte = self.clock()
        self._discard_request(s)  # what waited to follow the head goes nowhere
        if s.retries is not None:
            tried = replace(ex, flags=answer.flags, ended=now)
            if ex.grpc:
                grpc_status = answer.grpc_status
                if grpc_status is None:
                    grpc_status = grpc_status_for(answer.status)
                tried.status, tried.grpc_status = 200, str(grpc_status)  # trailers-only
            else:
                tried.status, tried.response_bytes = answer.status, len(answer.message)
            replayable = s.request_end and s.replay_body is not None and s.replay_head is not None
            status = _retry_status(tried, True)
            backoff = s.retries.after(status, now, replayable=replayable)
            if backoff is not None:
                self._dropped.append(tried)
                s.retry_at, ex.first_byte = now + backoff, 0.0
                return
        self._answer_locally(s, answer)

    def _choose(self, s: Stream, target: str) -> Upstream | None:
        """The upstream for ``s``, or None after answering it ourselves (no upstream: 503 /
        UNAVAILABLE; or the ``LocalAnswer`` the pick gave), or None with ``send_at`` set when
        the choice delays it (the upstream is opened when it is sent)."""
        if self.pick is None:
            if not self._upstream_gone:
                return self._upstreams[0]
            s.exchange.flags = UPSTREAM_CLOSED
            self._answer(s, 503, GRPC_UNAVAILABLE, b"upstream connection closed")
            return None
        ex = s.exchange
        choice = self.pick(PickRequest(ex.head, target, ex.grpc))
        if choice is None:
            ex.flags = NO_HEALTHY_UPSTREAM
            self._answer(s, 503, GRPC_UNAVAILABLE, b"no healthy upstream")
            return None
        if isinstance(choice, LocalAnswer):
            ex.tag = choice.tag
            self._answer_locally(s, choice)
            return None
        ex.upstream, ex.tag = choice.key, choice.tag
        s.edit_request, s.edit_response = choice.edit_request, choice.edit_response
        s.retries, s.try_timeout, s.resend = choice.retries, choice.try_timeout, choice.resend
        s.mirror = choice.mirror
        now = self.clock()
        if choice.timeout is not None:
            s.deadline = now + choice.timeout
        if choice.delay > 0:
            s.send_at, s.held_key = now + choice.delay, choice.key
        if choice.parked:
            s.parked = True
        if choice.delay > 0 or choice.parked:
            return None
        return self._upstream_for(choice.key)

    def _upstream_for(self, key: object) -> Upstream:
        u = self._current.get(key)
        if u is None:
            u = Upstream(self._next_uid, key, self.limits)
            self._next_uid += 1
            self._upstreams[u.uid] = self._current[key] = u
            self._new_upstreams.append((u.uid, key))
        return u

    def _retire(self, u: Upstream) -> None:
        """No new stream goes to ``u``."""
        u.gone = True
        if self._current.get(u.key) is u:
            del self._current[u.key]
        if self.pick is None:
            self._upstream_gone = True

    def _forget_if_done(self, u: Upstream) -> None:
        if u.gone and not u.streams and self.pick is not None:
            self._upstreams.pop(u.uid, None)

    def _on_request_data(self, stream_id: int, data: bytes, flow: int) -> None:
        if (detail := self._empty_data(data, flow)) is not None:
            self._fail_client(EMPTY_FRAMES, ErrorCodes.ENHANCE_YOUR_CALM, detail)
            return
        s = self._streams.get(stream_id)
        # Answered, or the pod ended its side (``request_sent``): discarded.
        if s is None or (s.upstream is None and s.held is None) or s.request_sent:
            if flow:
                acknowledge_on(self.client, flow, stream_id)
            return
        s.exchange.request_bytes += len(data)
        s.to_upstream.append((data, flow))
        if s.keeps_request and s.replay_body is not None and data:
            s.replay_size += len(data)
            if s.replay_size > self.limits.max_replay_body:
                s.replay_body = None  # too big to keep: this request is not retried
            else:
                s.replay_body.append(data)

    def _on_client_reset(self, stream_id: int) -> None:
        s = self._streams.get(stream_id)
        if s is None:
            return
        if (detail := self._premature_reset(s.exchange)) is not None:
            self._fail_client(RAPID_RESET, ErrorCodes.ENHANCE_YOUR_CALM, detail)
            return
        s.exchange.flags = DOWNSTREAM_CLOSED
        self._reset_upstream(s)
        self._complete(s)

    # -- upstream events ---------------------------------------------------------------------
    def _upstream_event(self, u: Upstream, event: Event) -> None:
        kind = type(event)  # as in ``_client_event``
        e: Any = event  # narrowed by ``kind``
        if kind is ConnectionTerminated:
            self._retire(u)
            last = e.last_stream_id or 0
            for lost in [x for x in u.streams.values() if x.upstream_id > last]:
                # never processed (RFC 9113 8.7): safe to send elsewhere, or to answer
                if not self._resent(lost, REFUSED):
                    self._upstream_lost(lost, UPSTREAM_CLOSED)
            if self.pick is None:
                self._goaway_client()
            return
        if kind is RemoteSettingsChanged:
            changed = e.changed_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS)
            if changed is not None:
                u.peer_limit = changed.new_value
            return
        block: Sequence[Header] = ()
        if kind is ResponseReceived or kind is InformationalResponseReceived:
            block = self._responses.check(e.headers)
        elif kind is TrailersReceived:
            block = self._trailers.check(e.headers)
        s = u.streams.get(getattr(e, "stream_id", 0))
        if s is None:
            if kind is DataReceived and e.flow_controlled_length:
                acknowledge_on(u.conn, e.flow_controlled_length, e.stream_id)
            return
        ex = s.exchange
        if kind is ResponseReceived:
            status = header(block, b":status") or b"0"
            ex.status = int(status) if status.isdigit() else 0
            ex.first_byte = self.clock()
            ended = e.stream_ended is not None
            if ended:
                ex.grpc_status = (header(block, b"grpc-status") or b"").decode("latin-1")
            if s.retries is not None and self._retried(s, _retry_status(ex, ended)):
                return
            s.response_started = True
            s.response_end = ended
            if ex.grpc and self.pick is not None:  # the source: ``_time_out``, ``_upstream_lost``
                s.response_messages = MessageEnds()
            if not s.mirror:  # the response is the client's now: never sent again
                s.replay_head, s.replay_body, s.replay_size = None, None, 0
            headers = list(block)
            if s.edit_response is not None:
                headers = s.edit_response(headers)
            send_headers_on(self.client, s.client_id, headers, end_stream=ended)
            if ended:
                self._complete(s)
        elif kind is InformationalResponseReceived:
            send_headers_on(self.client, s.client_id, list(block), end_stream=False)
        elif kind is DataReceived:
            ex.response_bytes += len(e.data)
            s.to_client.append((e.data, e.flow_controlled_length))
            if s.response_messages is not None:
                s.response_messages.feed(e.data)
        elif kind is TrailersReceived:
            ex.grpc_status = (header(block, b"grpc-status") or b"").decode("latin-1")
            s.response_trailers = list(block)
            s.response_end = True
        elif kind is StreamEnded:
            s.response_end = True
        elif kind is StreamReset:
            if e.error_code == ErrorCodes.NO_ERROR and s.response_end:
                # RFC 9113 8.1: the response is whole, the pod wants no more of the request (a
                # gRPC server that answered before the client finished): what waits of the
                # response still goes, then the client gets the same (``_complete``).
                s.request_sent = True
                self._discard_request(s)
                return
            if e.error_code == ErrorCodes.REFUSED_STREAM:
                if self._resent(s, REFUSED):
                    return
                # A refused stream reaches the source from a far node as it is: not mapped.
                if self._retried(s, None, UPSTREAM_RESET):
                    return
                if not s.response_started:
                    self._refuse(s, UPSTREAM_RESET)  # the pod never processed it: retry-safe
                    return
            # Any other reset: ``_upstream_lost`` asks the retries, once (each answer counts);
            # a response begun is reset with the endpoint's code, unless the far destination
            # lost its pod's connection (``POD_LOST``): that ends as our own endpoint's loss.
            if e.error_code == POD_LOST and s.response_started and self.pick is not None:
                self._upstream_lost(s, UPSTREAM_CLOSED)
                return
            self._upstream_lost(s, UPSTREAM_RESET, passed_on(e.error_code))

    def _lost_status(self, s: Stream, lost: str) -> int | None:
        """The status the retries of ``s`` see of a try its upstream reset or lost (``lost``)
        before the response head: none (``None``), unless that upstream is the pod itself
        (``direct``). Then it is what the pod's own proxy, a far node, answers the source for
        it (``_upstream_lost``): 502, or for a gRPC call a trailers-only ``UNAVAILABLE``,
        503 to a retry; so a rule retries it only if its codes say so, as it would there."""
        u = s.upstream
        if self.direct is None or u is None or lost not in (UPSTREAM_RESET, UPSTREAM_CLOSED):
            return None
        if s.response_started or not self.direct(u.key):
            return None
        return 503 if s.exchange.grpc else 502

    def _upstream_lost(self, s: Stream, flag: str, code: int | None = None) -> None:
        """The pod will not finish ``s``: answer it ourselves if we can, else reset it with
        ``code``, by default our own: ``POD_LOST`` at the destination for the pod's lost
        connection (the source ends it as a lost connection), else INTERNAL_ERROR."""
        if self._retried(s, self._lost_status(s, flag), flag):
            return
        s.exchange.flags = flag
        self._discard_request(s)
        if s.upstream is not None:
            s.upstream.streams.pop(s.upstream_id, None)
        if not s.response_started:
            self._release_response(s)
            s.upstream, s.upstream_id = None, 0
            status = 503 if flag in _NOT_OPENED else 502  # as Envoy answers them
            self._answer(s, status, GRPC_UNAVAILABLE, LOST_BODY)
            return
        whole = flag == UPSTREAM_CLOSED and self._whole(s)
        self._release_response(s)
        if whole:  # the connection lost: ``UNAVAILABLE``, as grpcio reports its own connection's
            self._end_grpc(s, GRPC_UNAVAILABLE, LOST_BODY)
            return
        if code is None:
            lost_pod = flag == UPSTREAM_CLOSED and self.pick is None
            code = POD_LOST if lost_pod else ErrorCodes.INTERNAL_ERROR
        self._reset_client(s, code)
        self._complete(s)

    def _whole(self, s: Stream) -> bool:
        """Did all the client was sent of a gRPC response end on a whole message (what is
        queued for it counted as not sent)? Then trailers can end it (``_end_grpc``)."""
        ends = s.response_messages
        return ends is not None and ends.whole and not s.to_client

    def _end_grpc(self, s: Stream, status: int, message: bytes) -> None:
        """End a gRPC response already begun the gRPC way, trailers with ``status``, rather
        than a reset, which grpcio reports by its code (CANCEL: ``CANCELLED``, as if the caller
        cancelled; INTERNAL_ERROR: ``INTERNAL``, the server's bug); its upstream is done."""
        s.response_end = True
        s.exchange.grpc_status = str(status)
        trailers = [(b"grpc-status", b"%d" % status), (b"grpc-message", message)]
        send_headers_on(self.client, s.client_id, trailers, end_stream=True)
        self._complete(s)

    # -- answers and stream ends -------------------------------------------------------------
    def _answer(
        self,
        s: Stream,
        status: int,
        grpc_status: int,
        message: bytes,
        headers: Sequence[Header] = (),
    ) -> None:
        """Answer ``s`` from the proxy: ``status`` with ``message`` as body (and ``headers``),
        or for gRPC a trailers-only response with ``grpc_status`` (RFC 9113 8.1: the request's
        remaining body is discarded, the stream reset with NO_ERROR once the answer is out)."""
        ex = s.exchange
        s.response_started = True
        if ex.grpc:
            ex.status, ex.grpc_status = 200, str(grpc_status)
            send_headers_on(
                self.client,
                s.client_id,
                [
                    (b":status", b"200"),
                    (b"content-type", b"application/grpc"),
                    (b"grpc-status", str(grpc_status).encode()),
                    (b"grpc-message", message.strip()),
                ],
                end_stream=True,
            )
            s.response_end = True
            self._complete(s)
            return
        ex.status, ex.response_bytes = status, len(message)
        send_headers_on(
            self.client,
            s.client_id,
            [
                (b":status", str(status).encode()),
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(message)).encode()),
                *headers,
            ],
            end_stream=False,
        )
        s.to_client.append((message, 0))
        s.response_end = True

    def _answer_locally(self, s: Stream, answer: LocalAnswer) -> None:
        """Answer ``s`` as the pick (or its retries, or ``unpark``) said."""
        ex = s.exchange
        ex.flags = answer.flags
        if answer.upstream is not None:
            ex.upstream = answer.upstream
        grpc_status = answer.grpc_status
        if grpc_status is None:
            grpc_status = grpc_status_for(answer.status)
        self._answer(s, answer.status, grpc_status, answer.message, answer.headers)

    def _refuse(self, s: Stream, flag: str) -> None:
        """Pass the pod's refusal of ``s`` on (REFUSED_STREAM: the client may retry it), and
        report it, so that the shell finishes what it noted for the request."""
        s.exchange.flags = flag
        s.exchange.ended = self.clock()
        self._completed.append(s.exchange)
        self._drop(s)
        self.client.reset_stream(s.client_id, ErrorCodes.REFUSED_STREAM)

    def _complete(self, s: Stream) -> None:
        """``s`` is over (answered, or reset): report it and forget it."""
        s.exchange.ended = self.clock()
        self._completed.append(s.exchange)
        self._drop(s)
        if not s.request_end and s.response_end:
            self._reset_client(s, ErrorCodes.NO_ERROR)  # answered before the client finished
        if s.upstream is not None and not s.request_sent:
            self._reset_upstream(s)

    def _drop(self, s: Stream) -> None:
        self._streams.pop(s.client_id, None)
        if s.upstream is not None:
            s.upstream.streams.pop(s.upstream_id, None)
        self._discard_request(s)
        self._release_response(s)

    def _discard_request(self, s: Stream) -> None:
        """Give the client back the window of request bytes that will never be forwarded.
        (Nothing to do for most streams, which end with nothing held: tested first, as the
        sum over an empty queue was two calls and a third to clear it.)"""
        if not s.to_upstream:
            return
        owed = sum(flow for _, flow in s.to_upstream)
        s.to_upstream.clear()
        if owed:
            acknowledge_on(self.client, owed, s.client_id)

    def _release_response(self, s: Stream) -> None:
        if not s.to_client:  # as in ``_discard_request``
            return
        owed = sum(flow for _, flow in s.to_client)
        s.to_client.clear()
        if owed and s.upstream is not None:
            acknowledge_on(s.upstream.conn, owed, s.upstream_id)

    def _reset_client(self, s: Stream, code: int) -> None:
        with contextlib.suppress(ProtocolError):  # already closed both ways: nothing to reset
            self.client.reset_stream(s.client_id, code)

    def _reset_upstream(self, s: Stream) -> None:
        if s.upstream is None or s.upstream.uid not in self._upstreams:
            return  # never connected, or gone
        with contextlib.suppress(ProtocolError):  # the pod already closed it
            s.upstream.conn.reset_stream(s.upstream_id, ErrorCodes.CANCEL)

    def _goaway_client(self) -> None:
        if not self._client_gone:
            self._client_gone = True
            self._last_taken = self.client.highest_inbound_stream_id
            self.client.send_goaway(ErrorCodes.NO_ERROR, self._last_taken)

    def _abort_all(self, flag: str) -> None:
        """The client connection is over: report what was open, cancel it at the pod."""
        for s in list(self._streams.values()):
            s.exchange.flags = flag
            s.exchange.ended = self.clock()
            self._completed.append(s.exchange)
            self._reset_upstream(s)
        self._streams.clear()
        for u in self._upstreams.values():
            u.streams.clear()
        self.closing = True

    def _fail_client(self, cause: str, code: ErrorCodes | None, detail: str) -> None:
        """The client broke a limit or the protocol (``detail`` says which, for the log line):
        GOAWAY (``h2`` sent its own when ``code`` is None) and close."""
        self._reject(cause, detail)
        if code is not None:
            self.client.send_goaway(code, self.client.highest_inbound_stream_id)
        self._abort_all(DOWNSTREAM_CLOSED)

    def _check_done(self) -> None:
        if (self._client_gone or self._upstream_gone) and not self._streams:
            self.closing = True
        for u in [u for u in self._upstreams.values() if u.gone and not u.streams]:
            self._forget_if_done(u)

    # -- moving DATA within the windows --------------------------------------------------------
    def _pump(self) -> None:
        # Runs after every input, over every stream: a stream waiting for its response (most
        # of them, on a busy gRPC channel) costs only these two tests.
        if self._answered:
            answered, self._answered = self._answered, []
            for answered_stream, answer in answered:
                self._answered_there(answered_stream, answer)
        for s in list(self._streams.values()):
            if s.upstream is not None and not s.request_sent:
                self._pump_request(s)
            if s.response_started:
                self._pump_response(s)

    def _pump_request(self, s: Stream) -> None:
        assert s.upstream is not None
        up, uid = s.upstream.conn, s.upstream_id
        try:
            plain_end = s.request_end and s.request_trailers is None and bool(s.to_upstream)
            sent, ended = move_queued(s.to_upstream, up, uid, end=plain_end)
            if sent:
                acknowledge_on(self.client, sent, s.client_id)
            if ended:
                s.request_sent = True
            elif not s.to_upstream and s.request_end:
                if s.request_trailers is not None:
                    send_headers_on(up, uid, s.request_trailers, end_stream=True)
                else:
                    up.end_stream(uid)
                s.request_sent = True
        except ProtocolError:  # the pod closed its receiving side: the rest is not wanted
            s.request_sent = True
            self._discard_request(s)

    def _pump_response(self, s: Stream) -> None:
        plain_end = s.response_end and s.response_trailers is None and bool(s.to_client)
        sent, ended = move_queued(s.to_client, self.client, s.client_id, end=plain_end)
        if sent and s.upstream is not None:
            acknowledge_on(s.upstream.conn, sent, s.upstream_id)
        if ended:
            self._complete(s)
        elif not s.to_client and s.response_end:
            if s.response_trailers is not None:
                send_headers_on(self.client, s.client_id, s.response_trailers, end_stream=True)
            else:
                self.client.end_stream(s.client_id)
            self._complete(s)


def _retry_status(ex: H2Exchange, ended: bool) -> int:
    """The status a retry policy sees of a response head: its ``:status``, or for a gRPC call
    answered trailers-only ``UNAVAILABLE`` 503 (gRPC's HTTP mapping of 503)."""
    if ex.grpc and ended and ex.grpc_status == str(GRPC_UNAVAILABLE):
        return 503
    return ex.status
