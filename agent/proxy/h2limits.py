"""How much one proxied HTTP/2 connection may make the proxy hold, and the h2c connections
made with those settings.

Why a module of its own: the limits are read by three parties that otherwise share nothing,
``H2Proxy``, the destination's frame relay (``agent.proxy.h2relay``) and the shells that pick a
connection's limits (``PEER_LIMITS`` for a source node over HBONE), and the settings a
connection announces must be the ones its decoder enforces. So the numbers (``H2Limits``), the
causes a broken limit is counted under, and ``new_connection`` (which turns the numbers into
SETTINGS and the decoder's bound, with the allowance a source node's blocks get on top) live
together, apart from the stream logic.
"""

from __future__ import annotations

from dataclasses import dataclass

from h2.config import H2Configuration
from h2.settings import SettingCodes, Settings

from agent.proxy.h2wire import (
    WALK_FROM,
    GracefulH2Connection,
    tableless_headers,
)
from agent.proxy.http1 import REQUEST_ID_LENGTH, SHADOW_SUFFIX

KIB = 1024

# Causes of a refused connection (``nodemesh_http_rejected_requests_total{cause}``); the header
# block ones are ``agent.proxy.h2guard``'s.
CONTROL_FLOOD = "h2_control_flood"
RAPID_RESET = "h2_rapid_reset"
EMPTY_FRAMES = "h2_empty_frames"
TOO_MANY_STREAMS = "h2_max_concurrent_streams"
OVERSIZED_FRAME = "h2_oversized_frame"
PROTOCOL_ERROR = "h2_protocol_error"
HEADER_TIMEOUT = "h2_header_timeout"  # a header block not finished in time (slowloris)

# What a source node adds, at most, to a request head it forwards to a destination node over
# HBONE, by HPACK's count (``max_header_list_size``: each field's name and value and 32): an
# ``x-request-id`` when absent (``H2Proxy._on_request``), and a mirrored copy's ``:authority`` and
# ``host`` suffixed ``-shadow`` (``h2mirror.shadow_head``; a block has at most one of each).
# No ``grpc-timeout`` is added or rewritten (a call's own passes as it came), trace headers
# pass untouched, and nothing is added to a response or trailers on the way back (a
# destination's own answers are a few short fields). The destination reads a peer's blocks
# with it on top (``PEER_LIMITS``), so that the bound stays the client's, checked where its
# block enters the mesh, as HTTP/1.1's (``http1.PEER_REQUEST``). What a route's filters add
# (RequestHeaderModifier, URLRewrite) is the route author's and counts.
PEER_HEADER_LIST = 32 + len(b"x-request-id") + REQUEST_ID_LENGTH + 2 * len(SHADOW_SUFFIX)


@dataclass(frozen=True, slots=True)
class H2Limits:
    """What one proxied HTTP/2 client connection may make the proxy hold or do."""

    stream_window: int = 256 * KIB
    connection_window: int = 1024 * KIB  # also what the proxy holds per direction, at most
    max_frame_size: int = 16 * KIB  # the protocol's minimum: no large frame is ever buffered
    max_concurrent_streams: int = 100
    max_header_list_size: int = 16 * KIB
    # On top of ``max_header_list_size`` for the client's blocks alone (read and announced to
    # it in SETTINGS): ``PEER_HEADER_LIST`` when the client is a source node (HBONE), whose
    # blocks carry what it added to its client's; none for a plaintext or same-node client.
    # The upstreams' (responses, trailers) keep the plain bound: a destination adds nothing.
    client_allowance: int = 0
    max_header_block: int = 32 * KIB
    max_continuations: int = 16
    # Reply bytes (PING/SETTINGS ACKs, RST_STREAMs) the client's frames made us queue since the
    # shell last took our output: a legitimate client never needs this many.
    max_unsent_replies: int = 16 * KIB
    # Streams reset by the client before their response began and within
    # ``premature_reset_lifetime`` seconds of their start (Envoy's default): beyond this many,
    # when they are also more than half the streams it opened, the connection is a rapid-reset
    # attack.
    max_premature_resets: int = 100
    premature_reset_lifetime: float = 1.0
    max_empty_frames: int = 100  # consecutive empty DATA frames without END_STREAM
    # A request body kept to be sent again (source side, a rule that retries): beyond this,
    # the request is not retried.
    max_replay_body: int = 64 * KIB


PEER_LIMITS = H2Limits(client_allowance=PEER_HEADER_LIST)  # a destination's, for a source node


class _SidedConfiguration(H2Configuration):
    """``H2Configuration`` whose ``client_side`` is a plain attribute: ``h2`` (and ``h2wire``'s
    fast paths) read it through a validating descriptor, a Python call and a ``getattr``, at
    each new stream and each count of open streams, eight times per gRPC call at the source;
    nothing sets it after the connection is made (``__init__`` sets a ``bool``, unchecked)."""

    client_side = False  # hides the descriptor; ``__init__`` sets each instance's own


def new_connection(*, client_side: bool, limits: H2Limits) -> GracefulH2Connection:
    """An h2c connection with ``limits``' settings, its preface and connection window queued;
    the server side (ours to the client) reads and announces the header list size with
    ``limits.client_allowance`` on top.
    Headers stay bytes: they are forwarded, not interpreted (``header_encoding=None``); what
    arrives is validated (RFC 9113 8.2) by ``H2Proxy`` with ``check_block``, in one pass instead
    of ``h2``'s chain of generators; what is sent is not validated a second time."""
    conn = GracefulH2Connection(
        _SidedConfiguration(
            client_side=client_side,
            header_encoding=None,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
            # What we send was validated as it arrived (or is ours): h2's outbound checks of
            # every header were a visible share of a request's time in a profile, for nothing.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
    )
    # What is announced is what the decoder enforces (``h2`` also sets the decoder's bound to
    # the announced one once the peer acknowledged our SETTINGS).
    list_size = limits.max_header_list_size + (0 if client_side else limits.client_allowance)
    conn.local_settings = Settings(
        client=client_side,
        initial_values={
            SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            SettingCodes.MAX_FRAME_SIZE: limits.max_frame_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: list_size,
            SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            SettingCodes.ENABLE_PUSH: 0,
        },
    )
    conn.max_inbound_frame_size = limits.max_frame_size
    conn.decoder.max_header_list_size = list_size
    tableless_headers(conn)  # our legs are loopback, a veth or a LAN: CPU, not bytes, is short
    # A new stream's limit check walks h2's streams (forgetting the closed ones) only once
    # ``WALK_FROM`` are known, as on HBONE's connections: it was one walk on each of a
    # call's two connections at the source, and one at the destination without the relay.
    conn.walk_from = WALK_FROM
    conn.initiate_connection()
    extra = limits.connection_window - conn.inbound_flow_control_window
    if extra > 0:
        conn.increment_flow_control_window(extra)
    return conn
