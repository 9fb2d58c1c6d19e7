"""Connection records: the facts of one proxied connection, as telemetry reports them.

The proxy fills a ``ConnectionRecord`` per connection (who talked to whom, which way, bytes
each way, since when, whether it was mTLS, why it failed) and tells its observers when one opens
and when one closes; metrics, the access log and the admin API's ``/connections`` read them.
The record is defined here, with the observers' interface, so that telemetry depends on nothing
above it: the proxy imports telemetry's vocabulary, never the other way round.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

OUTBOUND = "outbound"
INBOUND = "inbound"

SECURITY_MTLS = "mutual_tls"
SECURITY_NONE = "none"


@dataclass
class ConnectionRecord:
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
    first_byte: float = 0.0  # time.monotonic() of the first upstream byte (0 = none yet)

    def describe(self) -> dict[str, object]:
        return asdict(self)


class ConnectionObserver(Protocol):
    """Told about every record: ``opened`` once registered, ``closed`` once removed."""

    def opened(self, record: ConnectionRecord) -> None: ...

    def closed(self, record: ConnectionRecord) -> None: ...


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One HTTP request served on a connection (``ConnectionRecord``), as telemetry reports it.
    No label is made of ``path``: it is for the access log only."""

    method: str
    path: str
    authority: str
    status: int
    duration_ms: float
    request_bytes: int
    response_bytes: int
    response_flags: str  # "-", "RBAC", "UC", "DC", "UR"
    request_id: str
    protocol: str = "http"  # Istio's request_protocol: "http" (HTTP/1.1, HTTP/2) or "grpc"
    grpc_status: str = ""  # grpc-status of a gRPC response ("" if none)


class RequestObserver(Protocol):
    """Told about every HTTP request and every refusal of the HTTP layer."""

    def requested(self, connection: ConnectionRecord, request: RequestRecord) -> None: ...

    def rejected(self, cause: str) -> None: ...

    def would_deny(self, policy: str) -> None: ...
