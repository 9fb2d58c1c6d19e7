"""The asyncio side of an HBONE connection: a Protocol driving the codec, and per-stream handles.

``HboneProtocol`` sits on a TLS transport (client or server side), feeds it to
``agent.proxy.hbone.HboneConnection`` and dispatches the events to ``TunnelStream`` objects. A
``TunnelStream`` looks like a socket to the relay: ``read()``/``consumed()`` in one direction,
``write()``/``write_eof()`` in the other.

Backpressure: ``write`` waits, before it queues anything, while the stream has more than
``HIGH_WATER`` bytes queued in the codec (the peer's window is closed), while the TLS transport's
buffer is full (``pause_writing``), or while the connection holds more than ``OUT_BUDGET``
outgoing bytes in all, so a slow receiver slows exactly its own sender and a peer that grants
windows but does not read cannot make a hundred streams queue a relay read each; and, across
connections, while the process's outgoing queue budget is used up and this connection holds
more than its floor (``agent.proxy.budget.QueueBudget``: every change to what the connection
holds for its peer is charged to it), so a peer that does not read cannot make all its
connections hold their cap each. A relay whose stream may not write stops reading its socket:
the pod is slowed by TCP, nothing is dropped or reordered. Received data
is queued per stream and given back to the codec (``consumed``) when the relay wrote it to the
pod, or when the stream is dropped with data still queued: the codec's windows bound that queue.
``held_bytes`` is the connection's memory accounting (``agent.proxy.hbone_limits``).

Direct delivery: a relay that copies a stream to a socket registers that socket
(``deliver_directly``). While nothing is queued, received bytes are sent to the socket from
``data_received`` itself (non-blocking ``send``); what the kernel does not take is queued, and
the relay (``agent.proxy.relay``, driven by callbacks: the stream's ``waker`` tells it of every
change) writes the queue when the socket is writable (``write_queued``). A task-based reader
may use ``read`` instead: once ``read`` has handed out a chunk, the reader may still be
writing it, so nothing is sent directly until it asks for the next one: bytes never overtake.
The HTTP/1.1 shell registers itself the same way (a ``Sink``: it parses what it takes), and
answers with ``write_some`` (or ``try_write``), the part of ``write`` that never waits.

Every write into a stream adds at most ``write_room`` at a time, whoever writes: the relay
reads its socket only that far, ``write_some`` and ``try_write`` take only that much of a
message (the caller's outbox keeps the rest and stops reading its source), and ``write``
writes a long message in such pieces, waiting for room between them. So the queue budget's
bound (``agent.proxy.budget.QueueBudget``) holds for the HTTP shells and for tasks as it does
for the relay.

Keepalive (both sides): a PING every ``ping_interval``; a connection whose PING goes unanswered
for ``ping_timeout`` is closed, like ztunnel's, so a dead peer does not hold pooled streams
forever, and a peer that stops reading does not hold an inbound connection forever.

Control replies: whenever the transport takes what the codec produced without crossing its
high-water mark, the protocol tells the codec (``output_accepted``), so only replies the peer
leaves unread count against its ``max_unsent_replies``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

from h2.errors import ErrorCodes

from agent.identity.tls import PeerIdentityError, peer_spiffe_id
from agent.proxy import hbone_events as ev
from agent.proxy.budget import QUEUE_FLOOR, QueueAccount
from agent.proxy.h2data import HEADER_SIZE
from agent.proxy.hbone import HboneConnection
from agent.proxy.hbone_limits import MAX_WRITE, OUT_BUDGET, REFUSALS, TRANSPORT_HIGH_WATER

log = logging.getLogger(__name__)

HIGH_WATER = 128 * 1024
FAILED_LINGER = 5.0  # seconds a failed connection may take to flush its GOAWAY


class TunnelError(ConnectionError):
    """The tunnel could not be opened or was reset; ``status`` is the HTTP status if any.
    ``unprocessed``: the peer never acted on the CONNECT (REFUSED_STREAM, or above a GOAWAY's
    last stream id, RFC 9113 section 8.7), so opening it again elsewhere is safe."""

    def __init__(self, message: str, status: int = 0, *, unprocessed: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.unprocessed = unprocessed


class Sink(Protocol):
    """Takes received bytes without blocking (``deliver_directly``): how many it took; what it
    did not take is queued for ``read`` as usual. It must not raise."""

    def send(self, data: bytes, /) -> int: ...


class Waker(Protocol):
    """A relay driven by callbacks instead of tasks (``agent.proxy.relay``): one object, told
    of the stream's changes and of the bytes sent to its socket, rather than a bound method for
    each kept for the stream's life."""

    def stream_changed(self) -> None:
        """A task waiting in ``read`` or ``write`` would be woken now (bytes queued, the peer's
        end, an error, room to write again): look at the stream's state."""

    def delivered(self, n: int, /) -> None:
        """``n`` received bytes were sent to the socket given to ``deliver_directly`` (there or
        by ``write_queued``)."""


class TunnelStream:
    """One CONNECT stream, seen from the relay.

    It lives as long as its proxied connection, idle or not, so an idle one holds little: no
    receive queue (made when bytes must wait, dropped when it empties again), no Events (a
    future exists only while a task waits in ``read`` or ``write``), slots instead of a dict.
    """

    __slots__ = (
        "_chunks",
        "_read_waiter",
        "_relay_writing",
        "_sink",
        "_write_waiter",
        "accepted",
        "ended",
        "eof",
        "error",
        "on_drop",
        "on_end",
        "proto",
        "stream_id",
        "waker",
    )

    def __init__(self, proto: HboneProtocol, stream_id: int, *, opening: bool = False) -> None:
        self.proto = proto
        self.stream_id = stream_id
        # The peer's answer to a CONNECT we sent: only while ``HboneProtocol.open`` waits for it
        # (an idle stream does not keep a future for its whole life).
        self.accepted: asyncio.Future[None] | None = proto.loop.create_future() if opening else None
        self._chunks: deque[bytes] | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self.eof = False  # the peer ended its half (END_STREAM received)
        self.ended = False  # we ended ours (write_eof)
        self.error: TunnelError | None = None
        self._sink: socket.socket | Sink | None = None
        self._relay_writing = False  # read() handed out a chunk that may not be written yet
        # Called when the peer resets the stream or the connection goes (server side: cancels
        # the handler of a request not answered yet, so it stops connecting for nobody).
        self.on_drop: Callable[[], object] | None = None
        # Called when the peer ends its half: a ``Sink`` is given bytes only, so an owner with
        # no task waiting in ``read`` learns of the end here (the source's HTTP/1.1 shell).
        self.on_end: Callable[[], object] | None = None
        # The relay driven by callbacks, if one copies this stream (see ``Waker``).
        self.waker: Waker | None = None

    # -- events from the protocol --
    def _on_data(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None and not (self._chunks or self._relay_writing):
            try:
                sent = sink.send(data)
            except OSError:  # would block, or the socket failed: the relay's send will tell
                sent = 0
            if sent:
                self.proto.codec.consumed(self.stream_id, sent)  # flushed by data_received
                waker = self.waker
                if waker is not None:
                    waker.delivered(sent)
                if sent == len(data):
                    return
                data = data[sent:]
        if self._chunks is None:
            self._chunks = deque()
        self._chunks.append(data)
        _wake(self._read_waiter)
        if self.waker is not None:
            self.waker.stream_changed()

    def _on_end(self) -> None:
        self.eof = True
        _wake(self._read_waiter)
        if self.on_end is not None:
            self.on_end()
        if self.waker is not None:
            self.waker.stream_changed()

    def _on_writable(self) -> None:
        _wake(self._write_waiter)
        if self.waker is not None:
            self.waker.stream_changed()

    @property
    def opening(self) -> bool:
        """A CONNECT we sent that the peer has not answered yet."""
        return self.accepted is not None and not self.accepted.done()

    @property
    def complete(self) -> bool:
        """Both halves ended without error: the stream closed cleanly, nothing to reset."""
        return self.eof and self.ended and self.error is None

    def _on_error(self, error: TunnelError) -> None:
        """The stream failed. What the peer sent before ending its half (``eof``) stays to be
        read, then its end: a reset after that ends only our half (RFC 9113 8.1: a response
        is not discarded for a reset after its END_STREAM). Why: a destination answers a
        response delimited by the pod's close with END_STREAM and then resets the stream the
        source still sends on; the source dropped the body it had not read yet and the end
        that delimits it, so its client got a cut response (a chunked one without its last
        chunk). The bytes kept are given back to the connection's flow control at once, as
        discarded ones are."""
        self.error = error
        if self.eof:
            if self._chunks:
                self.proto.codec.consumed(self.stream_id, sum(map(len, self._chunks)))
                self.proto.flush()
        else:
            self._discard()
        if self.accepted is not None and not self.accepted.done():
            self.accepted.set_exception(error)
            self.accepted.exception()  # whoever awaits it still gets the error; nobody must
        _wake(self._read_waiter)
        _wake(self._write_waiter)
        if self.waker is not None:
            self.waker.stream_changed()

    def _discard(self) -> None:
        """Drop what the relay has not read (the stream failed): the codec gets it back."""
        if self._chunks:
            self.proto.codec.consumed(self.stream_id, sum(map(len, self._chunks)))
            self.proto.flush()
        self._chunks = None

    # -- what the relay calls --
    def deliver_directly(self, sock: socket.socket | Sink | None) -> None:
        """Send received bytes straight to ``sock`` when possible (see the module docstring);
        the ``waker``, if any, counts them (``Waker.delivered``). ``None`` stops it (before
        the socket is closed). A ``Sink`` that is not a socket takes bytes the same way (the
        HTTP/1.1 shell parses them there). Register with no reader inside ``read`` or writing
        what it returned (a reader that stopped, like the source shell's between requests, no
        longer holds a chunk back)."""
        if isinstance(sock, socket.socket) and sock.gettimeout() != 0.0:
            raise ValueError(
                "direct delivery needs a non-blocking socket: "
                "a blocking send would stall the event loop (call setblocking(False) first)"
            )
        self._sink = sock
        if sock is not None:
            self._relay_writing = False

    async def read(self) -> bytes | None:
        """The next chunk, or None once the peer half-closed; raises if the stream was reset."""
        self._relay_writing = False
        while not self._chunks:
            if self.eof:  # before an error: a reset after the peer's end cuts nothing it sent
                return None
            if self.error:
                raise self.error
            self._read_waiter = self.proto.loop.create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        self._relay_writing = True
        chunk = self._chunks.popleft()
        if not self._chunks:
            self._chunks = None
        return chunk

    @property
    def unread(self) -> bool:
        """Bytes, the peer's end or an error wait for ``read``."""
        return bool(self._chunks) or self.eof or self.error is not None

    def consumed(self, n: int) -> None:
        self.proto.codec.consumed(self.stream_id, n)
        self.proto.flush()

    def write_queued(self, send: Callable[[bytes], int]) -> bool:
        """Hand the queued chunks to ``send`` (non-blocking: returns how many bytes it took)
        until it takes less than offered; what it took is given back to the codec. True once
        nothing is queued. For a relay driven by callbacks: it calls this when its socket is
        writable, instead of a task awaiting ``read``."""
        chunks = self._chunks
        taken = 0
        try:
            while chunks:
                chunk = chunks[0]
                n = send(chunk)
                taken += n
                if n < len(chunk):
                    chunks[0] = chunk[n:]
                    return False
                chunks.popleft()
            self._chunks = None
            return True
        finally:
            if taken:
                self.consumed(taken)
                if self.waker is not None:
                    self.waker.delivered(taken)

    def can_write(self) -> bool:
        """No backpressure applies: a write now would not wait (see the module docstring)."""
        proto = self.proto
        codec = proto.codec
        return not (
            self.error
            # ``buffered`` is never above ``queued``: asked only when something waits at all
            or (codec.queued > HIGH_WATER and codec.buffered(self.stream_id) > HIGH_WATER)
            or proto.out_full()
        )

    def write_room(self) -> int:
        """How much one write may add now, for a relay that reads its socket only that far:
        0 when a write would wait (``can_write``); ``MAX_WRITE`` while the process's queue
        budget has room; ``QUEUE_FLOOR`` while the connection is let through on its floor only,
        so that beyond the budget it never holds more than twice its floor
        (``agent.proxy.budget.QueueBudget``)."""
        proto = self.proto
        codec = proto.codec
        if (
            self.error
            or (codec.queued > HIGH_WATER and codec.buffered(self.stream_id) > HIGH_WATER)
            or proto.out_full()
        ):
            return 0  # ``can_write``, inlined: this is asked before every relay read
        queue = proto.queue_budget
        if queue.limit is None or queue.committed <= queue.limit:
            return MAX_WRITE
        return QUEUE_FLOOR

    def try_write(self, data: bytes | memoryview) -> int:
        """Write now as much of ``data`` as one write may add (``write_room``); how many bytes
        that was (0: none; the caller awaits ``write`` for the rest). For callers that have
        a whole message in hand and would otherwise wake a task per message (the HTTP shells,
        writing from socket callbacks): a message longer than the room is cut there, so their
        writes add no more to the queues than a relay's read does and the queue budget's bound
        holds for them too (``agent.proxy.budget.QueueBudget``). Flushed with the other
        streams' writes at the end of this pass of the loop (``flush_soon``)."""
        room = self.write_room()
        if not room:
            return 0
        n = len(data)
        if n > room:
            data, n = memoryview(data)[:room], room
        self._send(data)
        self.proto.flush_soon()
        return n

    def write_some(self, data: bytes | memoryview) -> int:
        """``try_write``, handed to the transport as ``write_now`` does (now, when this is the
        connection's only stream): the HTTP shells' write of a message from a socket
        callback, which writes once per callback. ``write_room``'s questions are asked inline
        (a write per message is the hot path: it makes the calls ``can_write`` and
        ``write_now`` made before, and one ``len``)."""
        proto = self.proto
        codec = proto.codec
        if (
            self.error
            or (codec.queued > HIGH_WATER and codec.buffered(self.stream_id) > HIGH_WATER)
            or proto.out_full()
        ):
            return 0
        n = len(data)
        if n > QUEUE_FLOOR:  # the room is at least this: most messages need not ask further
            queue = proto.queue_budget
            within = queue.limit is None or queue.committed <= queue.limit
            room = MAX_WRITE if within else QUEUE_FLOOR
            if n > room:
                data, n = memoryview(data)[:room], room
        self.write_now(data)
        return n

    def write_now(self, data: bytes | memoryview) -> None:
        """The relay's write: it asked ``can_write`` in this same callback and got True (it
        asks before it reads, so nothing changed in between: not asked twice per message), and
        it writes once per callback. So on a connection whose only stream this is, nothing else
        can join the record in this pass of the loop and it goes to the transport now, without
        a callback scheduled per message (``flush_soon``); with other streams, as theirs."""
        proto = self.proto
        if len(proto.streams) == 1:
            events = proto.codec.send(self.stream_id, data)
            if events:
                proto.dispatch(events)
            proto.flush_and_wake()  # charges the queue budget what the connection holds now
        else:
            self._send(data)
            proto.flush_soon()

    def _send(self, data: bytes | memoryview) -> None:
        proto = self.proto
        events = proto.codec.send(self.stream_id, data)
        proto.charge_sent()  # before any other connection asks the queue budget
        if events:  # only when bytes had to queue (``StreamDrained``): not per message
            proto.dispatch(events)

    async def write(self, data: bytes | memoryview) -> None:
        """Write all of ``data``, waiting for room as often as needed: in pieces of at most
        ``write_room`` each, so a task writing a whole message (an HTTP body, a mirror's copy)
        adds no more to the queues at a time than a relay's read does, and waits, as the
        relay stops reading, while the queue budget is used up."""
        proto = self.proto
        while True:
            room = self.write_room()
            if room:
                if len(data) <= room:
                    self._send(data)
                    proto.flush_soon()
                    return
                view = memoryview(data)
                self._send(view[:room])
                proto.flush_soon()
                data = view[room:]
                continue
            if self.error:
                raise self.error
            proto.writers_waiting = True
            self._write_waiter = proto.loop.create_future()
            try:
                await self._write_waiter
            finally:
                self._write_waiter = None

    def write_eof(self) -> None:
        if not self.error:
            self.ended = True
            self.proto.dispatch(self.proto.codec.end_stream(self.stream_id))
            self.proto.flush_soon()

    def reset(self) -> None:
        if not self.error:
            self.proto.codec.reset(self.stream_id)
        self.proto.streams.pop(self.stream_id, None)
        self._on_error(TunnelError("stream reset locally"))
        self.proto.codec.release(self.stream_id)
        self.proto.flush()


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


OnRequest = Callable[["HboneProtocol", ev.TunnelRequested], None]


class HboneProtocol(asyncio.Protocol):
    """Drives one HBONE connection; ``on_request`` (server side) gets each CONNECT."""

    def __init__(
        self,
        codec: HboneConnection,
        *,
        on_request: OnRequest | None = None,
        on_idle: Callable[[HboneProtocol], None] | None = None,
    ) -> None:
        self.codec = codec
        self.on_request = on_request
        self.on_idle = on_idle
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, TunnelStream] = {}
        # The loop, looked up once: ``asyncio.get_running_loop()`` costs a ``getpid`` system call
        # on Python 3.11 (it checks the loop was not inherited across a fork), and ``flush_soon``
        # ran it for every message written to the tunnel (docs/performance/round-trip.md).
        self.loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.write_paused = False
        self.writers_waiting = False  # some write() waits (woken on drain or freed budget)
        self._ping_outstanding: bytes | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        # The peer certificate's SPIFFE ID (or why it has none): read once per connection, not
        # per stream (``getpeercert`` decodes the whole certificate each time).
        self._peer_id: str | PeerIdentityError | None = None
        self._flush_scheduled = False  # a ``flush_soon`` is pending
        # What this connection holds for its peer, charged to the process's queue budget.
        self.queue_budget = codec.budget.queue
        # Opened with the transport (``connection_made``; closed by ``connection_lost``), so a
        # connection whose handshake failed is never counted.
        self._queue = QueueAccount(None, None)
        self._transport_size = 0  # the transport's buffer when ``recharge`` last asked
        self._room_scheduled = False
        self._regrant_scheduled = False
        # A receive-window grant the exhausted buffer budget refused waits for freed budget.
        codec.on_budget_room(self._budget_room)

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=TRANSPORT_HIGH_WATER)
        self._queue = self.queue_budget.open(self._queue_room)
        self.flush()

    def data_received(self, data: bytes) -> None:
        codec = self.codec
        stream_id = codec.take_data_frame(data)
        if stream_id:
            # One whole DATA frame, the read of every relayed message: to its stream without
            # an event, ``receive``'s loop or ``dispatch`` (``dispatch``'s first branch, inlined:
            # ``test_rr_counts`` bounds the calls per message).
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream._on_data(data[HEADER_SIZE:])
            else:  # nobody will read it: the window gets it back
                codec.consumed(stream_id, len(data) - HEADER_SIZE)
            # Only the bytes given back can have made output here (WINDOW_UPDATEs, framed
            # with whatever ``h2`` held before them), and the queue's charge changes only with
            # output or queued bytes: ``flush`` has nothing to do otherwise. (``h2`` makes no
            # output for this frame, and every command that makes some is followed by a
            # ``flush`` or ``flush_soon`` of its own.)
            if codec.unsent() or codec.queued:
                self.flush()
        else:
            self.dispatch(codec.receive_frames(data))
            self.flush()
        if self.writers_waiting and not self.out_full():
            # WINDOW_UPDATEs let queued bytes out without draining any stream completely
            # (no StreamDrained): writers waiting for the connection's budget go on.
            self.writers_waiting = False
            self._wake_writers()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.codec.output_accepted()
        self.recharge()  # the transport drained: the queue budget gets it back
        self._wake_writers()

    def _wake_writers(self) -> None:
        for stream in list(self.streams.values()):
            stream._on_writable()

    def out_full(self) -> bool:
        """Writers wait: the transport is paused, the connection holds ``OUT_BUDGET``, or the
        process's queue budget is used up and this connection holds more than its floor
        (``QueueAccount.may_grow``: it is called back when the budget has room)."""
        if self.write_paused:
            return True
        # ``recharge``, inlined: this is asked before every relay read.
        transport, codec = self.transport, self.codec
        size = transport.get_write_buffer_size() if transport is not None else 0
        self._transport_size = size
        out = codec.queued + codec.unsent() + size
        queue = self._queue
        if out != queue.charge:
            queue.set(out)
        return out > OUT_BUDGET or (out > QUEUE_FLOOR and not queue.may_grow())

    def recharge(self) -> int:
        """Charge the queue budget what the connection holds for its peer now (queued for
        windows, framed, in the transport's buffer), and return it. Called whenever the
        transport's buffer may have grown (a flush that wrote) or its drain matters (a
        resumed transport, a writer asking ``out_full``)."""
        size = self.transport.get_write_buffer_size() if self.transport is not None else 0
        self._transport_size = size
        out = self.codec.queued + self.codec.unsent() + size
        if out != self._queue.charge:  # mostly 0 both: a transport that keeps up
            self._queue.set(out)
        return out

    def charge_sent(self) -> None:
        """``recharge`` after the codec took a write: only the codec's part changed, and the
        transport holds no more than when it was last asked (it only drains on its own), so
        its size is not asked again (a write per message is the hot path)."""
        self._queue.set(self.codec.queued + self.codec.unsent() + self._transport_size)

    def _queue_room(self) -> None:
        """The queue budget has room again (called from inside ``QueueAccount.set`` of any
        connection): wake the writers on the next pass of the loop, not from inside it."""
        if not self._room_scheduled:
            self._room_scheduled = True
            self.loop.call_soon(self._wake_for_room)

    def _wake_for_room(self) -> None:
        self._room_scheduled = False
        if self.transport is not None and not self.transport.is_closing():
            self.writers_waiting = False
            self._wake_writers()

    def _budget_room(self) -> bool:
        """Freed receive budget is this connection's turn (called from inside another
        connection's accounting, ``budget.Account``): take it on the next pass of the loop.
        False, and nothing scheduled, when there is no connection to take it for (closing, or
        lost, or never made): the budget skips it and the next waiter's turn comes now, not
        after this one's ``connection_lost`` closed its account."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if not self._regrant_scheduled:
            self._regrant_scheduled = True
            self.loop.call_soon(self._regrant)
        return True

    def _regrant(self) -> None:
        # Also on a closing connection: taking (or passing) the turn is what lets the next
        # waiter go; ``connection_lost`` gives the grant back.
        self._regrant_scheduled = False
        self.codec.regrant()
        self.flush()

    def held_bytes(self) -> int:
        """What the peer makes this connection hold: the codec's accounting plus the TLS
        transport's write buffer."""
        size = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return self.codec.held_bytes() + size

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ping_timer:
            self._ping_timer.cancel()
        error = TunnelError(f"HBONE connection lost: {exc or 'closed by peer'}")
        for stream in list(self.streams.values()):
            stream._on_error(error)
            if stream.on_drop is not None:
                stream.on_drop()
        self.streams.clear()
        self.codec.close_budget()  # after the streams gave back what they had queued
        self._queue.close()
        if not self.closed.done():
            self.closed.set_result(None)

    # -- plumbing --
    def flush(self) -> None:
        """Hand the codec's output to the transport, and charge the queue budget what the
        connection holds now if that may have changed."""
        codec, transport = self.codec, self.transport  # locals: a flush per message
        out = codec.data_to_send()
        if out and transport is not None and not transport.is_closing():
            transport.write(out)
            if not self.write_paused:
                codec.output_accepted()
        if codec.failed and transport is not None and not transport.is_closing():
            self._close_failed()
        if out or codec.queued:
            # Framed bytes moved to the transport, which may have sent them, or a write queued
            # for closed windows: what the connection holds may have changed. (Bytes of a
            # stream the peer reset leave the queue without output: charged until the
            # connection next flushes or writes; too much, never too little.) ``recharge``
            # inlined (a flush per message): nothing is left unsent after ``data_to_send``.
            size = transport.get_write_buffer_size() if transport is not None else 0
            self._transport_size = size
            held = codec.queued + size
            queue = self._queue
            if held != queue.charge:
                queue.set(held)

    def flush_soon(self) -> None:
        """``flush`` once the loop has run the callbacks that are ready now: what the relays of
        several streams write in one pass of the loop (each after its socket's read) goes out
        in one TLS record and one ``send`` instead of one each. Each record and send costs the
        TLS sealing and a trip through the kernel's TCP path (the peer's receive processing
        included when the peer is on the same host): the largest item of a new connection's
        cost in the source agent (docs/performance/connection-cost.md)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush_and_wake()

    def flush_and_wake(self) -> None:
        """``flush``, then let writers waiting for the connection's budget go on if it took the
        bytes."""
        self.flush()
        if self.writers_waiting and not self.out_full():
            # The framed bytes ``out_full`` counted went to the transport, which took them:
            # writers waiting for the budget go on (as after a WINDOW_UPDATE).
            self.writers_waiting = False
            self._wake_writers()

    def _close_failed(self) -> None:
        """Close after the GOAWAY, unless the peer does not read: a paused transport (or one
        still open ``FAILED_LINGER`` seconds later) is aborted, so a hostile peer cannot keep
        our buffered output alive."""
        assert self.transport is not None
        if self.write_paused:
            self.transport.abort()
            return
        self.transport.close()
        transport = self.transport
        self.loop.call_later(FAILED_LINGER, transport.abort)

    @property
    def peer_ssl(self) -> ssl.SSLObject | None:
        return self.transport.get_extra_info("ssl_object") if self.transport else None

    def peer_identity(self) -> str:
        """The peer's SPIFFE ID ("" on a connection without TLS), the same for every stream of
        the connection, so it is read from the certificate once; raises ``PeerIdentityError``
        (each time) when the certificate names none."""
        if self._peer_id is None:
            ssl_object = self.peer_ssl
            try:
                self._peer_id = peer_spiffe_id(ssl_object) if ssl_object is not None else ""
            except PeerIdentityError as e:
                self._peer_id = e
        if isinstance(self._peer_id, PeerIdentityError):
            raise PeerIdentityError(*self._peer_id.args)
        return self._peer_id

    def dispatch(self, events: list[ev.Event]) -> None:
        for e in events:
            if type(e) is ev.DataReceived:
                # The event of every message: one type check, not the chain of the others.
                stream = self.streams.get(e.stream_id)
                if stream is not None:
                    stream._on_data(e.data)
                else:  # nobody will read it: the window gets it back
                    self.codec.consumed(e.stream_id, len(e.data))
            else:
                self._dispatch_one(e)

    def _dispatch_one(self, e: ev.Event) -> None:
        kind = type(e)
        if kind is ev.StreamEnded or kind is ev.TunnelAccepted:
            # Every tunnel's end (both sides) and answer (the client's): by their type first,
            # not down the chain of the others (seven ``isinstance``/``getattr`` calls each).
            stream = self.streams.get(e.stream_id)  # type: ignore[union-attr]
            if stream is None:
                return
            if kind is ev.StreamEnded:
                stream._on_end()
            elif stream.accepted is not None and not stream.accepted.done():
                stream.accepted.set_result(None)
            return
        if isinstance(e, ev.TunnelRequested):
            self.streams[e.stream_id] = TunnelStream(self, e.stream_id)
            if self.on_request:
                self.on_request(self, e)
            return
        if isinstance(e, ev.ConnectionFailed):
            log.info("HBONE connection failed (%s): %s", e.cause or "closed", e.reason)
            if e.cause:
                REFUSALS.labels(e.cause).inc()
            return
        if isinstance(e, ev.PingAcknowledged):
            self._ping_acknowledged()
            return
        if isinstance(e, ev.GoAwayReceived):
            for opened in list(self.streams.values()) if self.codec.client_side else []:
                if opened.stream_id > e.last_stream_id and opened.opening:
                    error = TunnelError("peer is draining (GOAWAY)", unprocessed=True)
                    self.streams.pop(opened.stream_id, None)
                    opened._on_error(error)
            self.stream_closed()
            return
        stream = self.streams.get(getattr(e, "stream_id", -1))
        if stream is None:
            return
        if isinstance(e, ev.TunnelRefused):
            self._drop(stream, TunnelError(f"peer answered {e.status}", e.status))
        elif isinstance(e, ev.StreamReset):
            refused = (
                self.codec.client_side
                and e.error_code == ErrorCodes.REFUSED_STREAM
                and stream.opening
            )
            message = f"stream reset by peer (code {e.error_code})"
            self._drop(stream, TunnelError(message, unprocessed=refused))
        elif isinstance(e, ev.StreamDrained):
            self._wake_writers()  # the connection's budget freed up too

    def _drop(self, stream: TunnelStream, error: TunnelError) -> None:
        self.streams.pop(stream.stream_id, None)
        stream._on_error(error)
        if stream.on_drop is not None:
            stream.on_drop()
        self.stream_closed()

    def stream_closed(self) -> None:
        if self.streams:
            return
        if self.codec.going_away and self.transport is not None:
            self.flush()  # what ``flush_soon`` left (the last stream's end) goes before the close
            self.transport.close()  # drained: GOAWAY sent or received and nothing left
        elif self.on_idle:
            self.on_idle(self)

    def finish(self, stream: TunnelStream) -> None:
        """The relay is done with ``stream``: unless both halves ended cleanly (a relay stopped
        early, say by a policy re-check, may leave ours open), reset it, so the peer never
        waits for bytes that will not come."""
        if self.streams.pop(stream.stream_id, None) is not None:
            stream._discard()
            self.codec.release(stream.stream_id)
            if not stream.complete:
                self.codec.reset(stream.stream_id, ErrorCodes.CANCEL)
                self.flush()
            self.stream_closed()

    # -- client side --
    async def open(
        self, authority: str, client_ip: str | None, service: str | None = None
    ) -> TunnelStream:
        sid = self.codec.open_tunnel(authority, client_ip=client_ip, service=service)
        stream = self.streams[sid] = TunnelStream(self, sid, opening=True)
        assert stream.accepted is not None
        self.flush_soon()
        try:
            await stream.accepted
        except asyncio.CancelledError:
            self.finish(stream)  # a timed-out open: reset it so the peer drops its connect
            raise
        stream.accepted = None
        return stream

    def start_keepalive(self) -> None:
        self._ping_timer = self.loop.call_later(self.codec.settings.ping_interval, self._keepalive)

    def _keepalive(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self._ping_outstanding is not None:
            log.warning(
                "HBONE peer did not answer PING within %ss: closing",
                self.codec.settings.ping_timeout,
            )
            self.transport.abort()
            return
        self._ping_outstanding = self.codec.ping()
        self.flush()
        self._ping_timer = self.loop.call_later(self.codec.settings.ping_timeout, self._keepalive)

    def _ping_acknowledged(self) -> None:
        self._ping_outstanding = None
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self.start_keepalive()

    def goaway(self) -> None:
        self.codec.goaway()
        self.flush()


def close_upstream(upstream: socket.socket | TunnelStream) -> None:
    """An upstream its owner is done with: a tunnel's stream finished (reset unless both
    halves ended: ``HboneProtocol.finish``; its pooled HBONE connection serves on), a
    socket closed."""
    if isinstance(upstream, TunnelStream):
        upstream.proto.finish(upstream)
    else:
        upstream.close()
