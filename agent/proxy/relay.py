"""Bidirectional copying between a TCP socket and its peer (another socket or a tunnel stream).

Why callbacks instead of tasks: a relayed connection spends most of its life idle, and what it
holds while idle is what it costs. Two tasks awaiting ``sock_recv_into`` held two coroutine
frames, their futures and one read buffer per direction (8 KiB or more, grown up to 256 KiB for
bulk) for as long as the connection lived. Here each direction is a reader callback
(``loop.add_reader``) on its source socket: when the socket is readable it reads into one
buffer shared by every relay of the process (``_SHARED``) and sends at once, non-blocking, so
the buffer is free again when the callback returns. An idle connection holds the two reader
registrations and one small ``_Relay``; the caller's task awaits ``_Relay.done``. It is also
shorter: a message costs one callback (read, send) instead of a future resolved, a task step
scheduled and run, and the reader added and removed around each wait.

Backpressure: what the destination does not take is copied out of the shared buffer
(``_Direction.pending``), the source's reader is removed and a writer waits on the destination;
once the destination took it all the reader is back, so a slow reader stops its writer's reads.
A tunnel stream's side uses the stream's own backpressure (``TunnelStream.write_room``: it
reads its socket only that far, less than a whole read while the process's outgoing queue
budget is used up) and its
queue: received tunnel bytes go to the socket straight from the HBONE protocol's
``data_received`` (``deliver_directly``); what the socket does not take stays queued in the
stream and is written when the socket is writable (``TunnelStream.write_queued``), and the
peer's window is given back only for bytes the socket took, so the window bounds that queue.

Bulk between two TCP sockets is spliced (``splicepipe``): once a read of a direction filled
``SPLICE_AFTER`` bytes, its next reads are ``splice`` src -> the process's one pipe -> dst, so
the kernel passes page references instead of copying each byte into ``_SHARED`` and out again;
what dst does not take is read out of the pipe into ``pending`` as above, so the pipe is empty
between callbacks like the buffer. A splice that moved less than ``SPLICE_AFTER`` returns the
direction to ``recv_into``: for a small message two splices cost more than two small copies.
EOF, errors, half-close and the counts are the same on both paths.

A half-close (recv returns 0) becomes ``shutdown(SHUT_WR)`` on the other side (END_STREAM
through a tunnel), once everything before it was sent, so request/response protocols that
signal "done" by closing their write side keep working; the half-close that ends a relay
whose ``Owner`` closes the sockets at once is that ``close`` instead (``ends_with_close``).
An error in one direction ends both (``done`` raises it), so neither side waits forever on a
dead peer. A caller that is cancelled (policy re-check, idle timeout, drain) removes every
callback before it closes the sockets.

Two ways to run one: ``relay_sockets``/``relay_tunnel`` are awaited by a task that has more to
do around the relay (traffic control's attempts, the HTTP layers' upgrades); ``start_sockets``/
``start_tunnel`` return the relay's ``done`` future at once, so the connection's handler task can
end (the task and its coroutine frames were a third of what an idle cross-node connection
held): when ``done`` ends every callback is removed, then the ``Owner`` the caller gave cleans
up (registry, sockets), and cancelling ``done`` (policy re-check, drain) stops the relay as
cancelling the task did.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import time
from collections.abc import Callable
from typing import Protocol

from agent.base.quiet import quiet_context
from agent.proxy import splicepipe
from agent.proxy.tunnel import TunnelStream
from agent.telemetry.records import ConnectionRecord


class Owner(Protocol):
    """Who cleans up after a relay nobody awaits (``start_sockets``, ``start_tunnel``): one
    object for all of a handler's connections, told the connection's record (whose ``id`` is
    its registry entry) and its two ends: ``sock`` (the first the relay was given) and ``peer``
    (a socket, or the tunnel stream). After a clean end (``done`` has a result) it closes the
    sockets there and then, so the relay leaves its last half-close to that ``close``."""

    def relay_ended(
        self,
        done: asyncio.Future[None],
        record: ConnectionRecord,
        sock: socket.socket,
        peer: socket.socket | TunnelStream,
    ) -> None: ...


MAX_CHUNK = 256 * 1024

# The one read buffer of every relay in this process: a callback reads into it and has sent or
# copied out what it read before it returns (the event loop runs one callback at a time).
_SHARED = bytearray(MAX_CHUNK)
_SHARED_VIEW = memoryview(_SHARED)

# A socket-to-socket direction whose read filled this much splices its next reads (see
# ``_Direction``); ``_NEVER``: one of its sockets, or the process, cannot splice.
SPLICE_AFTER = 64 * 1024
_COPYING, _SPLICING, _NEVER = "copying", "splicing", "never"


def _count(record: ConnectionRecord, received: bool, n: int) -> None:
    """Add ``n`` bytes to ``bytes_received`` (server -> client) or ``bytes_sent``; the first
    upstream byte's time is traffic control's latency sample. Plain attributes, not a field
    name through ``getattr``/``setattr``: this runs for every message."""
    if received:
        if not record.bytes_received:
            record.first_byte = time.monotonic()
        record.bytes_received += n
    else:
        record.bytes_sent += n


def _send(sock: socket.socket, data: bytes | memoryview) -> int:
    """Non-blocking send: how many bytes the kernel took (0 when it would block)."""
    try:
        return sock.send(data)
    except (BlockingIOError, InterruptedError):
        return 0


class _Part(Protocol):
    def stop(self) -> None:
        """Remove this part's callbacks."""


class _Relay:
    """The state every relay has: the loop, the record and how the relay ends. A subclass
    removes its callbacks in ``stop`` (idempotent: the sockets may be closed afterwards)."""

    __slots__ = ("_owner", "done", "loop", "open_directions", "record")

    def __init__(
        self, record: ConnectionRecord, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        # ``loop``: one the caller already holds (``get_running_loop`` is a ``getpid``).
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.record = record
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.open_directions = 2
        self._owner: Owner | None = None

    def stop(self) -> None:
        raise NotImplementedError

    def ends_with_close(self) -> bool:
        """Does the direction ending now end the relay, with an ``Owner`` that closes the
        sockets as soon as it is told? Then its ``shutdown(SHUT_WR)`` would only precede that
        ``close`` by a pass of the loop: the ``close`` sends the FIN instead (one system call
        fewer per connection). Nothing unread can turn that close into a reset: the other
        direction ended by reading the end of this same socket."""
        return self.open_directions == 1 and self._owner is not None

    def direction_ended(self) -> None:
        self.open_directions -= 1
        if not self.open_directions:
            self.stop()
            if not self.done.done():
                self.done.set_result(None)

    def fail(self, error: BaseException) -> None:
        self.stop()
        if not self.done.done():
            self.done.set_exception(error)

    async def wait(self) -> None:
        try:
            await self.done
        finally:
            self.stop()

    def detach(self, owner: Owner) -> asyncio.Future[None]:
        """Nobody awaits the relay: when ``done`` ends (or is cancelled) every callback is
        removed first, then ``owner`` cleans up after the connection. The relay itself is
        ``done``'s callback (``__call__``), in the shared empty context: no bound method and no
        copy of a context live as long as the connection."""
        self._owner = owner
        self.done.add_done_callback(self, context=quiet_context())
        return self.done

    def __call__(self, done: asyncio.Future[None]) -> None:
        """``done`` ended (see ``detach``)."""
        self.stop()
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.relay_ended(done, self.record, *self.ends())

    def ends(self) -> tuple[socket.socket, socket.socket | TunnelStream]:
        """The connection's two ends, for the ``Owner``."""
        raise NotImplementedError


class _SocketRelay(_Relay):
    """Two sockets: a ``_Direction`` each way."""

    __slots__ = ("_parts", "client", "upstream")

    def __init__(
        self,
        record: ConnectionRecord,
        client: socket.socket,
        upstream: socket.socket,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(record, loop)
        self.client, self.upstream = client, upstream
        # The parts whose callbacks ``stop`` removes (a tuple of the objects, not a list of
        # bound methods: it lives as long as the connection).
        self._parts: tuple[_Part, ...] = ()

    def ends(self) -> tuple[socket.socket, socket.socket]:
        return self.client, self.upstream

    def on_stop(self, part: _Part) -> None:
        self._parts += (part,)

    def stop(self) -> None:
        parts, self._parts = self._parts, ()
        for part in parts:
            part.stop()


class _Direction:
    """src -> dst between two sockets: a reader on src, a writer on dst while dst is full.

    Bulk moves through the process's splice pipe (``splicepipe``) instead of ``_SHARED``: a
    read that filled at least ``SPLICE_AFTER`` bytes makes the next ones splices (src -> pipe
    -> dst, no copy through user space), until a splice moves less than that. Small messages
    stay on ``recv_into``/``send``: for them a splice costs more than the copy it saves."""

    __slots__ = (
        "_dst_fd",
        "_src_fd",
        "dst",
        "mode",
        "pending",
        "reading",
        "received",
        "relay",
        "src",
        "writing",
    )

    def __init__(
        self, relay: _SocketRelay, src: socket.socket, dst: socket.socket, *, received: bool
    ) -> None:
        self.relay = relay
        self.src, self.dst, self.received = src, dst, received
        self.pending: bytes = b""
        self.mode = _COPYING
        self._src_fd, self._dst_fd = src.fileno(), dst.fileno()
        # Which of the reader on src and the writer on dst are registered: ``stop`` removes
        # those alone. uvloop checks every ``remove_*`` (and ``add_*``) against its transports
        # with a look-up that raises and catches a ``KeyError`` (about 0.6 µs), and a relay
        # stopped at its end has neither left: removing both for each direction was four such
        # calls per same-node connection for nothing.
        self.reading, self.writing = True, False
        relay.loop.add_reader(self._src_fd, self._readable)
        relay.on_stop(self)

    def stop(self) -> None:
        loop = self.relay.loop
        if self.reading:
            self.reading = False
            loop.remove_reader(self._src_fd)
        if self.writing:
            self.writing = False
            loop.remove_writer(self._dst_fd)

    def _readable(self) -> None:
        if self.mode is _SPLICING:
            self._splice()
            return
        try:
            n = self.src.recv_into(_SHARED)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.relay.fail(e)
            return
        if not n:
            self._ended()
            return
        try:
            sent = _send(self.dst, _SHARED_VIEW[:n])
        except OSError as e:
            self.relay.fail(e)
            return
        _count(self.relay.record, self.received, n)
        if n >= SPLICE_AFTER and self.mode is _COPYING:
            self._may_splice()
        if sent < n:
            self._hold(bytes(_SHARED_VIEW[sent:n]))

    def _splice(self) -> None:
        """One read's worth src -> pipe -> dst; what dst does not take is read out of the
        pipe into ``pending``, so the pipe is empty when this returns."""
        pipe = splicepipe.get(MAX_CHUNK)
        if pipe is None or splicepipe.splice is None:
            self._copy_only(None)
            return
        try:
            n = splicepipe.splice(self._src_fd, pipe.w, MAX_CHUNK, None, None, splicepipe.FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno not in splicepipe.UNSUPPORTED:
                self.relay.fail(e)
            else:  # this socket cannot be spliced from: it never will be, copy instead
                self._copy_only(e)
            return
        if not n:
            self._ended()
            return
        try:
            sent = splicepipe.splice(pipe.r, self._dst_fd, n, None, None, splicepipe.FLAGS)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            if e.errno not in splicepipe.UNSUPPORTED:
                splicepipe.reset()  # the bytes in it are this connection's: never the next one's
                self.relay.fail(e)
                return
            self._copy_only(e)  # the n bytes go out of the pipe into ``pending``, as below
            sent = 0
        _count(self.relay.record, self.received, n)
        if n < SPLICE_AFTER and self.mode is _SPLICING:
            self.mode = _COPYING
        if sent < n:
            try:
                rest = pipe.take(n - sent)
            except OSError as e:
                self.relay.fail(e)
                return
            self._hold(rest)

    def _may_splice(self) -> None:
        """A large read: splice from now on if both sockets and the process allow it."""
        both = splicepipe.spliceable(self.src) and splicepipe.spliceable(self.dst)
        self.mode = _SPLICING if both and splicepipe.get(MAX_CHUNK) is not None else _NEVER

    def _copy_only(self, error: OSError | None) -> None:
        self.mode = _NEVER
        if error is not None:
            splicepipe.refuse(f"splice(2) between TCP sockets failed: {error}")

    def _hold(self, rest: bytes) -> None:
        """dst took less than was read: keep the rest and stop reading src until dst took it."""
        self.pending = rest
        self.reading, self.writing = False, True
        self.relay.loop.remove_reader(self._src_fd)
        self.relay.loop.add_writer(self._dst_fd, self._writable)

    def _ended(self) -> None:
        self.reading = False
        self.relay.loop.remove_reader(self._src_fd)
        if not self.relay.ends_with_close():
            _shutdown_write(self.dst)
        self.relay.direction_ended()

    def _writable(self) -> None:
        try:
            sent = _send(self.dst, self.pending)
        except OSError as e:
            self.relay.fail(e)
            return
        self.pending = self.pending[sent:]
        if not self.pending:
            self.reading, self.writing = True, False
            self.relay.loop.remove_writer(self._dst_fd)
            self.relay.loop.add_reader(self._src_fd, self._readable)


def _shutdown_write(sock: socket.socket) -> None:
    try:  # noqa: SIM105 (``contextlib.suppress`` is three calls more per connection)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _socket_relay(
    client: socket.socket,
    upstream: socket.socket,
    record: ConnectionRecord,
    loop: asyncio.AbstractEventLoop | None = None,
) -> _Relay:
    relay = _SocketRelay(record, client, upstream, loop)
    _Direction(relay, client, upstream, received=False)
    _Direction(relay, upstream, client, received=True)
    return relay


async def relay_sockets(
    client: socket.socket, upstream: socket.socket, record: ConnectionRecord
) -> None:
    """Copy client <-> upstream until both directions ended; closes neither socket."""
    await _socket_relay(client, upstream, record).wait()


def start_sockets(
    client: socket.socket,
    upstream: socket.socket,
    record: ConnectionRecord,
    owner: Owner,
    loop: asyncio.AbstractEventLoop | None = None,
) -> asyncio.Future[None]:
    """``relay_sockets`` without a task: returns its ``done`` (see ``_Relay.detach``).
    ``loop``: the running loop, when the caller has it (else it is looked up: a ``getpid``
    system call on Python 3.11)."""
    return _in_empty_context(_start_sockets, client, upstream, record, owner, loop)


def _start_sockets(
    client: socket.socket,
    upstream: socket.socket,
    record: ConnectionRecord,
    owner: Owner,
    loop: asyncio.AbstractEventLoop | None,
) -> asyncio.Future[None]:
    return _socket_relay(client, upstream, record, loop).detach(owner)


class _TunnelRelay(_Relay):
    """sock <-> stream: a reader on sock feeding the stream; the stream's bytes go to sock from
    the HBONE protocol's callbacks, with a writer on sock while it is full. One object with the
    relay's state and the stream's ``Waker`` (no bound methods kept for the stream), as it
    lives as long as the connection."""

    __slots__ = (
        "_fd",
        "_reading",
        "_sent_eof",
        "_writing",
        "outbound",
        "sock",
        "stream",
    )

    def __init__(
        self,
        record: ConnectionRecord,
        sock: socket.socket,
        stream: TunnelStream,
        *,
        outbound: bool,
        reader_held: bool = False,
    ) -> None:
        super().__init__(record, stream.proto.loop)
        self.sock, self.stream = sock, stream
        self.outbound = outbound  # sock is the client: bytes to the stream are "sent"
        self._fd = sock.fileno()
        self._reading = self._writing = self._sent_eof = False
        stream.deliver_directly(sock)
        stream.waker = self
        self.stream_changed()  # bytes, the end or an error may have come before the relay
        if not (self._reading or self.done.done()):  # ``stream_changed`` may have turned it on
            self._read(True)
        if reader_held and not self._reading:
            # ``sockets.connect(hold_reader=True)``'s placeholder, not replaced by ours.
            self.loop.remove_reader(self._fd)

    def ends(self) -> tuple[socket.socket, TunnelStream]:
        return self.sock, self.stream

    def stop(self) -> None:
        self.stream.waker = None
        self.stream.deliver_directly(None)
        if self._reading:  # ``_read(False)`` and ``_write(False)``, asked here first: mostly
            self._read(False)  # neither is on by now
        if self._writing:
            self._write(False)
        # The stream is released (``TunnelStream`` and the window it held) and reset unless
        # both halves ended cleanly, so the peer never waits for bytes that will not come.
        self.stream.proto.finish(self.stream)

    def _read(self, on: bool) -> None:
        if on != self._reading:
            self._reading = on
            if on:
                self.loop.add_reader(self._fd, self._readable)
            else:
                self.loop.remove_reader(self._fd)

    def _write(self, on: bool) -> None:
        if on != self._writing:
            self._writing = on
            if on:
                self.loop.add_writer(self._fd, self._writable)
            else:
                self.loop.remove_writer(self._fd)

    def delivered(self, n: int) -> None:
        # ``_count(self.record, self.outbound, n)``, inlined (a message each): from the
        # stream, so received if outbound.
        record = self.record
        if self.outbound:
            if not record.bytes_received:
                record.first_byte = time.monotonic()
            record.bytes_received += n
        else:
            record.bytes_sent += n

    # -- sock -> stream --
    def _readable(self) -> None:
        stream = self.stream
        if stream.error is not None:
            self.fail(stream.error)
            return
        room = stream.write_room()  # less than a whole read while the queue budget is used up
        if not room:
            # ``stream_changed`` resumes it once the stream has room; the protocol wakes
            # streams on freed connection budget only while some writer says it waits.
            stream.proto.writers_waiting = True
            self._read(False)
            return
        try:
            n = self.sock.recv_into(_SHARED, room)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.fail(e)
            return
        if not n:
            self._read(False)
            stream.write_eof()
            self.direction_ended()
            return
        try:
            stream.write_now(_SHARED_VIEW[:n])  # ``can_write`` said yes above
        except Exception as e:  # the codec's: the relay's owner gets it, not the event loop
            self.fail(e)
            return
        # ``_count(self.record, not self.outbound, n)``, inlined (a message each).
        record = self.record
        if self.outbound:
            record.bytes_sent += n
        else:
            if not record.bytes_received:
                record.first_byte = time.monotonic()
            record.bytes_received += n

    # -- stream -> sock --
    def stream_changed(self) -> None:
        stream = self.stream
        if stream.error is not None:
            self.fail(stream.error)
            return
        if stream.unread and not (self._writing or self._sent_eof):
            self._writable()
        if self._reading or stream.ended or self.done.done():
            return
        if stream.can_write():
            self._read(True)
        else:
            # Still full: ask again to be woken by the next WINDOW_UPDATE (the protocol clears
            # the flag each time it wakes the streams), as a waiting ``write`` loop does.
            stream.proto.writers_waiting = True

    def _writable(self) -> None:
        try:
            drained = self.stream.write_queued(lambda data: _send(self.sock, data))
        except Exception as e:  # the socket's or the codec's: for the relay's owner, and never
            self.fail(e)  # into the HBONE protocol's callback that woke us
            return
        if drained == self._writing:  # ``_write(not drained)`` when that changes anything
            self._write(not drained)
        if drained and self.stream.eof and not self._sent_eof:
            self._sent_eof = True
            if not self.ends_with_close():
                _shutdown_write(self.sock)
            self.direction_ended()


async def relay_tunnel(
    sock: socket.socket, stream: TunnelStream, record: ConnectionRecord, *, outbound: bool
) -> None:
    """Copy sock <-> stream; ``outbound``: sock is the client (bytes to the stream are "sent")."""
    await _tunnel_relay(sock, stream, record, outbound=outbound).wait()


def start_tunnel(
    sock: socket.socket,
    stream: TunnelStream,
    record: ConnectionRecord,
    owner: Owner,
    *,
    outbound: bool,
    reader_held: bool = False,
) -> asyncio.Future[None]:
    """``relay_tunnel`` without a task: returns its ``done`` (see ``_Relay.detach``); the
    stream is finished (reset unless both halves ended) before ``owner`` is told.
    ``reader_held``: ``sock`` came from ``sockets.connect(hold_reader=True)``; the relay's
    reader takes the held one's place (or drops it)."""
    return _in_empty_context(_start_tunnel, sock, stream, record, owner, outbound, reader_held)


def _start_tunnel(
    sock: socket.socket,
    stream: TunnelStream,
    record: ConnectionRecord,
    owner: Owner,
    outbound: bool,
    reader_held: bool,
) -> asyncio.Future[None]:
    return _TunnelRelay(record, sock, stream, outbound=outbound, reader_held=reader_held).detach(
        owner
    )


def _in_empty_context(
    start: Callable[..., asyncio.Future[None]], *args: object
) -> asyncio.Future[None]:
    """``start(*args)``, which makes and detaches a relay, in an empty context (``start_*``
    do): the callbacks it registers copy the context they are made in, and the handler's
    context (the registry's current record and whatever else its task set) must not be kept
    alive by an idle connection. The arguments are passed on, not closed over by a ``lambda``
    made per connection."""
    return contextvars.Context().run(start, *args)


def _tunnel_relay(
    sock: socket.socket, stream: TunnelStream, record: ConnectionRecord, *, outbound: bool
) -> _Relay:
    return _TunnelRelay(record, sock, stream, outbound=outbound)
