"""What a proxied HTTP/2 request is to the parties around ``H2Proxy``: the records and the
callbacks through which the shells, the router and telemetry talk to it.

Why a module of its own: these types are the proxy's contract with the source's routing
(``agent.proxy.h2route``: ``PickRequest`` in, ``Choice`` or ``LocalAnswer`` out, with its
``Retries`` and ``Resend``), with the shells (``H2Exchange`` and the other reports they take)
and with the destination's frame relay, which reports the same ``H2Exchange``. They change
with what a request may be told to do, not with how streams are moved, so they are read
apart from the stream machinery; and the Envoy flags and gRPC statuses that a proxy's own
answers carry are stated once, here, for both destination cores and the source.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.proxy.http1 import NO_FLAGS, RequestHead, Verdict

Header = tuple[bytes, bytes]

UPSTREAM_RESET = "UR"  # Envoy's flag: the upstream reset the stream
UPSTREAM_CONNECT_FAILURE = "UF"  # Envoy's flag: the upstream could not be connected
UPSTREAM_OVERFLOW = "UO"  # Envoy's flag: over the upstream's limit (its concurrent streams)
NO_HEALTHY_UPSTREAM = "UH"  # Envoy's flag: no endpoint to send the request to

GRPC_UNKNOWN = 2
GRPC_DEADLINE_EXCEEDED = 4
GRPC_UNIMPLEMENTED = 12
GRPC_UNAVAILABLE = 14

UPSTREAM_TIMEOUT = "UT"  # Envoy's flag: the request's time ran out
TIMEOUT_BODY = b"upstream request timeout"
LOST_BODY = b"upstream connect error or disconnect/reset"  # Envoy's words for a lost upstream


def grpc_status_for(http_status: int) -> int:
    """The gRPC status a proxy's own HTTP answer becomes for a gRPC call: gRPC's HTTP mapping
    (404 UNIMPLEMENTED; 502/503 UNAVAILABLE), except 500 (a route backend that cannot be used:
    GRPCRoute asks for UNAVAILABLE) and 504 (a timeout: DEADLINE_EXCEEDED, what the caller's
    own deadline would give)."""
    if http_status == 404:
        return GRPC_UNIMPLEMENTED
    if http_status == 504:
        return GRPC_DEADLINE_EXCEEDED
    if http_status in (500, 502, 503):
        return GRPC_UNAVAILABLE
    return GRPC_UNKNOWN


@dataclass(slots=True)
class H2Exchange:
    """One stream's request and response, as telemetry reports it."""

    head: RequestHead
    grpc: bool
    started: float
    status: int = 0
    grpc_status: str = ""  # from the trailers, or a trailers-only response; "" if none
    request_bytes: int = 0  # DATA bytes
    response_bytes: int = 0  # DATA bytes
    flags: str = NO_FLAGS
    denied_by: str | None = None  # the deciding policy (or reason) when refused by policy
    ended: float = 0.0
    dry_run: str = ""  # the dry-run policies that would have denied it (``Verdict.dry_run``)
    first_byte: float = 0.0  # clock time of the response headers (0: none)
    upstream: object = None  # ``Choice.key`` of the upstream that served it (source side)
    tag: object = None  # ``Choice.tag``: the shell's own note for the request
    sent: float = 0.0  # clock time its last try's head went upstream (or was answered there)


Authorize = Callable[[RequestHead], Verdict]


HeaderEdit = Callable[[list[Header]], list[Header]]


class Retries(Protocol):
    """A request's retry policy, asked by ``H2Proxy`` when a try ends before any response
    reached the client."""

    def after(self, status: int | None, first_byte: float, *, replayable: bool) -> float | None:
        """The try ended with ``status`` (``None``: no response head; a gRPC trailers-only
        ``UNAVAILABLE`` is 503): seconds to wait before another try, or None (no retry)."""
        ...

    def next(self) -> Choice | LocalAnswer:
        """The upstream for the next try (or how to answer the request if there is none)."""
        ...


class Resend(Protocol):
    """A request's retry of a try its endpoint never processed, asked by ``H2Proxy`` before
    any ``Retries``: the upstream could not be opened, or refused the stream (``cause``: a
    TrafficPolicy ``retryOn`` value, ``REFUSED`` for a refused stream)."""

    def unprocessed(self, cause: str, *, replayable: bool) -> Choice | LocalAnswer | None:
        """The try failed for ``cause``; ``replayable``: the proxy holds all of the request it
        sent. The upstream for another try now, how to answer the request (no endpoint left),
        or None (not retried: the failure goes on as without a ``Resend``)."""
        ...


@dataclass(slots=True)
class Choice:
    """Where one request goes (``Pick``): ``key`` names the upstream (an endpoint), ``tag`` is
    the shell's note that comes back on the request's ``H2Exchange``. ``edit_request`` edits
    the forwarded header block (pseudo-headers included), ``edit_response`` the response's;
    after ``timeout`` seconds (from the choice) without the response's end the stream is reset
    upstream and answered 504 (gRPC: ``DEADLINE_EXCEEDED``) with flag ``UT``; after
    ``try_timeout`` seconds from a try's head, that try is reset and, if ``retries`` say so,
    the request sent again, else answered the same way. ``delay`` holds the request that long
    before its head goes upstream (an injected fault; its body waits within the window).

    Not frozen, though nothing changes it once made: one is made per request, and a frozen
    dataclass's ``__init__`` sets each of its eleven fields through ``object.__setattr__``
    (1.0 µs against 0.3 µs, micro-benchmark)."""

    key: object
    tag: object = None
    edit_request: HeaderEdit | None = None
    edit_response: HeaderEdit | None = None
    timeout: float | None = None
    retries: Retries | None = None
    try_timeout: float | None = None
    delay: float = 0.0
    resend: Resend | None = None  # a try the endpoint never processed, sent again at once
    mirror: bool = False  # hand a copy of the complete request to the shell (``take_mirrors``)
    # Waiting for a slot of the backend's limit (``key`` unknown yet): held like a delayed
    # request until the shell calls ``unpark`` with the upstream or an answer.
    parked: bool = False


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """``Pick``'s answer for a request served by the proxy itself: ``status`` (gRPC:
    ``grpc_status_for(status)`` in a trailers-only response), Envoy's ``flags``, ``message``
    as body (or ``grpc-message``), extra response ``headers`` (a redirect's ``location``)."""

    status: int
    flags: str
    message: bytes
    headers: tuple[Header, ...] = ()
    tag: object = None
    grpc_status: int | None = None  # for a gRPC call, instead of ``grpc_status_for(status)``
    # The upstream whose policy answered it (source side: a same-node endpoint's denial),
    # reported as the request's (``H2Exchange.upstream``).
    upstream: object = None


@dataclass(frozen=True, slots=True)
class H2Mirrored:
    """A complete request to copy (``Choice.mirror``): the head as forwarded, the body (None
    when it was over ``max_replay_body``: not copied), the trailers, the choice's tag."""

    head: list[Header]
    body: bytes | None
    trailers: list[Header] | None
    tag: object


# ``H2Proxy.take_reports``: the completed exchanges, the dropped tries, the rejections and the
# mirrored requests since the last take, each ``()`` when there is none. A plain tuple: a
# ``NamedTuple``'s ``__new__`` is one more Python call per report.
H2Reports = tuple[Sequence[H2Exchange], Sequence[H2Exchange], Sequence[str], Sequence[H2Mirrored]]
NO_REPORTS: H2Reports = ((), (), (), ())


@dataclass(slots=True)
class PickRequest:
    """What ``Pick`` sees of a request: its head, its ``:path`` with the query, whether it is
    a gRPC call (``content-type: application/grpc*``). Made per request: not frozen (as
    ``Choice``)."""

    head: RequestHead
    target: str
    grpc: bool


# The source side's per-request choice of upstream; None: no upstream (answered 503/UNAVAILABLE).
Pick = Callable[[PickRequest], Choice | LocalAnswer | None]
# The source side's admission of a try where its head is about to go (the request's exchange,
# the upstream's key and uid): True to send it; False to hold it (parked) until the shell's
# ``unpark``; or the answer the upstream's own proxy gives it there (a same-node endpoint's
# policy or rate limit), which is that try's response: its ``retries`` may send it again.
Admit = Callable[[H2Exchange, object, int], LocalAnswer | bool]


def header(headers: Iterable[Header], name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None
