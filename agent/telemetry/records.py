"""Connection records: the facts of one proxied connection, as telemetry reports them.

The proxy fills a ``ConnectionRecord`` per connection (who talked to whom, which way, bytes
each way, since when, whether it was mTLS, why it failed) and tells its observers when one opens
and when one closes; metrics, the access log and the admin API's ``/connections`` read them.
The record is defined here, with the observers' interface, so that telemetry depends on nothing
above it: the proxy imports telemetry's vocabulary, never the other way round.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Protocol

OUTBOUND = "outbound"
INBOUND = "inbound"

SECURITY_MTLS = "mutual_tls"
SECURITY_NONE = "none"

# Request headers that carry the caller's trace context (h11's lowercase names): W3C Trace
# Context and B3 (single and multi-header). The HTTP layer copies them into ``RequestRecord``
# so that a request's span joins the caller's trace (``agent.telemetry.traces``).
TRACE_HEADERS = frozenset(
    {b"traceparent", b"tracestate", b"b3", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-sampled",
     b"x-b3-flags"}
)  # fmt: skip


_NAME = operator.itemgetter(0)


def trace_headers_of(headers: Sequence[tuple[bytes, bytes]]) -> tuple[tuple[str, str], ...]:
    """The (name, value) pairs of ``headers`` (lowercase names, as h11 gives them) that carry
    trace context, for ``RequestRecord.trace_headers``.

    Every parsed request head comes here (both proxies, HTTP/1.1 and HTTP/2), and most carry
    no trace context: that is answered without a Python-level loop (``isdisjoint`` over the
    names), about a third of the generator's cost on a short head; a list, not a generator,
    feeds the tuple otherwise. ``headers`` is a sequence (gone through twice)."""
    if TRACE_HEADERS.isdisjoint(map(_NAME, headers)):
        return ()
    return tuple([(n.decode(), v.decode("latin-1")) for n, v in headers if n in TRACE_HEADERS])


@dataclass(slots=True)
class ConnectionRecord:
    """Slots: a record lives as long as its connection, idle or not (without them its
    attributes took about 60 bytes more)."""

    direction: str
    source: str  # ip:port
    destination: str  # ip:port as the client addressed it
    source_identity: str | None = None
    destination_identity: str | None = None
    security: str = SECURITY_NONE
    path: str = ""  # hbone, local, passthrough, plaintext
    started: float = field(default_factory=time.time)
    bytes_sent: int = 0  # client -> server
    bytes_received: int = 0  # server -> client
    id: int = 0
    upstream: str = ""  # ip:port actually dialed (a Service VIP resolves to an endpoint)
    failure: str = ""  # reason key of the rejection that ended it ("" = none)
    # What refused it when ``failure`` is policy_denied: ``Decision.refused_by`` ("ns/name:rules[i]"
    # or "no-allow-match"; "" = not refused by a policy)
    policy: str = ""
    first_byte: float = 0.0  # time.monotonic() of the first upstream byte (0 = none yet)
    protocol: str = "tcp"  # "http/1.1" once an HTTP layer serves it (its requests are counted)
    requests: int = 0  # HTTP requests finished on it (``Registry.request_done``)
    # Hostname of the Service the client dialled, when the address does not say it (inbound:
    # the source named it on the CONNECT and it selects the pod; "" = unknown).
    service: str = ""
    # Set while the kernel moves the bytes (the proxy's same-node splice): brings the byte
    # counters up to date. Readers of live records call ``refresh()`` first.
    sync: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def refresh(self) -> None:
        if self.sync is not None:
            self.sync()

    def describe(self) -> dict[str, object]:
        self.refresh()
        described = asdict(self)
        del described["sync"]
        return described

    def copy(self) -> ConnectionRecord:
        """A shallow copy, field for field (what ``dataclasses.replace(self)`` gives, in a
        tenth of its time): the source reports each request on a copy pointed at the endpoint
        that served it."""
        return ConnectionRecord(*_FIELDS(self))


# Every field's value, in ``__init__``'s order (``copy``).
_FIELDS = operator.attrgetter(*(f.name for f in fields(ConnectionRecord)))


def same_node_destination(sent: ConnectionRecord, service: str) -> ConnectionRecord:
    """The record a destination proxy would hold for a request the source node sent to a pod
    on its own node (``sent``: the source's record pointed at that endpoint, ``upstream`` its
    ``ip:port``; ``service``: the hostname of the Service it was sent for, as the CONNECT
    would name it).

    Why: no other proxy sees such a request, so the source node reports it for both ends, and
    a query by ``reporter="destination"`` (Istio's inbound views, Kiali) counts it like one
    that crossed nodes. The pod sees the client's address (the connection is made from the
    client pod's IP) and the client's identity is known here; no TLS is on that path, as the
    source's report says too. The id is the client connection's, so the two lines of one
    request are found together in the access log."""
    return ConnectionRecord(
        INBOUND,
        sent.source,
        sent.upstream or sent.destination,
        source_identity=sent.source_identity,
        destination_identity=sent.destination_identity,
        security=SECURITY_NONE,
        path=sent.path,
        started=sent.started,
        id=sent.id,
        protocol=sent.protocol,
        service=service,
    )


class ConnectionObserver(Protocol):
    """Told about every record: ``opened`` once registered, ``closed`` once removed."""

    def opened(self, record: ConnectionRecord) -> None: ...

    def closed(self, record: ConnectionRecord) -> None: ...


@dataclass(slots=True)
class RequestRecord:
    """One HTTP request served on a connection (``ConnectionRecord``), as telemetry reports it.
    No label is made of ``path``: it is for the access log only. Not frozen, though nothing
    changes it once made: two are made per request via a Service, and a frozen dataclass's
    ``__init__`` (``object.__setattr__`` per field) cost about 2.5 us more each."""

    method: str
    path: str
    authority: str
    status: int
    duration_ms: float
    request_bytes: int
    response_bytes: int
    response_flags: str  # "-", "RBAC", "UC", "DC", "UR"
    request_id: str
    trace_headers: tuple[tuple[str, str], ...] = ()  # (name, value) of TRACE_HEADERS sent
    started_at: float = 0.0  # wall-clock time (time.time()) of the request's head; 0 = unknown
    protocol: str = "http"  # Istio's request_protocol: "http" (HTTP/1.1, HTTP/2) or "grpc"
    grpc_status: str = ""  # from grpc-status (trailers or trailers-only); "" when not gRPC
    upstream: str = ""  # ip:port of the endpoint it went to; "" = the connection's upstream
    # Why it was refused, when it was: the DENY AuthorizationPolicy and its rule that matched
    # ("namespace/name:rules[i]"; "no-allow-match" when ALLOW policies applied and none
    # matched) with flag RBAC, the RateLimitPolicy ("namespace/name") with flag RL. Envoy's
    # RBAC filter says as much in its dynamic metadata (the effective policy id); never a
    # metric label (one series per policy and code).
    policy: str = ""
    # The dry-run AuthorizationPolicies ("namespace/name", comma-separated) whose enforcement
    # would have denied it (Istio's shadow result), whatever its answer was.
    dry_run_policy: str = ""


class RequestObserver(Protocol):
    """Told about every HTTP request and every refusal of the HTTP layer."""

    def requested(self, connection: ConnectionRecord, request: RequestRecord) -> None: ...

    def rejected(self, cause: str) -> None: ...

    def would_deny(self, policy: str) -> None: ...
