"""What the asyncio shells of the HTTP paths share: the head timer, writes that do not wait,
and the callback shell.

Four shells drive a sans-IO proxy from callbacks: the destination's HTTP/1.1 and HTTP/2
sessions (``http_inbound``, ``h2inbound``) and the source's (``http_outbound``,
``h2outbound``). Each times the request head it is receiving (``HeadTimer``) and sends without
waiting from its callbacks (``try_send`` on a non-blocking socket; ``Outbox`` where a side's
bytes queue behind its backpressure). Three of them also read one socket with a reader
callback and end once (``CallbackShell`` with its ``SocketReader``): the destination's two
(through ``http_inbound.PodShell``) and the HTTP/2 source. The HTTP/1.1 source parks a task
on a future of its own instead (``http_outbound``), so it takes only the timer and the send.
Why here and not in each shell: the four wrote the same timer four times, the others borrowed
the destination's outbox from its HTTP/1.1 module, and the three callback shells each wrote
their reader's registration and their end.

What it must not cost: the shells were tuned for task wake-ups, reader registrations and
allocations per request (ARCHITECTURE.md, "HTTP/1.1 at the source"). ``HeadTimer`` and
``SocketReader`` are one object per connection; the timer schedules a loop timer only when a
head stays incomplete after the read it began in (a keep-alive head that arrives whole never
arms it), exactly as the timers it replaced did, and the shells look at it inline after each
input, without a call unless the head changed.
"""

from __future__ import annotations

import asyncio
import socket
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

HEADER_TIMEOUT = 10.0  # seconds from a head's first byte to its end (HTTP/1.1 head, HTTP/2 block)
READ_SIZE = 64 * 1024  # what a shell reads from a socket at once


class HeadTimer:
    """The head timeout (slowloris): a head must be complete ``timeout`` seconds after its first
    byte. The shell tells it, after each input, when the head being received began (the
    proxy's ``head_started``: a clock time, or None between heads and within a body); the
    timer is armed at a head's first byte, disarmed once the head is complete, armed again for
    the next keep-alive head, and ``on_expiry`` runs when a head is late (the shell then has
    the proxy answer 408, or close an HTTP/2 connection)."""

    __slots__ = ("_handle", "_loop", "_on_expiry", "started", "timeout")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeout: float, on_expiry: Callable[[], None]
    ) -> None:
        self._loop = loop
        self.timeout = timeout
        self._on_expiry = on_expiry
        self._handle: asyncio.TimerHandle | None = None
        self.started: float | None = None  # the head the timer runs for (its first byte)

    def time(self, started: float | None) -> None:
        """Time the head begun at ``started`` (``time.monotonic()``), or none (None); the same
        head again changes nothing. A caller on a hot path may skip the call when ``started``
        equals ``self.started``."""
        if started == self.started:
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.started = started
        if started is not None:
            delay = max(0.0, started + self.timeout - time.monotonic())
            self._handle = self._loop.call_later(delay, self._expired)

    def cancel(self) -> None:
        """Stop the timer (the connection ends); the head it timed stays ``started``."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _expired(self) -> None:
        self._handle = self.started = None
        self._on_expiry()


def require_non_blocking(sock: socket.socket) -> None:
    if sock.gettimeout() != 0.0:
        raise ValueError(
            "the HTTP session sends without waiting from callbacks: a blocking socket would "
            "stall the event loop (call setblocking(False) first)"
        )


def try_send(sock: socket.socket, data: bytes) -> int:
    """A non-blocking send; 0 when it would block or failed (the awaited send will tell)."""
    try:
        return sock.send(data)
    except OSError:
        return 0


class Outbox:
    """Bytes for one side, in order: written at once when the side takes them, else queued and
    written by a task that awaits the side's backpressure. ``idle`` is set when nothing waits,
    and ``busy`` is its opposite as a plain attribute: the shells ask it after every input (and
    ``send`` before every write), where the event's ``is_set`` was a Python call, and a
    property around it a second one (four to six per gRPC call in each agent)."""

    def __init__(
        self,
        try_write: Callable[[bytes], int],
        write: Callable[[bytes], Awaitable[None]],
        on_idle: Callable[[], None],
        on_error: Callable[[Exception], None],
    ) -> None:
        self._try_write, self._write = try_write, write
        self._on_idle, self._on_error = on_idle, on_error
        self._pending: deque[bytes] = deque()
        self._task: asyncio.Task[None] | None = None
        self.idle = asyncio.Event()
        self.idle.set()
        self.busy = False  # bytes wait (``not idle.is_set()``): changed only with ``idle``

    def send(self, data: bytes) -> None:
        if not self.busy:
            n = self._try_write(data)
            if n == len(data):
                return
            data = data[n:]
            self.busy = True
            self.idle.clear()
            self._task = asyncio.create_task(self._drain(), name="http-outbox")
        self._pending.append(data)

    async def _drain(self) -> None:
        try:
            while self._pending:
                await self._write(self._pending[0])
                self._pending.popleft()
        except (OSError, ConnectionError) as e:
            self._pending.clear()
            self._on_error(e)
        finally:
            self._task = None
            self.busy = False
            self.idle.set()
        self._on_idle()

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class SocketReader:
    """A socket read by a callback of the loop's (``add_reader``), registered at most once: the
    side a callback shell reads itself (the pod's at the destination, the client's at the
    HTTP/2 source); the other side's bytes are handed over by its HBONE stream."""

    __slots__ = ("_callback", "_loop", "_sock", "active")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, callback: Callable[[], None]
    ) -> None:
        self._loop, self._sock, self._callback = loop, sock, callback
        self.active = False

    def start(self) -> None:
        if not self.active:
            self._loop.add_reader(self._sock.fileno(), self._callback)
            self.active = True

    def stop(self) -> None:
        if self.active:
            self._loop.remove_reader(self._sock.fileno())
            self.active = False


class HeadProxy(Protocol):
    """What ``CallbackShell`` needs of its sans-IO proxy."""

    closing: bool
    head_started: float | None  # when the head being received began (``HeadTimer``)

    def header_timeout(self) -> None: ...


class CallbackShell(ABC):
    """A session whose work runs in loop callbacks around a sans-IO proxy: the destination's
    (``http_inbound.PodShell``, HTTP/1.1 and HTTP/2) and the HTTP/2 source's
    (``h2outbound.H2SourceSession``). What they share: one socket read by a reader callback
    (``_reader``, calling ``_readable``), the head timer (``_head``, whose expiry the proxy
    answers, then ``_moved``), and one end (``_ended``: ``_end`` stops the reads and settles
    it once). After each input a shell calls its ``_moved``, which times the head inline
    (``self._head.time(proxy.head_started)`` when it changed and the proxy is not closing)."""

    proxy: HeadProxy

    def __init__(self, sock: socket.socket, header_timeout: float) -> None:
        require_non_blocking(sock)
        self._loop = asyncio.get_running_loop()
        self._ended: asyncio.Future[None] = self._loop.create_future()
        self._reader = SocketReader(self._loop, sock, self._readable)
        self._head = HeadTimer(self._loop, header_timeout, self._head_expired)

    @abstractmethod
    def _readable(self) -> None:
        """The socket has bytes, its end, or an error."""

    @abstractmethod
    def _moved(self) -> None:
        """After an input (or a timer): write, report, time the head, see whether it ended."""

    def _head_expired(self) -> None:
        if self.proxy.head_started is not None and not self._ended.done():
            self.proxy.header_timeout()
            self._moved()

    def _end(self, error: BaseException | None) -> None:
        if self._ended.done():
            return
        self._reader.stop()
        if error is None:
            self._ended.set_result(None)
        else:
            self._ended.set_exception(error)
