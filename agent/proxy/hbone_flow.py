"""DATA on an HBONE connection without ``h2``: receive windows, WINDOW_UPDATEs, DATA framing.

The codec (``agent.proxy.hbone``) keeps ``h2`` for everything but DATA (why: see
``agent.proxy.h2data``). One owner per piece of state keeps the two consistent:

* ``h2`` owns the stream and connection state machines and the *send* windows: it applies the
  peer's WINDOW_UPDATEs and SETTINGS; ``send`` subtracts what it frames, which is all that
  ``h2``'s own ``send_data`` would do to an open or half-closed (remote) stream besides
  building the frame;
* ``DataFlow`` owns the *receive* windows: ``h2`` never sees a DATA frame with a payload (so its
  own receive windows never move and it never needs a WINDOW_UPDATE from us), and the
  WINDOW_UPDATE frames are written here.

Why both windows are replenished only as the owner *consumes*: the connection window is the
receive half of the per-connection memory bound (``agent.proxy.hbone_limits``). Every byte
delivered to the owner is ``held`` until the owner gives it back with ``consumed`` (written to
the pod, or dropped with its stream), so a peer can never make us hold more than the connection
window, however many streams it opens and whether or not we answered them. A stream's window
is replenished the same way, and is smaller, so one stream whose pod does not read stalls
itself, not the connection. Bytes the codec drops itself (DATA for a stream that cannot take
it) and padding are given back at once.

How far the connection window opens: held plus promised (the open window) is topped up to a
*target* of one stream window per stream that may receive plus one for the next stream, at most
the connection window (``_retarget``), and every byte of it beyond HTTP/2's initial 65,535 comes
from the process's buffer budget (``agent.proxy.budget``): what every connection holds and
promises together stays within the budget plus 64 KiB per connection. An idle connection
promises nothing beyond that initial window; streams opening grant their share at once (so a
stalled stream still leaves the others flowing); consumed bytes are granted again once a
batch is due (a quarter of the connection window, at most half the target), as the budget
allows. Stream windows are not charged: every DATA
byte counts against the connection window too, which is the promise that bounds memory.

Frames built here and frames ``h2`` produced leave in the order they were produced: ``h2``'s
pending output is moved into ours before each frame we append. The stream states and send
windows are read and charged through ``agent.proxy.h2wire``, the one module that touches
``h2``'s non-public members.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from h2.connection import H2Connection
from h2.errors import ErrorCodes

from agent.proxy import h2data, h2wire
from agent.proxy.budget import FLOOR, HboneBudget
from agent.proxy.h2wire import HboneSettings

_pack_header = h2data.FRAME_HEADER.pack  # a DATA frame's header (``DataFlow.send``)


class DataFlow:
    """Receive windows and DATA framing of one connection, on top of ``h2``'s stream states."""

    def __init__(
        self,
        h2conn: H2Connection,
        settings: HboneSettings,
        *,
        client_side: bool,
        budget: HboneBudget | None = None,
    ) -> None:
        self.h2 = h2conn
        self.settings = settings
        self.splitter = h2data.InboundSplitter(
            max_frame_size=settings.max_frame_size,
            preface=0 if client_side else h2data.CLIENT_PREFACE_SIZE,
            max_control_frame=settings.max_control_frame,
            max_header_block=settings.max_header_block,
        )
        self.deliver_to = 0  # stream of the DATA frame being received; 0: drop its bytes
        self.counted = 0  # stream whose DATA frame's bytes were counted as held by ``start``
        self.held = 0  # bytes delivered to the owner and not yet given back with ``consumed``
        self._wire = bytearray()
        # The connection window: HTTP/2's initial one until a stream opens (``_grant``).
        self._window = FLOOR
        self._target = 0  # what ``_grant`` tops held + window up to
        self._batch = 0  # grants wait until this much is wanted (``_retarget``)
        self._budget = budget if budget is not None else HboneBudget(None)
        self._account = self._budget.open(self)
        # A connection dropped without ``close_budget`` (its TLS handshake failed, say) still
        # gives its charge back.
        self._give_back = weakref.finalize(self, self._account.close)
        # The owner's call-back (``on_budget_room``), held weakly: the owner holds this flow.
        self._on_room: weakref.WeakMethod[Callable[[], bool]] | None = None
        self._stream_window: dict[int, int] = {}
        # A stream's window is given back once a quarter of it is due (``_stream_credit``).
        self._credit_at = settings.stream_window // 4
        self._stream_unacked: dict[int, int] = {}
        self._stream_held: dict[int, int] = {}

    def data_to_send(self) -> bytes | bytearray:
        """Everything to write to the transport, in order (a fresh object on every call)."""
        wire = self._wire
        if not wire:
            return h2wire.take_output(self.h2)
        h2wire.move_output(self.h2, wire)
        self._wire = bytearray()
        return wire

    def take_h2_output(self) -> int:
        """Move what ``h2`` queued into ours; returns how many bytes that was."""
        return h2wire.move_output(self.h2, self._wire)

    def emit(self, frame: bytes | bytearray | memoryview) -> None:
        """Append a frame we built, after the frames ``h2`` produced before it."""
        self.take_h2_output()
        self._wire += frame

    def unsent(self) -> int:
        """Bytes queued here for the transport (``data_to_send`` not yet called)."""
        return len(self._wire)

    # ---- receiving -------------------------------------------------------------------------

    def start(self, stream_id: int, length: int, padding: int) -> tuple[ErrorCodes, str] | None:
        """A DATA frame's header arrived: charge the windows and decide whether its bytes are
        delivered (``deliver_to``). Returns the connection error to fail with, if any."""
        self._window -= length
        if self._window < 0:
            reason = f"peer sent DATA beyond the connection window (by {-self._window} bytes)"
            return ErrorCodes.FLOW_CONTROL_ERROR, reason
        if not h2wire.can_receive(self.h2, stream_id):
            self.deliver_to = 0  # h2 answers the empty DATA frame the codec feeds it instead
            self._dropped(length)
            return None
        window = self._stream_window.get(stream_id)
        if window is None:  # a stream that receives without ``stream_opened``
            window = self.settings.stream_window
            self._stream_window[stream_id] = window
            self._retarget()
        window -= length
        if window < 0:
            reason = f"peer sent DATA beyond stream {stream_id}'s window (by {-window} bytes)"
            return ErrorCodes.FLOW_CONTROL_ERROR, reason
        self._stream_window[stream_id] = window
        self.deliver_to = self.counted = stream_id
        data = length - padding
        self._stream_held[stream_id] = self._stream_held.get(stream_id, 0) + data
        self.held += data
        if padding:
            self._dropped(padding)
            self._stream_credit(stream_id, padding)
        return None

    def take_single(self, data: bytes) -> int:
        """``data`` as one whole DATA frame for a stream that may receive it within both
        windows (``InboundSplitter.single_data``): charged as ``start`` charges it and its
        payload (``data[HEADER_SIZE:]``) to be delivered; returns the stream id. 0: anything
        else (a window exceeded, a stream that cannot take it, a frame that is not alone in
        ``data``), left untouched for the splitter's path, which decides and fails as before.
        The state afterwards is what ``start``, the chunk and the frame's end leave."""
        stream_id = self.splitter.single_data(data)
        if not stream_id:
            return 0
        length = len(data) - h2data.HEADER_SIZE
        windows = self._stream_window
        window = windows.get(stream_id, -1)
        if length > window or length > self._window or not h2wire.can_receive(self.h2, stream_id):
            return 0  # (-1: a stream that receives without ``stream_opened``: ``start``'s)
        self._window -= length
        windows[stream_id] = window - length
        held = self._stream_held
        held[stream_id] = held.get(stream_id, 0) + length
        self.held += length
        return stream_id

    def consumed(self, stream_id: int, n: int) -> None:
        """The owner is done with ``n`` delivered bytes of the stream: give them back to the
        budget, and grant the connection and the stream that much again once a batch (the
        connection: ``_retarget``) or a quarter of the window (the stream) is due."""
        # Locals and no ``min``: this runs for every message delivered.
        stream_held = self._stream_held
        held = stream_held.get(stream_id, 0)
        if n >= held:  # all of it: n = min(n, held)
            if held <= 0:
                return
            n = held
            del stream_held[stream_id]
        elif n > 0:
            stream_held[stream_id] = held - n
        else:
            return
        self.held -= n
        self._account.give_back(n)
        if self._target - self._window - self.held >= self._batch:
            self._grant()
        # ``_stream_credit``, inlined.
        if not h2wire.can_receive(self.h2, stream_id):
            self.forget(stream_id)
            return
        unacked = self._stream_unacked
        total = unacked.get(stream_id, 0) + n
        if total >= self._credit_at:
            self._stream_update(stream_id, total)
            total = 0
        unacked[stream_id] = total

    def release(self, stream_id: int) -> None:
        """The owner is done with the stream and drops whatever it still holds of it (a chunk a
        relay took with ``read`` and failed to write onwards, say): those bytes go back to the
        connection window. Without this each such failure shrank the connection window for good,
        and enough of them stalled every stream of the connection."""
        held = self._stream_held.get(stream_id, 0)
        if held:
            self.consumed(stream_id, held)

    def stream_opened(self, stream_id: int) -> None:
        """A stream that will receive (client: CONNECT sent; server: 200 sent): the target
        grows by a stream window, granted now if a batch is due. So a
        connection grants as its concurrency first reaches 1, 2 and 3 streams, and a pooled
        connection's later streams come and go without a WINDOW_UPDATE each (the window they
        left open is still promised)."""
        if stream_id not in self._stream_window:
            self._stream_window[stream_id] = self.settings.stream_window
            self._retarget()
            if self._target - self._window - self.held >= self._batch:
                self._grant()

    def on_budget_room(self, callback: Callable[[], bool]) -> None:
        """Let a grant refused or cut short while the budget is used up wait for freed budget:
        ``callback``, a bound method of the owner, is called (from inside another connection's
        accounting: it must only schedule ``regrant``) when it is this connection's turn
        (``budget.HboneBudget``), and answers whether it did (False: closing, skip it). Only
        stored here: the account gets its call-back when a grant first falls short
        (``_wait_for_budget``), so a connection that never meets an exhausted budget pays
        one attribute for it.

        Held weakly: the owner holds this flow, so a strong reference back made a cycle, and
        an owner dropped without ``close_budget`` (its TLS handshake failed, say) kept its
        charge and its place in the budget's FIFO until the garbage collector found the cycle.
        Now it goes with its last reference, and its finalizer closes the account."""
        self._on_room = weakref.WeakMethod(callback)

    def _wait_for_budget(self) -> None:
        """A grant fell short for the first time: give the account its call-back and wait.

        The account reaches this connection only weakly: the finalizer holds the account, so a
        strong reference from it would keep a dropped connection (and its charge) alive."""
        ref = weakref.ref(self)

        def room() -> bool:
            flow = ref()
            callback = flow._on_room() if flow is not None and flow._on_room is not None else None
            return callback is not None and callback()

        self._account.on_room = room
        self._account.wait()

    def regrant(self) -> None:
        """Freed budget is this connection's turn: grant what the target still wants (or pass
        the turn on if it wants nothing now). Called by the owner, scheduled by the call-back."""
        want = self._target - self._window - self.held
        n = self._account.take(want if want > 0 else 0)
        if n < want and self._account.on_room is None and self._on_room is not None:
            self._wait_for_budget()
        if n:
            self.emit(h2data.window_update_frame(0, n))
            self._window += n

    @property
    def budget(self) -> HboneBudget:
        return self._budget

    @property
    def promised(self) -> int:
        """What the peer may still send on this connection without a WINDOW_UPDATE."""
        return self._window

    def close_budget(self) -> None:
        """The connection is gone: everything it was charged goes back to the budget. Bytes the
        owner consumes later are not given back twice."""
        self._give_back()  # Account.close, once; the finalizer is spent
        self._budget.discard(self)

    def _dropped(self, n: int) -> None:
        """``n`` bytes of the connection window arrived that nobody will hold (padding, DATA
        for a stream that cannot take it)."""
        self._account.give_back(n)
        if self._target - self._window - self.held >= self._batch:
            self._grant()

    def _retarget(self) -> None:
        """What the connection's held + promised bytes are topped up to: a stream window per
        stream that may receive plus one for the next stream, at most the connection window.
        So an idle connection promises nothing beyond HTTP/2's initial window, one bulk stream
        two stream windows, and a stalled stream (which holds at most its stream window) never
        stalls the others; with four or more streams it is the connection window, as before."""
        n = len(self._stream_window)
        s = self.settings
        self._target = min(s.connection_window, s.stream_window * (n + 1)) if n else 0
        # A quarter of the connection window, as before the budget, but at most half the
        # target: what stays open is then at least the streams' own windows, so the
        # connection window never binds before they do (and one bulk stream costs no more
        # WINDOW_UPDATEs than it did).
        self._batch = min(s.connection_window >> 2, self._target >> 1)

    def _grant(self) -> None:
        """WINDOW_UPDATE on the connection for what the target wants, as far as the budget
        allows (``budget.Account.take``: withheld when exhausted, but never below the floor)."""
        want = self._target - self._window - self.held
        if want <= 0:
            return
        n = self._account.take(want)
        if n < want and self._account.on_room is None and self._on_room is not None:
            self._wait_for_budget()
        if n:
            self.emit(h2data.window_update_frame(0, n))
            self._window += n

    def _stream_credit(self, stream_id: int, n: int) -> None:
        if not h2wire.can_receive(self.h2, stream_id):
            self.forget(stream_id)
            return
        total = self._stream_unacked.get(stream_id, 0) + n
        if total >= self._credit_at:
            self._stream_update(stream_id, total)
            total = 0
        self._stream_unacked[stream_id] = total

    def _stream_update(self, stream_id: int, n: int) -> None:
        """WINDOW_UPDATE of ``n`` on the stream."""
        self.emit(h2data.window_update_frame(stream_id, n))
        window = self._stream_window.get(stream_id, self.settings.stream_window)
        self._stream_window[stream_id] = window + n

    def forget(self, stream_id: int) -> None:
        """The stream receives nothing more (peer's END_STREAM, reset, refused). What the owner
        still holds of it stays counted until it is ``consumed``."""
        if self._stream_window.pop(stream_id, None) is not None:
            self._retarget()
        self._stream_unacked.pop(stream_id, None)
        if self.deliver_to == stream_id:
            self.deliver_to = 0  # the rest of a DATA frame in flight is dropped

    # ---- sending ---------------------------------------------------------------------------

    def send(self, stream_id: int, data: memoryview) -> int:
        """Frame as much of ``data`` as the peer's windows allow; returns how much that was."""
        h2c = self.h2
        total, sent = len(data), 0
        wire = self._wire
        while sent < total:
            most = total - sent
            if most > h2c.max_outbound_frame_size:
                most = h2c.max_outbound_frame_size
            n = h2wire.take_send_window(h2c, stream_id, most)
            if not n:
                break
            # ``emit(data_frame_header(n, stream_id))``, inlined (a frame per relayed message):
            # h2's output first, then the header (type DATA is 0: the length alone) and the
            # payload.
            h2wire.move_output(h2c, wire)
            wire += _pack_header(n << 8, 0, stream_id)
            wire += data if n == total else data[sent : sent + n]
            sent += n
        return sent
