"""DATA on an HBONE connection without ``h2``: receive windows, WINDOW_UPDATEs, DATA framing.

The codec (``agent.proxy.hbone``) keeps ``h2`` for everything but DATA (why: see
``agent.proxy.h2data``). One owner per piece of state keeps the two consistent:

* ``h2`` owns the stream and connection state machines and the *send* windows: it applies the
  peer's WINDOW_UPDATEs and SETTINGS; ``send`` subtracts what it frames, which is all that
  ``h2``'s own ``send_data`` would do to an open or half-closed (remote) stream besides
  building the frame;
* ``DataFlow`` owns the *receive* windows: ``h2`` never sees a DATA frame with a payload (so its
  own receive windows never move and it never needs a WINDOW_UPDATE from us), and the
  WINDOW_UPDATE frames are written here. The connection window is replenished as DATA arrives;
  a stream's only as the owner consumes the bytes (plus padding, which nobody consumes).

Frames built here and frames ``h2`` produced leave in the order they were produced: ``h2``'s
pending output is moved into ours before each frame we append.

This reads and writes ``h2`` 4.x attributes that are not its documented API (a stream's
``state_machine.state`` and ``outbound_flow_control_window``, the connection's
``outbound_flow_control_window`` and ``incoming_buffer._headers_buffer``); ``pyproject.toml``
pins ``h2`` below 5 for this and for ``agent.proxy.h2wire``, and the unit tests against a plain
``h2`` peer (``tests/unit/proxy/test_hbone_fastpath.py``) fail if their meaning changes.
"""

from __future__ import annotations

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.stream import StreamState

from agent.proxy import h2data
from agent.proxy.h2wire import HboneSettings

# Where the peer may still send DATA (RFC 9113 section 5.1), and where we may.
RECEIVING = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)
SENDING = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)


class DataFlow:
    """Receive windows and DATA framing of one connection, on top of ``h2``'s stream states."""

    def __init__(self, h2conn: H2Connection, settings: HboneSettings, *, client_side: bool) -> None:
        self.h2 = h2conn
        self.settings = settings
        self.splitter = h2data.InboundSplitter(
            max_frame_size=settings.max_frame_size,
            preface=0 if client_side else h2data.CLIENT_PREFACE_SIZE,
        )
        self.deliver_to = 0  # stream of the DATA frame being received; 0: drop its bytes
        self._wire = bytearray()
        self._window = int(h2conn.inbound_flow_control_window)
        self._unacked = 0
        self._stream_window: dict[int, int] = {}
        self._stream_unacked: dict[int, int] = {}

    def data_to_send(self) -> bytes | bytearray:
        """Everything to write to the transport, in order (a fresh object on every call)."""
        pending = self.h2.data_to_send()
        wire = self._wire
        if not wire:
            return pending
        if pending:
            wire += pending
        self._wire = bytearray()
        return wire

    def emit(self, frame: bytes | bytearray | memoryview) -> None:
        """Append a frame we built, after the frames ``h2`` produced before it."""
        pending = self.h2.data_to_send()
        if pending:
            self._wire += pending
        self._wire += frame

    # ---- receiving -------------------------------------------------------------------------

    def start(self, stream_id: int, length: int, padding: int) -> tuple[ErrorCodes, str] | None:
        """A DATA frame's header arrived: charge the windows and decide whether its bytes are
        delivered (``deliver_to``). Returns the connection error to fail with, if any."""
        self._window -= length
        if self._window < 0:
            reason = f"peer sent DATA beyond the connection window (by {-self._window} bytes)"
            return ErrorCodes.FLOW_CONTROL_ERROR, reason
        if self.h2.incoming_buffer._headers_buffer:
            return ErrorCodes.PROTOCOL_ERROR, "DATA frame inside a header block"
        self._unacked += length
        if self._unacked >= self.settings.connection_window // 4:
            self.emit(h2data.window_update_frame(0, self._unacked))
            self._window += self._unacked
            self._unacked = 0
        stream = self.h2.streams.get(stream_id)
        if stream is None or stream.state_machine.state not in RECEIVING:
            self.deliver_to = 0  # h2 answers the empty DATA frame the codec feeds it instead
            return None
        window = self._stream_window.get(stream_id, self.settings.stream_window) - length
        if window < 0:
            reason = f"peer sent DATA beyond stream {stream_id}'s window (by {-window} bytes)"
            return ErrorCodes.FLOW_CONTROL_ERROR, reason
        self._stream_window[stream_id] = window
        self.deliver_to = stream_id
        self.consumed(stream_id, padding)
        return None

    def consumed(self, stream_id: int, n: int) -> None:
        """``n`` bytes of the stream were written onwards: WINDOW_UPDATE once a quarter is due."""
        if n <= 0:
            return
        total = self._stream_unacked.get(stream_id, 0) + n
        stream = self.h2.streams.get(stream_id)
        if stream is None or stream.state_machine.state not in RECEIVING:
            self.forget(stream_id)
            return
        if total >= self.settings.stream_window // 4:
            self.emit(h2data.window_update_frame(stream_id, total))
            window = self._stream_window.get(stream_id, self.settings.stream_window)
            self._stream_window[stream_id] = window + total
            total = 0
        self._stream_unacked[stream_id] = total

    def forget(self, stream_id: int) -> None:
        """The stream receives nothing more (peer's END_STREAM, reset, refused)."""
        self._stream_window.pop(stream_id, None)
        self._stream_unacked.pop(stream_id, None)
        if self.deliver_to == stream_id:
            self.deliver_to = 0  # the rest of a DATA frame in flight is dropped

    # ---- sending ---------------------------------------------------------------------------

    def send(self, stream_id: int, data: memoryview) -> int:
        """Frame as much of ``data`` as the peer's windows allow; returns how much that was."""
        h2c = self.h2
        stream = h2c.streams.get(stream_id)
        if stream is None or stream.state_machine.state not in SENDING:
            return 0
        total, sent = len(data), 0
        while sent < total:
            n = min(
                total - sent,
                h2c.outbound_flow_control_window,
                stream.outbound_flow_control_window,
                h2c.max_outbound_frame_size,
            )
            if n <= 0:
                break
            h2c.outbound_flow_control_window -= n
            stream.outbound_flow_control_window -= n
            self.emit(h2data.data_frame_header(n, stream_id))
            self._wire += data[sent : sent + n]
            sent += n
        return sent
