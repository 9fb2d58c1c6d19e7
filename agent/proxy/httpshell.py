"""What the asyncio shells of the HTTP paths share: the head timer and writes that do not wait.

Four shells drive a sans-IO proxy from callbacks: the destination's HTTP/1.1 and HTTP/2
sessions (``http_inbound``, ``h2inbound``) and the source's (``http_outbound``,
``h2outbound``). Each times the request head it is receiving (``HeadTimer``) and sends without
waiting from its callbacks (``try_send`` on a non-blocking socket; ``Outbox`` where a side's
bytes queue behind its backpressure). Why here and not in one shell: the four wrote the same
timer four times, and the others borrowed the destination's outbox from its HTTP/1.1 module.

What it must not cost: the shells were tuned for task wake-ups, reader registrations and
allocations per request (ARCHITECTURE.md, "HTTP/1.1 at the source"). ``HeadTimer`` is one
object per connection; it schedules a loop timer only when a head stays incomplete after the
read it began in (a keep-alive head that arrives whole never arms it), exactly as the timers it
replaced did.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable

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
    written by a task that awaits the side's backpressure. ``idle`` is set when nothing waits."""

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

    @property
    def busy(self) -> bool:
        return not self.idle.is_set()

    def send(self, data: bytes) -> None:
        if self.idle.is_set():
            n = self._try_write(data)
            if n == len(data):
                return
            data = data[n:]
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
            self.idle.set()
        self._on_idle()

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
