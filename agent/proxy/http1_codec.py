"""HTTP/1.1 message framing on llhttp (``httptools``), sans-IO: bytes in, events out.

Why llhttp: the destination's HTTP path measured h11 (pure Python) at about a quarter of its
agent CPU per request; llhttp parses a head in C and calls back once per element. The bench's
HTTP/1.1 workload compared both (docs/performance/http1-cost.md, "HTTP/1.1 parser"), and this one is
kept.

Two halves, usable apart: ``RequestReader`` is a server's half (it reads requests: a proxy's
client side, or a source-side listener) and ``ResponseReader`` a client's half (it reads the
responses to requests it was told about, ``expect``). Each turns bytes into ``Head``, ``Body``
and ``End`` events, in order, or one ``Refusal`` naming why the input cannot be read safely,
after which it reads nothing more. The framing rules are the request-smuggling ones: a message
that two parsers could delimit differently is refused, never guessed at:

* both ``Content-Length`` and ``Transfer-Encoding``, or two ``Content-Length``: 400
  (``ambiguous_length``); a transfer coding other than exactly ``chunked``: 501;
* a malformed request line, header, chunk or version (only HTTP/1.0 and 1.1), a missing or
  repeated ``Host`` in HTTP/1.1, ``CONNECT``: 400 (``malformed``);
* a head over ``max_head_bytes``: 431, also while it trickles in; the same for a chunked
  body's trailers (``TRAILERS_TOO_LARGE``: head and trailers together over twice the limit, or
  more than ``max_head_bytes`` fed within a body without a byte of it, e.g. one trailer that
  never ends), since llhttp sets no limit of its own and ``httptools`` keeps an unfinished
  field's bytes until it ends: without it a peer's endless trailers grew without bound;
* a head, or a trailer block, of more than ``max_fields`` header fields (``DEFAULT_MAX_FIELDS``
  100, Envoy's ``max_headers_count`` default; ``nodemesh agent --max-header-fields``): 431
  (``headers_too_large``, ``TOO_MANY_FIELDS``, which names the count), counted as llhttp hands
  each field over, before it is kept. Why besides the byte bound: a head of tiny fields (``a:``
  15,000 times fits in 60 KiB) became about 20 times its size in Python objects (a tuple and
  two ``bytes`` per field), held per connection. A reader of heads that crossed the mesh is
  given bounds with an ``Allowance`` on top: what the node before it added (its 431 names the
  count with it);
* the HTTP/2 connection preface (``PRI * HTTP/2.0``: an h2c client with prior knowledge, e.g.
  gRPC): 400 (``malformed``), its detail saying how to declare the port HTTP/2 (``H2_PREFACE``).

A request's target reaches its owner in origin-form (``/path?query``), the only form policy,
routes and the pod then read alike (``_origin_form``), as Envoy forwards it: an absolute-form
target (``http://host/path``) becomes its path, and its authority the ``Host`` (RFC 9112 3.2.2:
a server ignores the ``Host`` sent with one; left as it came, a DENY on ``/admin`` never
matched ``GET http://x/admin``, which the pod served as ``/admin``); a fragment is dropped
(never part of a target, RFC 9112 3.2); ``*`` is for ``OPTIONS`` only, and any other form, a
scheme other than http(s) or an authority with userinfo is 400. Its path is normalized as
Istio's default (``BASE``: Envoy's ``normalize_path``) does before policy and routes read it and
the pod gets it (``normalized_path``): ``\\`` read as ``/``, percent-encoded unreserved characters
decoded, dot segments removed (RFC 3986 6.2.2, 5.2.4); ``%2F`` and ``//`` are kept. Left as it
came, a DENY on ``/admin`` never matched ``/public/../admin`` or ``/%61dmin``, which most
servers serve as ``/admin``. In HTTP/1.0 a
``Transfer-Encoding`` is faulty framing (RFC 9112 6.1): 400. An upgrade to ``h2c`` is dropped
from the request with its ``HTTP2-Settings`` (Envoy strips it too): the pod would switch the
connection to HTTP/2, relayed as opaque bytes, out of reach of per-request policy.

A refusal's ``detail`` is what the 400 (or 431, 501) tells the client and the log: the parser's
reason, where what came from the input is ``bounded`` (never the client's bytes unbounded).

The writers (``request_head``, ``response_head``, ``chunk``, ``last_chunk``) frame what a
proxy forwards, ``forwarded_headers`` drops the hop-by-hop headers; header names come out
lowercased, as the readers give them.
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass, field

import httptools

from agent.base.owncode import give_own_copies
from agent.policy.paths import normalized_path
from agent.telemetry.records import TRACE_HEADERS

# Causes of a refused message (``nodemesh_http_rejected_requests_total{cause}``).
MALFORMED = "malformed"
HEADERS_TOO_LARGE = "headers_too_large"
AMBIGUOUS_LENGTH = "ambiguous_length"
UNSUPPORTED_CODING = "unsupported_transfer_coding"
TRAILERS_TOO_LARGE = "trailers over the size limit"  # a 431's detail (cause HEADERS_TOO_LARGE)
# Header fields per head or trailer block (Envoy's max_headers_count; ``--max-header-fields``)
DEFAULT_MAX_FIELDS = 100
TOO_MANY_FIELDS = "more than %d header fields"  # a 431's detail (cause HEADERS_TOO_LARGE)
FIELD_SIZE_MIN = 5  # what the smallest field adds to ``_Reader._size``
# Pipelined requests parsed ahead of the owner (``RequestReader``). A constant, not a setting:
# it refuses nothing and no client can tell it (every pipelined request is still read and
# answered, in order); it only decides how much of one read waits parsed, in objects, rather
# than as bytes, and 4 keeps a 64 KiB read of tiny requests at 69 KB instead of 1.34 MB while
# the usual client (one request at a time, or a few) is parsed as it arrives. Envoy has no
# such knob either (it takes a connection's pipelined requests one at a time).
MAX_WAITING = 4
HEAD_END = b"\r\n\r\n"
# Request targets (``_origin_form``): the schemes an absolute-form may name, and Upgrade's
# protocol that is never proxied (``_drop_h2c``).
HTTP_SCHEMES = (b"http://", b"https://")
H2C = b"h2c"
SLASH, HASH, PERCENT, BACKSLASH, DOT = b"/#%\\."  # as ints, what ``in`` looks for fastest

Headers = list[tuple[bytes, bytes]]
_NAME = operator.itemgetter(0)  # a header's name


@dataclass(slots=True)
class Head:
    """A request's or a response's head; names lowercased, in the order sent."""

    headers: Headers
    method: bytes = b""  # requests
    target: bytes = b""  # requests
    status: int = 0  # responses
    reason: bytes = b""  # responses
    http10: bool = False  # HTTP/1.0 (else 1.1)
    keep_alive: bool = True  # the connection may carry another message after this one
    chunked: bool = False
    length: int | None = None  # Content-Length, when the body is framed by it
    upgrade: bool = False  # a request proposing an upgrade, or a 101 accepting one
    expect_continue: bool = False  # a request waiting for ``100 Continue`` before its body
    size: int = 0  # bytes of the head's elements, for the head limit
    # The headers named in ``NOTED``, in order: what framing, hop-by-hop removal, Host,
    # x-request-id and trace context read, gathered as the head is parsed so that none of
    # them scans every header again (a reader's heads; None: unknown, scan ``headers``).
    noted: Headers | None = None


@dataclass(slots=True)
class Body:
    data: bytes


@dataclass(slots=True)
class End:
    trailers: Headers = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Refusal:
    """The input cannot be read safely: answer ``status`` (a server's half) and close."""

    status: int
    cause: str
    detail: str


Event = Head | Body | End | Refusal


def field_size(name: bytes, value: bytes) -> int:
    """What a field adds to a head's size for the head limit (``_Reader.on_header``): its name
    and value and 4 (``: `` and CRLF), however the sender spaced it."""
    return len(name) + len(value) + 4


@dataclass(frozen=True, slots=True)
class Allowance:
    """Fields and bytes a reader admits on top of its limits: what the mesh itself added to a
    head that crossed it (``agent.proxy.http1.PEER_REQUEST``, ``PEER_RESPONSE``). Why: the
    limits are the client's (or the pod's), checked where its head enters the mesh; the node
    at the other end reads that head again, with what the first node added, and must not
    refuse what the first admitted for additions no one sent."""

    fields: int = 0
    size: int = 0

    @classmethod
    def of(cls, *added: tuple[bytes, bytes], lengthened: int = 0) -> Allowance:
        """The allowance for the fields ``added`` and ``lengthened`` bytes more in values."""
        return cls(len(added), sum(field_size(n, v) for n, v in added) + lengthened)

    def added_to(self, max_head_bytes: int, max_fields: int) -> tuple[int, int]:
        """The bounds a reader given the limits and this allowance enforces (its
        ``max_head_bytes`` and ``max_fields``, in that order)."""
        return max_head_bytes + self.size, max_fields + self.fields


NO_ALLOWANCE = Allowance()

H2_PREFACE = b"PRI * HTTP/2.0\r\n"  # RFC 9113 3.4: how an HTTP/2 connection opens
H2_ON_HTTP1_PORT = (
    "an HTTP/2 connection preface (PRI * HTTP/2.0) on a port declared HTTP/1.1; declaring the"
    " port HTTP/2 or gRPC (Service port appProtocol http2, kubernetes.io/h2c or grpc, or a name"
    " http2-*/grpc-*) makes it carry HTTP/2"
)
DETAIL_LIMIT = 100  # characters of a refusal's detail that reach the client and the log


def bounded(text: str, limit: int = DETAIL_LIMIT) -> str:
    """``text`` for a response body or a log line: non-printable characters escaped, at most
    ``limit`` characters kept (a refusal's detail may quote what the client sent)."""
    shown = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text[:limit])
    return shown if len(text) <= limit else f"{shown}..."


# RFC 9110 7.6.1: meaningful for one connection only, never forwarded (``forwarded_headers``).
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}
)


# Every header name a pass over a head looks for (``Head.noted``): the hop-by-hop ones, the
# framing ones, ``Host``, ``x-request-id`` and the trace context (``TRACE_HEADERS``).
NOTED = (
    HOP_BY_HOP
    | TRACE_HEADERS
    | frozenset({b"transfer-encoding", b"content-length", b"expect", b"host", b"x-request-id"})
)


class _Refused(Exception):
    """Raised in a parser callback to stop parsing; carries the refusal."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.detail)
        self.refusal = refusal


def _refusal_of(error: httptools.HttpParserError) -> Refusal:
    text = bounded(str(error))
    low = text.lower()
    if "can't be present" in low or "content-length" in low:
        return Refusal(400, AMBIGUOUS_LENGTH, text)
    if "transfer-encoding" in low:
        return Refusal(501, UNSUPPORTED_CODING, text)
    return Refusal(400, MALFORMED, text)


# The callbacks each half is given its own copy of (``_Reader.__init_subclass__``)
_OWN_COPIES = (
    "on_message_begin",
    "on_header",
    "on_message_complete",
    "_execute",
    "_gather",
    "_merge",
)


class _Reader:
    """What both halves share: llhttp's callbacks turned into queued events.

    Slotted, as its halves: a callback both halves shared saw two types at each attribute,
    which CPython does not specialize, and there a slot is found faster than a ``__dict__``
    entry (about 1,500 instructions fewer per request read and answered, callgrind). Each half
    has its own copy of the hot ones (``_OWN_COPIES``, ``agent.base.owncode``), each
    specialized to its half's type: about 5,000 fewer again."""

    __slots__ = (
        "_begun_in_this_feed",
        "_check_from",
        "_element",
        "_framing_only",
        "_headers",
        "_in_body",
        "_into",
        "_more",
        "_noted",
        "_size",
        "_trailers",
        "_trickled",
        "_until_eof",
        "events",
        "failed",
        "in_head",
        "max_fields",
        "max_head_bytes",
    )

    def __init__(self, max_head_bytes: int, max_fields: int = DEFAULT_MAX_FIELDS) -> None:
        self.max_head_bytes = max_head_bytes
        self.max_fields = max_fields
        # A field adds at least 5 to a head's size (a name's byte, ": ", CRLF): below
        # ``max_fields`` times that, the head is within both bounds, and the usual head is
        # checked by one comparison, as before the count.
        self._check_from = min(max_head_bytes, FIELD_SIZE_MIN * max_fields)
        self.events: deque[Event] = deque()
        self.failed: Refusal | None = None
        self.in_head = False  # a head has begun and is not complete
        self._in_body = False
        self._headers: Headers = []
        self._noted: Headers = []
        self._trailers: Headers = []
        self._size = 0
        self._trickled = 0  # bytes fed while a head stayed incomplete, after its first read
        self._framing_only = 0  # bytes fed within a body that gave no event (trailers, chunk sizes)
        # Body bytes that follow a queued ``Body`` directly, appended to it as one (``on_body``)
        self._into: Body | None = None
        self._more = bytearray()
        self._begun_in_this_feed = False
        # The start line's element llhttp hands over in pieces: a request's target, a
        # response's reason (``on_url``, ``on_status``)
        self._element = b""
        self._until_eof = False  # a response's body is delimited by the connection's close

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        give_own_copies(cls, _OWN_COPIES)

    # -- llhttp callbacks --------------------------------------------------------------------
    def on_message_begin(self) -> None:
        """Both halves' (no override: a callback per message is a Python frame per call)."""
        self.in_head = True
        self._begun_in_this_feed = True
        self._headers = []
        self._noted = []
        self._trailers = []
        self._size = 0
        self._trickled = 0
        self._element = b""
        self._until_eof = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._size += len(name) + len(value) + 4  # ``field_size``, without a call
        if self._in_body:  # a trailer: bounded with the head by twice its limit
            if self._size > 2 * self.max_head_bytes:
                raise _Refused(Refusal(431, HEADERS_TOO_LARGE, TRAILERS_TOO_LARGE))
            if len(self._trailers) >= self.max_fields:
                raise _Refused(self._too_many())
            self._trailers.append((name.lower(), value))
            return
        if self._size > self._check_from:  # past it, a head may be over either bound
            if self._size > self.max_head_bytes:
                raise _Refused(Refusal(431, HEADERS_TOO_LARGE, "head over the size limit"))
            if len(self._headers) >= self.max_fields:
                raise _Refused(self._too_many())
        field = (name.lower(), value)
        self._headers.append(field)
        if field[0] in NOTED:
            self._noted.append(field)

    def _too_many(self) -> Refusal:
        return Refusal(431, HEADERS_TOO_LARGE, TOO_MANY_FIELDS % self.max_fields)

    def on_body(self, body: bytes) -> None:
        """A piece of body: its own ``Body`` event, or, when the last event queued is a
        ``Body`` (of this message: an end or a head would be queued between), more of it.
        Why: llhttp hands each chunk over apart, and a body of tiny chunks (``1\\r\\na\\r\\n``)
        was one event per chunk, about 10,900 per 64 KiB read and 8 times the read in objects
        (527 KB, tracemalloc) while they waited behind a pipelined request, or as the writes
        of a response's chunks. The pieces are gathered in ``_more`` and joined once, when
        the feed ends (``_merge``); the usual body, one piece per read, costs a type check."""
        events = self.events
        if events and type(events[-1]) is Body:
            self._gather(events[-1], body)
        else:
            events.append(Body(body))

    def _gather(self, into: Body, body: bytes) -> None:
        """``body`` follows ``into``, the last event queued: kept to be appended to it."""
        if into is not self._into:
            if self._into is not None:  # the body of an earlier message in this feed
                self._merge(self._into)
            self._into = into
        self._more += body

    def _merge(self, into: Body) -> None:
        """Append the gathered pieces to the ``Body`` they follow."""
        into.data += self._more
        self._into = None
        self._more = bytearray()

    def on_message_complete(self) -> None:
        self._in_body = False
        self.events.append(End(self._trailers))

    # -- shared ------------------------------------------------------------------------------
    def _execute(
        self, parser: httptools.HttpRequestParser | httptools.HttpResponseParser, data: bytes
    ) -> int | None:
        """Feed ``data``; the offset where an upgraded protocol starts, if it did."""
        self._begun_in_this_feed = False
        queued = len(self.events)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            return int(e.args[0])
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            self._fail(cause.refusal if isinstance(cause, _Refused) else _refusal_of(e))
            return None
        except httptools.HttpParserError as e:
            self._fail(_refusal_of(e))
            return None
        finally:
            into = self._into  # body bytes gathered for a queued Body: appended to it
            if into is not None:
                self._merge(into)
        if self.in_head and not self._begun_in_this_feed:
            # The size check above sees whole headers only; a head trickling in without ever
            # completing one is bounded here by what it was fed.
            self._trickled += len(data)
            if self._trickled > self.max_head_bytes:
                self._fail(Refusal(431, HEADERS_TOO_LARGE, "head over the size limit"))
        elif self._in_body:
            # Within a body, a read that gave no event was all framing: chunk sizes, or
            # trailers, which llhttp hands over only whole (one that never ends is held by
            # ``httptools`` until it does). Bounded here by what was fed, as a head is.
            if len(self.events) != queued or into is not None:
                self._framing_only = 0
            else:
                self._framing_only += len(data)
                if self._framing_only > self.max_head_bytes:
                    self._fail(Refusal(431, HEADERS_TOO_LARGE, TRAILERS_TOO_LARGE))
        return None

    def _fail(self, refusal: Refusal) -> None:
        self.failed = refusal
        self.events.append(refusal)

    def _framing(self, head: Head) -> None:
        """Fill the framing fields from the headers, refusing what is ambiguous."""
        codings: list[bytes] = []
        lengths: list[bytes] = []
        tokens: set[bytes] = set()
        noted = head.headers if head.noted is None else head.noted
        for name, value in noted:
            if name == b"transfer-encoding":
                codings += [t.strip().lower() for t in value.split(b",")]
            elif name == b"content-length":
                lengths.append(value)
            elif name == b"connection":
                tokens.update(t.strip().lower() for t in value.split(b","))
            elif name == b"expect" and value.strip().lower() == b"100-continue":
                head.expect_continue = True
        if (codings and lengths) or len(lengths) > 1:
            raise _Refused(Refusal(400, AMBIGUOUS_LENGTH, "two framings of one body"))
        if codings:
            if codings != [b"chunked"]:
                raise _Refused(Refusal(501, UNSUPPORTED_CODING, "a coding other than chunked"))
            head.chunked = True
        elif lengths:
            head.length = int(lengths[0])  # llhttp accepted it: digits only
        head.upgrade = b"upgrade" in tokens and any(n == b"upgrade" for n, _ in noted)
        head.keep_alive = b"keep-alive" in tokens if head.http10 else b"close" not in tokens


class RequestReader(_Reader):
    """A server's half: reads requests.

    Requests are parsed as they arrive, so a pipelined request's events queue behind the
    current one's; the owner takes them in order (``events``) and stops reading while
    ``events`` holds what it cannot act on yet. At most ``max_waiting`` requests' heads are
    parsed ahead (``MAX_WAITING``): the bytes of a read past them wait unparsed in ``held``
    until the owner, having taken every event, calls ``release()``. Why: one 64 KiB read of
    tiny pipelined requests (2,427 of ``GET / HTTP/1.1`` with a ``Host``) was parsed whole into
    about 20 times its size in objects (heads, header lists, ends), held per connection;
    bytes held are held once. Envoy, too, takes a connection's pipelined requests one at a
    time. A read is cut after the head ends (CRLF CRLF) it may complete: llhttp ends a request
    head with one (a bare LF is refused: 400), so a piece with ``n`` of them completes at most
    ``n`` heads, one more if a head had begun before it; a body framed by its length is
    skipped whole. After a request proposing an upgrade, llhttp
    stops: the bytes after its head, and all fed later, wait in ``upgraded`` until the owner
    knows the answer: ``resume()`` if it was not ``101`` (they are read as requests)."""

    __slots__ = (
        "_body_left",
        "_no_upgrade",
        "_opening",
        "_parser",
        "_slicing",
        "held",
        "max_waiting",
        "upgraded",
    )

    def __init__(
        self,
        max_head_bytes: int,
        max_fields: int = DEFAULT_MAX_FIELDS,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        super().__init__(max_head_bytes, max_fields)
        if max_waiting < 2:  # a head begun before a read, and one more, must fit
            raise ValueError(f"max_waiting must be at least 2, not {max_waiting}")
        self.max_waiting = max_waiting
        self._parser = httptools.HttpRequestParser(self)
        self.upgraded: bytearray | None = None
        self.held = b""  # bytes read past ``max_waiting`` parsed heads, until ``release()``
        self._body_left = 0  # of the body framed by Content-Length being read
        self._slicing = False  # ``feed`` is given a piece of a read by ``_feed_some``
        self._opening = b""  # the connection's first bytes, to tell an HTTP/2 preface
        self._no_upgrade = False  # llhttp stops after this head, which no longer upgrades (h2c)

    def on_url(self, url: bytes) -> None:
        self._element += url
        self._size += len(url)
        if self._size > self.max_head_bytes:
            raise _Refused(Refusal(431, HEADERS_TOO_LARGE, "head over the size limit"))

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise _Refused(Refusal(400, MALFORMED, bounded(f"HTTP version {version}")))
        method = parser.get_method()
        if method == b"CONNECT":
            raise _Refused(Refusal(400, MALFORMED, "CONNECT is not proxied"))
        head = Head(
            self._headers,
            method=method,
            target=self._element,
            http10=version == "1.0",
            noted=self._noted,
        )
        hosts = 0
        for name, _ in self._noted:  # a loop, not a generator: a frame fewer per head
            if name == b"host":
                hosts += 1
        if hosts > 1 or (hosts == 0 and not head.http10):
            raise _Refused(Refusal(400, MALFORMED, "HTTP/1.1 wants exactly one Host header"))
        # The usual target (origin-form, nothing to normalize) is told by looking for bytes
        # (ints): about 200 instructions each, a bytes needle's ``in`` about 2,000 (callgrind:
        # it first tries the needle as an int, raising and clearing a TypeError); a path with a
        # dot (``/index.html``) is searched for ``/.`` with ``find``, which raises nothing.
        target = head.target
        if not target or target[0] != SLASH or HASH in target:
            self._origin_form(head)
            target = head.target
        if PERCENT in target or BACKSLASH in target or (DOT in target and target.find(b"/.") >= 0):
            head.target = normalized_path(target)
        self._framing(head)
        if head.chunked and head.http10:
            raise _Refused(Refusal(400, MALFORMED, "Transfer-Encoding in an HTTP/1.0 request"))
        if head.upgrade:
            self._drop_h2c(head)
        self._body_left = head.length or 0
        head.size = self._size + len(method)
        self.in_head = False
        self._in_body = True
        self.events.append(head)

    def _origin_form(self, head: Head) -> None:
        """Turn the target into origin-form (see the module docstring): an absolute-form's
        authority replaces ``Host`` (added to an HTTP/1.0 request without one), a fragment is
        dropped; what no origin server reads is refused."""
        target = head.target.split(b"#", 1)[0]
        if target == b"*":
            if head.method != b"OPTIONS":
                raise _Refused(Refusal(400, MALFORMED, "the target * is for OPTIONS only"))
        elif target[:1] != b"/":
            scheme = next((s for s in HTTP_SCHEMES if target[: len(s)].lower() == s), None)
            if scheme is None:
                detail = bounded(f"a target neither /path nor http(s)://: {target!r}")
                raise _Refused(Refusal(400, MALFORMED, detail))
            rest = target[len(scheme) :]
            end = next((i for i, c in enumerate(rest) if c in b"/?"), len(rest))
            authority, target = rest[:end], rest[end:]
            if not authority or b"@" in authority:
                detail = "an absolute-form target with no host, or with userinfo"
                raise _Refused(Refusal(400, MALFORMED, detail))
            if target[:1] != b"/":
                target = b"/" + target
            host = (b"host", authority)
            for fields in (head.headers, self._noted):
                at = next((i for i, (n, _) in enumerate(fields) if n == b"host"), None)
                if at is None:
                    fields.append(host)
                else:
                    fields[at] = host
        head.target = target

    def _drop_h2c(self, head: Head) -> None:
        """Remove ``h2c`` from what the request proposes, and ``HTTP2-Settings`` with it; with
        nothing else proposed it is no upgrade, and what follows it is read as requests."""
        for fields in (head.headers, self._noted):
            kept: Headers = []
            for name, value in fields:
                if name == b"upgrade":
                    tokens = [t.strip() for t in value.split(b",")]
                    value = b", ".join(t for t in tokens if t and t.lower() != H2C)
                    if value:
                        kept.append((name, value))
                elif name != b"http2-settings":
                    kept.append((name, value))
            fields[:] = kept
        if not any(n == b"upgrade" for n, _ in self._noted):
            head.upgrade = False
            self._no_upgrade = True

    def on_body(self, body: bytes) -> None:
        """``_Reader.on_body``, counting what is left of a body framed by its length. A copy,
        not a call to it: a call is a Python frame per body piece, and a callback each half
        has apart keeps its attribute reads specialized to one type (``_Reader``)."""
        self._body_left -= len(body)
        events = self.events
        if events and type(events[-1]) is Body:
            self._gather(events[-1], body)
        else:
            events.append(Body(body))

    def feed(self, data: bytes) -> None:
        """Bytes from the peer (not ``b""``: its end of stream is the owner's to handle)."""
        if self.failed is not None:
            return
        if self.upgraded is not None:
            self.upgraded += data
            return
        if not self._slicing and (
            self.held or self.events or data.count(HEAD_END) >= self.max_waiting
        ):
            self._feed_some(self.held + data)
            return
        # The usual read (fewer head ends than may wait, nothing queued), or a piece of one
        if len(self._opening) < len(H2_PREFACE):
            self._opening += data[: len(H2_PREFACE) - len(self._opening)]
        offset = self._execute(self._parser, data)
        if self.failed is not None and self._opening == H2_PREFACE:
            self.events.pop()
            self._fail(Refusal(400, MALFORMED, H2_ON_HTTP1_PORT))
            return
        if offset is not None:
            self._in_body = False
            self.upgraded = bytearray(data[offset:])
            if self._no_upgrade:  # llhttp saw an upgrade the head no longer proposes
                self._no_upgrade = False
                self.resume()

    def release(self) -> None:
        """The owner took every event: parse what was held, up to ``max_waiting`` heads."""
        if self.held and self.failed is None and self.upgraded is None:
            self._feed_some(self.held)

    @property
    def waiting(self) -> int:
        """The requests parsed and not taken (their heads in ``events``)."""
        count = 0
        for event in self.events:
            if type(event) is Head:
                count += 1
        return count

    def _feed_some(self, data: bytes) -> None:
        """Parse pieces of ``data`` while fewer than ``max_waiting`` heads wait; hold the
        rest."""
        self.held = b""
        self._slicing = True  # ``feed`` parses each piece as it is
        try:
            self._feed_pieces(data)
        finally:
            self._slicing = False

    def _feed_pieces(self, data: bytes) -> None:
        while data and self.failed is None and self.upgraded is None:
            ends = self.max_waiting - self.waiting - (1 if self.in_head else 0)
            if ends <= 0:
                self.held = data
                return
            # A body framed by its length is skipped whole: head ends in it complete nothing,
            # and cutting there would only split the body into more events.
            left = self._body_left  # below 0 in a chunked body: nothing to skip
            cut = min(left, len(data)) if self._in_body and left > 0 else 0
            for _ in range(ends):
                at = data.find(HEAD_END, cut)
                if at < 0:
                    cut = len(data)
                    break
                cut = at + len(HEAD_END)
            self.feed(data[:cut])
            data = data[cut:]
        if data and self.upgraded is not None:
            self.upgraded += data

    def resume(self) -> None:
        """The upgrade was declined: read what waited as requests."""
        waiting, self.upgraded = self.upgraded, None
        self._parser = httptools.HttpRequestParser(self)
        if waiting:
            self.feed(bytes(waiting))

    @property
    def mid_message(self) -> bool:
        """A request has begun and not ended (its end of stream would cut it)."""
        return self.in_head or self._in_body


class ResponseReader(_Reader):
    """A client's half: reads the responses to the requests it is told about (``expect``).

    llhttp cannot be told that a response answers ``HEAD`` (no body, whatever its length
    says): that head is read alone and its body skipped. A body delimited by the end of the
    connection ends with ``eof()``."""

    __slots__ = ("_head_only", "_parser", "_pending", "upgraded")

    def __init__(self, max_head_bytes: int, max_fields: int = DEFAULT_MAX_FIELDS) -> None:
        super().__init__(max_head_bytes, max_fields)
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = False
        self._pending = bytearray()  # a HEAD response's head, until complete
        self.upgraded: bytes | None = None  # what followed a 101's head

    def expect(self, method: bytes) -> None:
        self._head_only = method == b"HEAD"

    def on_status(self, reason: bytes) -> None:
        self._element += reason
        self._size += len(reason)

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise _Refused(Refusal(502, MALFORMED, f"HTTP version {version}"))
        status = parser.get_status_code()
        if not 100 <= status <= 599:  # RFC 9110 15: three digits, 1xx to 5xx
            raise _Refused(Refusal(502, MALFORMED, f"response status {status}"))
        head = Head(
            self._headers,
            status=status,
            reason=self._element,
            http10=version == "1.0",
            noted=self._noted,
        )
        self._framing(head)
        head.upgrade = status == 101
        bodiless = status < 200 or status in (204, 304) or self._head_only
        if bodiless:
            head.chunked, head.length = False, None
        elif not head.chunked and head.length is None:
            self._until_eof = True
            head.keep_alive = False
        self.in_head = False
        self._in_body = True
        self.events.append(head)

    def feed(self, data: bytes) -> None:
        if self.failed is not None or self.upgraded is not None:
            return
        if self._head_only:
            self._feed_head_only(data)
            return
        offset = self._execute(self._parser, data)
        if offset is not None:
            self._in_body = False
            self.upgraded = data[offset:]

    def _feed_head_only(self, data: bytes) -> None:
        self._pending += data
        end = self._pending.find(b"\r\n\r\n")
        if end < 0:
            if len(self._pending) > self.max_head_bytes:
                self._fail(Refusal(502, HEADERS_TOO_LARGE, "response head over the limit"))
            return
        head, rest = bytes(self._pending[: end + 4]), bytes(self._pending[end + 4 :])
        self._pending.clear()
        self._execute(self._parser, head)
        if self.failed is not None:
            return
        if self.events and isinstance(self.events[-1], Head) and self.events[-1].status >= 200:
            # The final head of a HEAD response: the message ends here; a fresh parser reads
            # whatever follows as the next response.
            self._head_only = False
            self.on_message_complete()
            self._parser = httptools.HttpResponseParser(self)
        if rest:
            self.feed(rest)

    def eof(self) -> bool:
        """The peer's end of stream: True when it ended a body delimited by it (an ``End``
        is queued), False when it cut a message short or came between messages."""
        if self._until_eof and self._in_body:
            self.on_message_complete()
            return True
        return False

    @property
    def mid_message(self) -> bool:
        return self.in_head or self._in_body


# -- writers ---------------------------------------------------------------------------------
def _header_block(parts: list[bytes], headers: Headers) -> bytes:
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    return _header_block([method, b" ", target, b" HTTP/1.1\r\n"], headers)


def response_head(status: int, reason: bytes, headers: Headers) -> bytes:
    return _header_block([b"HTTP/1.1 %d %s\r\n" % (status, reason)], headers)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def last_chunk(trailers: Headers) -> bytes:
    return _header_block([b"0\r\n"], trailers)


# -- headers ---------------------------------------------------------------------------------
def header_value(headers: Headers, name: bytes) -> str | None:
    """The first ``name`` header's value (``name`` lowercased), as text."""
    for n, v in headers:
        if n == name:
            return v.decode("latin-1")
    return None


def forwarded_headers(
    headers: Headers, *, keep_upgrade: bool = True, noted: Headers | None = None
) -> tuple[Headers, bool]:
    """The headers without hop-by-hop ones (``HOP_BY_HOP`` and what ``Connection`` lists; ``TE:
    trailers`` stays); and whether this is an upgrade request (then ``Connection: upgrade``
    and ``Upgrade`` are kept, since the next hop must see the proposal). ``noted``: the
    headers among them named in ``NOTED`` (``Head.noted``); when none is hop-by-hop, nothing
    is removed and the headers are copied as they are (the usual request and response)."""
    if noted is not None and HOP_BY_HOP.isdisjoint(map(_NAME, noted)):  # no Python frame
        return list(headers), False
    listed = {
        t.strip().lower()
        for n, v in headers
        if n == b"connection"
        for t in v.split(b",")
        if t.strip()
    }
    upgrade = (
        keep_upgrade and b"upgrade" in listed and header_value(headers, b"upgrade") is not None
    )
    out: Headers = []
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
