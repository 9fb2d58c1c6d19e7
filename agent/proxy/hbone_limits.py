"""What one HBONE peer can make the agent hold, the limits that bound it, and their metric.

Port 15008 is reachable from every node, and any workload can get a certificate for its own
identity, so "an authenticated mesh peer" may be hostile. Whatever a peer sends, the memory one
HBONE connection can make the agent hold is bounded by ``connection_memory_bound`` (17.5 MiB with
the default windows), the sum of:

=========================================  ================================================
what                                       bounded by
=========================================  ================================================
received DATA not yet written to pods      the connection window (16 MiB), replenished only
                                           as the bytes are written (``hbone_flow``)
outgoing DATA waiting for the peer         ``OUT_BUDGET`` + one relay read: a tunnel's
(codec queues + TLS transport buffer)      ``write`` waits while the connection holds more
replies to the peer's frames (PING and     the transport's high-water mark while it writes,
SETTINGS ACKs, RST_STREAMs)                ``max_unsent_replies`` + one slice while it
                                           does not (``hbone``)
partial non-DATA frames, header blocks     ``max_control_frame``, ``max_header_block``
                                           (``h2data``)
=========================================  ================================================

plus a fixed cost per connection (the TLS object, ``h2``'s state, up to 100 open streams and the
1024 closed ones ``h2`` remembers: ``agent.proxy.h2wire.GracefulH2Connection``; the CONNECTs the
codec keeps checked, at most about 23 KiB: ``agent.proxy.hbone._CONNECTS``). The
connections themselves are bounded by ``InboundLimits``: TLS handshakes in progress (each holds a
descriptor and a task while a client may trickle bytes for ``handshake_timeout``), connections
per peer address, and an idle limit (no stream for ``idle_timeout``) next to the PING keepalive
that both sides run.

The windows are the one part an operator chooses (``nodemesh agent --hbone-window``,
``with_stream_window``): larger ones cost less CPU per GB, but a pod that stops reading makes the
agent hold its stream's window, and a hostile peer the connection's (ARCHITECTURE.md, "HBONE
windows"; the measurements: docs/performance/bulk-and-windows.md).

Across connections, what all of them hold in received DATA and promise in open windows is
bounded by the process's buffer budget (``agent.proxy.budget``, ``--hbone-buffer-budget``) plus
HTTP/2's initial 64 KiB window per connection: ``max_connections_per_peer`` times the table above
is no longer what a peer address can make the agent hold in received data. What all of them
hold for their peers (the second row) is bounded the same way by the process's outgoing queue
budget (``agent.proxy.budget.QueueBudget``, ``--hbone-queue-budget``) plus 128 KiB per
connection.

``HboneProtocol.held_bytes()`` is the agent's own accounting of the table above for a live
connection; the tests that drive each hostile pattern read it.

Every refusal is counted by cause (``agent.proxy.hbone_events.Cause``) in
``nodemesh_hbone_refusals_total``; the connection-level
ones (handshake and per-peer caps, idle) also go through the proxy's rejection counter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from agent.base.metrics import counter
from agent.proxy.h2wire import KIB, MIB, HboneSettings

REFUSALS = counter(
    "nodemesh_hbone_refusals_total",
    "HBONE connections closed because the peer exceeded a limit or broke HTTP/2, by cause "
    "(control_flood, oversized_frame, header_block, flow_control, rapid_reset, invalid_header, "
    "h2_limit, protocol_error, unparseable)",
    ["cause"],
)

# The TLS transport's write buffer: above this the protocol is paused (and writers wait).
TRANSPORT_HIGH_WATER = 64 * KIB
# Outgoing bytes one connection may hold (codec queues + TLS transport) before writers wait.
# With 128 KiB per stream (``agent.proxy.tunnel.HIGH_WATER``) plus one relay read, two streams
# whose peers stopped reading leave room for the others.
OUT_BUDGET = 1024 * KIB
# Largest single write a relay hands to a tunnel (``agent.proxy.relay.MAX_CHUNK``).
MAX_WRITE = 256 * KIB
# Non-DATA bytes given to h2 per call (``agent.proxy.hbone.H2_SLICE``); a reply is at most
# 1.5 times the frame that caused it (13-byte RST_STREAM for a 9-byte empty DATA frame).
REPLY_SLICE = 24 * KIB


@dataclass(frozen=True, slots=True)
class InboundLimits:
    """Bounds on inbound HBONE connections (port 15008); the plaintext listener (15006,
    ``agent.proxy.plaintext``) takes ``max_connections_per_peer`` from it too."""

    # TLS handshakes in progress, all peers together; more are reset at once.
    max_handshakes: int = 128
    # Connections (handshaking or established) from one peer address; on 15006, connections
    # being served from one client address (each listener counts its own).
    max_connections_per_peer: int = 256
    # A connection without a stream for this long is closed (GOAWAY). Twice the client pool's
    # idle timeout, so that the client, which knows when it will open the next stream, closes
    # first.
    idle_timeout: float = 600.0


# ``nodemesh agent --hbone-window``: the stream window an operator may choose. The connection
# window is always this many stream windows, so that a pod that stops reading stalls only its own
# stream and it takes this many such streams on one connection to stall the others (ztunnel's
# ratio too). 64 KiB is about HTTP/2's initial window (65,535 bytes): less only adds
# WINDOW_UPDATE turns. At 16 MiB one peer can already make one connection hold 65.5 MiB.
STREAMS_PER_CONNECTION_WINDOW = 4
MIN_STREAM_WINDOW = 64 * KIB
MAX_STREAM_WINDOW = 16 * MIB


def with_stream_window(stream_window: int) -> HboneSettings:
    """The default settings with ``stream_window`` and a connection window of
    ``STREAMS_PER_CONNECTION_WINDOW`` of them; ``ValueError`` outside the allowed range."""
    if not MIN_STREAM_WINDOW <= stream_window <= MAX_STREAM_WINDOW:
        raise ValueError(
            f"a stream window of {stream_window} bytes is outside "
            f"{MIN_STREAM_WINDOW // KIB} KiB to {MAX_STREAM_WINDOW // MIB} MiB"
        )
    return dataclasses.replace(
        HboneSettings(),
        stream_window=stream_window,
        connection_window=STREAMS_PER_CONNECTION_WINDOW * stream_window,
    )


def connection_memory_bound(settings: HboneSettings) -> int:
    """The most the peer of one HBONE connection can make us hold (the module docstring)."""
    return (
        settings.connection_window
        + OUT_BUDGET
        + MAX_WRITE
        + TRANSPORT_HIGH_WATER
        + settings.max_unsent_replies
        + REPLY_SLICE
        + settings.max_header_block
        + settings.max_control_frame
    )
