"""HTTP/2 settings and the two places where HBONE needs more than ``h2`` offers.

The values follow Istio's ztunnel so that the two proxies tunnel to each other with the same
throughput characteristics (see ARCHITECTURE.md, "HBONE"):

* stream window 4 MiB and connection window 16 MiB: a single tunnel can fill a fast link without
  waiting for WINDOW_UPDATEs, and the stream window bounds what one slow receiver can make us
  buffer;
* max frame size 1 MiB: fewer frames (and fewer Python calls) per megabyte relayed;
* max header list 16 KiB: a CONNECT request needs a few hundred bytes, anything near the limit is
  abuse;
* 100 concurrent streams per connection; PING every 10 s, connection dead after 20 s of silence.

Why a subclass of ``H2Connection``: RFC 9113 section 6.8 lets streams at or below a GOAWAY's
last-stream-id run to completion, which is what a graceful drain needs. ``h2`` 4.x instead moves
its connection state machine to CLOSED on sending or receiving GOAWAY, after which it refuses to
send anything, so draining would cut every live tunnel. ``GracefulH2Connection`` sends and receives
GOAWAY without that transition; the codec (``agent.proxy.hbone``) enforces "no new streams" itself.
These two overrides use ``h2`` internals (``_prepare_for_sending``, ``_receive_goaway_frame``),
which is why ``pyproject.toml`` pins ``h2`` below 5.

DATA frames do not go through ``h2`` at all (``agent.proxy.h2data``, ``agent.proxy.hbone_flow``):
``h2`` only ever sees empty ones, where the peer ended a stream or sent to a stream that cannot
take data.
"""

from __future__ import annotations

from dataclasses import dataclass

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes, _error_code_from_int
from h2.events import ConnectionTerminated, Event
from h2.settings import SettingCodes, Settings
from hyperframe.frame import Frame, GoAwayFrame

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True, slots=True)
class HboneSettings:
    """Tunables of one HBONE connection (defaults: ztunnel's)."""

    stream_window: int = 4 * MIB
    connection_window: int = 16 * MIB
    max_frame_size: int = 1 * MIB
    max_header_list_size: int = 16 * KIB
    max_concurrent_streams: int = 100
    # Streams the peer may reset before we answered them before we call it a rapid-reset attack
    # (CVE-2023-44487) and close the connection.
    max_pending_resets: int = 100
    ping_interval: float = 10.0
    ping_timeout: float = 20.0


class GracefulH2Connection(H2Connection):
    """``H2Connection`` whose GOAWAY (sent or received) leaves existing streams usable."""

    def send_goaway(self, error_code: ErrorCodes, last_stream_id: int) -> None:
        frame = GoAwayFrame(stream_id=0)
        frame.last_stream_id = last_stream_id
        frame.error_code = error_code
        self._prepare_for_sending([frame])

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Event]]:
        event = ConnectionTerminated()
        event.error_code = _error_code_from_int(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


def new_connection(*, client_side: bool, settings: HboneSettings) -> GracefulH2Connection:
    """An HTTP/2 connection with HBONE's settings, preface and connection window queued."""
    conn = GracefulH2Connection(
        H2Configuration(
            client_side=client_side, header_encoding="utf-8", validate_inbound_headers=True
        )
    )
    conn.local_settings = Settings(
        client=client_side,
        initial_values={
            SettingCodes.INITIAL_WINDOW_SIZE: settings.stream_window,
            SettingCodes.MAX_FRAME_SIZE: settings.max_frame_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
            SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
            SettingCodes.ENABLE_PUSH: 0,
        },
    )
    # H2Connection copies these two from its settings in __init__, before ours replaced them.
    conn.max_inbound_frame_size = settings.max_frame_size
    conn.decoder.max_header_list_size = settings.max_header_list_size
    conn.initiate_connection()
    extra = settings.connection_window - conn.inbound_flow_control_window
    if extra > 0:
        conn.increment_flow_control_window(extra)
    return conn
