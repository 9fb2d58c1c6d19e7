"""Connection records: the facts of one proxied connection, as telemetry reports them.

The proxy fills a ``ConnectionRecord`` per connection (who talked to whom, which way, bytes
each way, since when, whether it was mTLS, why it failed) and tells its observers when one opens
and when one closes; metrics, the access log and the admin API's ``/connections`` read them.
The record is defined here, with the observers' interface, so that telemetry depends on nothing
above it: the proxy imports telemetry's vocabulary, never the other way round.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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


class ConnectionObserver(Protocol):
    """Told about every record: ``opened`` once registered, ``closed`` once removed."""

    def opened(self, record: ConnectionRecord) -> None: ...

    def closed(self, record: ConnectionRecord) -> None: ...
