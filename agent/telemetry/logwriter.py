"""The access log's writer: its lines as ``logging`` would write them, without ``logging``.

Why: a Service request writes two access log lines (source and destination agent), and the
``logging`` path cost about 8 us each (a ``LogRecord``, the handler walk, a lock, the formatter,
and one ``write`` per line, since stderr flushes every line). The lines themselves are already
rendered (``accesslog.request_line``), so what ``logging`` adds is a prefix (time, level, logger)
and a newline. ``AccessLogWriter`` adds exactly that prefix, keeps the lines in a list and
writes them ``FLUSH_DELAY_S`` after the first of them (``loop.call_later``), in whole-line
chunks.

Why a delay and not the end of each loop iteration: a Service request's two lines (source and
destination) are written in different iterations, so a flush per iteration wrote about 1.5
times per request, each flush a ``write``, a ``poll`` (pipes) and the ``getpid`` of
``asyncio.get_running_loop``; 5 ms gathers a busy node's lines into a few writes (Envoy's file
access log buffers its lines too, for up to a second by default). A line reaches the stream
at most that late; nothing reads it sooner, and a record of any other logger, a new handler
and the interpreter's exit still write the pending lines first.

When it may: only while the configuration is the one ``logging.basicConfig`` makes
(``agent.cli``, ``agent.workers.worker``) -- ``nodemesh.access`` without handlers or filters of
its own, propagating straight to a root with one ``StreamHandler`` on a file descriptor, a plain
``%``-style ``Formatter`` whose format ends in ``%(message)s`` -- checked by the line that
opens a flush window (``write``): a change made while lines are pending holds from that window's
flush, at most ``FLUSH_DELAY_S`` later, as late as the lines reach the stream (a check per line
was a third of the writer's cost). Any other configuration (a test's ``caplog``, a handler an
operator adds) gets the line through ``logging`` as before. Levels stay ``logging``'s
(``access_log.isEnabledFor`` is asked first, for every line), so
``POST /logging?logger=nodemesh.access`` still turns the log on and off at once.

Order and atomicity: a line reaches the stream in the order written; a record of any other
logger flushes the pending access lines first (a filter on the root handler), so the file reads
as it did. Lines are written in whole-line chunks of at most ``PIPE_BUF`` bytes, so the workers'
lines on a shared stderr pipe never interleave inside a line (as with one ``write`` per line).

A full pipe (a stalled log collector): ``logging`` blocked the event loop until the reader
drained it, stalling every connection of the node. Here a pipe or socket is polled before each
chunk; one that cannot take it keeps the lines pending and the flush is retried every 10 ms. Past
``MAX_PENDING`` bytes new access lines are dropped and counted, and once the stream drains a
warning (through ``logging``) says how many were lost. Regular files are written at once (they
never stall the way a pipe does). Pending lines are written at interpreter exit, blocking
(``accesslog`` registers ``close`` with ``atexit``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import select
import stat
import time
from typing import TextIO, cast

FLUSH_DELAY_S = 0.005  # how long the first pending line waits for others to share its write
FLUSH_RETRY_S = 0.01  # how soon a flush is retried while the stream cannot take more
MAX_PENDING = 1 << 20  # bytes kept while the stream cannot take them; beyond, lines are dropped
CHUNK = select.PIPE_BUF  # a write of at most this many bytes to a pipe is atomic
_FIELDS = re.compile(r"%\((\w+)\)")
_PREFIX_FIELDS = frozenset({"asctime", "levelname", "name"})
# As default_msec_format writes LogRecord.msecs (1000 when the float product rounds up).
_MSECS = tuple(f"{ms:03d}" for ms in range(1001))

log = logging.getLogger(__name__)


class _Route:
    """One validated root handler: its stream's descriptor and the rendered line prefix."""

    __slots__ = (
        "encoding",
        "errors",
        "fd",
        "formatter",
        "handler",
        "head",
        "parts",
        "poller",
        "regular",
        "second",
        "stamp",
        "stream",
        "tail",
    )

    def __init__(self, handler: logging.StreamHandler[TextIO], parts: list[str], fd: int) -> None:
        self.handler = handler
        self.formatter = handler.formatter
        self.stream = handler.stream
        self.encoding = handler.stream.encoding or "utf-8"
        self.errors = handler.stream.errors or "strict"
        self.fd = fd
        self.regular = stat.S_ISREG(os.fstat(fd).st_mode)
        # Asks whether a pipe or socket takes a chunk now: made and registered once per route,
        # not per flush (a flush then costs one ``poll`` and one ``write`` per chunk).
        self.poller: select.poll | None = None
        if not self.regular:
            self.poller = select.poll()
            self.poller.register(fd, select.POLLOUT)
        self.parts = parts  # the prefix split where asctime goes
        self.second = -1
        self.stamp = ""
        # Where asctime appears once (every format the agent uses): what precedes its
        # milliseconds, remade once a second, and what follows them up to the message.
        self.head = ""
        self.tail = parts[1] if len(parts) == 2 else ""

    def line(self, now: float, text: str) -> str:
        """``text`` as the handler would write it for a record created at ``now``.

        Per line only the milliseconds are formatted (from a table); the date and time, and
        the rest of the prefix, are made once a second."""
        second = int(now)
        if second != self.second:
            self.second = second
            self.stamp = time.strftime(logging.Formatter.default_time_format, time.localtime(now))
            self.head = f"{self.parts[0]}{self.stamp},"
        msecs = _MSECS[int((now - second) * 1000)]  # LogRecord.msecs, truncated
        if len(self.parts) == 2:
            return f"{self.head}{msecs}{self.tail}{text}{self.handler.terminator}"
        asctime = f"{self.stamp},{msecs}"  # asctime absent or repeated: the general case
        return f"{asctime.join(self.parts)}{text}{self.handler.terminator}"


def _route_for(handler: logging.Handler, name: str) -> _Route | None:
    """A ``_Route`` if ``handler`` writes what this module can write byte for byte, else None."""
    if type(handler) is not logging.StreamHandler:
        return None
    handler = cast("logging.StreamHandler[TextIO]", handler)
    formatter = handler.formatter
    if type(formatter) is not logging.Formatter or type(formatter._style) is not (
        logging.PercentStyle
    ):
        return None
    if (
        formatter.datefmt is not None
        or formatter.converter is not time.localtime
        or formatter.default_time_format != logging.Formatter.default_time_format
        or formatter.default_msec_format != logging.Formatter.default_msec_format
    ):
        return None
    fmt = formatter._style._fmt or ""
    if not fmt.endswith("%(message)s"):
        return None
    head = fmt[: -len("%(message)s")]
    if not set(_FIELDS.findall(head)) <= _PREFIX_FIELDS:
        return None
    try:
        fd = handler.stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None  # no descriptor (a StringIO): logging writes it
    rendered = head % {"asctime": "\0", "levelname": "INFO", "name": name}
    return _Route(handler, rendered.split("\0"), fd)


class AccessLogWriter:
    """Writes INFO lines of one logger as its root ``StreamHandler`` would (see the module)."""

    def __init__(self, logger: logging.Logger, root: logging.Logger) -> None:
        self._logger = logger
        self._root = root
        self._route: _Route | None = None
        self._rejected: tuple[object, ...] = ()  # the last (handler, formatter, stream) refused
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._checked_until = 0.0  # a line's time before which the checked route stands
        self.dropped = 0
        self._reported_drops = 0

    def _current(self) -> _Route | None:
        """The route if the logger's records go to exactly its handler, as validated."""
        logger, root, route = self._logger, self._root, self._route
        handlers = root.handlers
        if (
            logger.handlers
            or logger.filters
            or not logger.propagate
            or logger.parent is not root
            or len(handlers) != 1
            or root.disabled
        ):
            return None
        handler = handlers[0]
        if (
            route is None
            or route.handler is not handler
            or handler.formatter is not route.formatter
            or getattr(handler, "stream", None) is not route.stream
        ):
            seen = (handler, handler.formatter, getattr(handler, "stream", None))
            if seen == self._rejected:
                return None  # checked already: not one this writer reproduces
            route = self._adopt(handler)
            if route is None:
                self._rejected = seen
                return None
        if handler.level > logging.INFO or len(handler.filters) != 1:
            return None
        return route

    def _adopt(self, handler: logging.Handler) -> _Route | None:
        """Validate a new root handler (or its new formatter or stream)."""
        self.flush(block=True)  # lines for the previous handler go there first
        route = _route_for(handler, self._logger.name)
        if route is not None and self._before_other_records not in handler.filters:
            handler.addFilter(self._before_other_records)
        self._route = route
        return route

    def _before_other_records(self, record: logging.LogRecord) -> bool:
        """The root handler's filter: pending access lines go out before any other record."""
        if self._pending:
            self.flush(block=True)
        return True

    def write(self, text: str, now: float) -> bool:
        """Queue ``text`` (an INFO line, the logger's level already checked) for the flush
        ``FLUSH_DELAY_S`` after the first pending line; False if the configuration is not one
        this writer reproduces (the caller then logs through ``logging``).

        The configuration is checked by the line that opens a flush window, not by each line:
        while that window's flush is scheduled and for ``FLUSH_DELAY_S`` after the check (by
        the lines' own times), the lines take the route it found. So a change reaches the
        access lines at most as late as the lines reach the stream (a record of any other
        logger, such as ``POST /logging``'s warning, flushes and so closes the window)."""
        if self._scheduled and self._loop is not None and self._loop.is_closed():
            self._scheduled = False  # its loop ended before the flush ran: schedule it anew
        route = self._route
        if not (self._scheduled and now < self._checked_until and route is not None):
            route = self._current()
            if route is None:
                return False
            self._checked_until = now + FLUSH_DELAY_S
        data = route.line(now, text).encode(route.encoding, route.errors)
        if self._pending_bytes + len(data) > MAX_PENDING:
            self.dropped += 1
            return True
        self._pending.append(data)
        self._pending_bytes += len(data)
        if not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush(block=True)  # no loop (a script, a thread): at once, like logging
                return True
            self._loop = loop
            self._scheduled = True
            loop.call_later(FLUSH_DELAY_S, self._flush_soon)
        return True

    def _flush_soon(self) -> None:
        self._scheduled = False
        self.flush(block=False)
        if self._pending and self._loop is not None and not self._loop.is_closed():
            self._scheduled = True
            self._loop.call_later(FLUSH_RETRY_S, self._flush_soon)

    def flush(self, *, block: bool) -> None:
        """Write the pending lines; unless ``block``, only what a pipe takes without waiting."""
        route = self._route
        self._checked_until = 0.0  # the next line checks the configuration again
        if not self._pending or route is None:
            return
        if route.stream.closed:  # its owner closed it (a script's log file at exit)
            self._pending, self._pending_bytes = [], 0
            return
        failed: OSError | None = None
        route.handler.acquire()  # against a record another thread hands the same handler
        try:
            route.stream.flush()  # anything written through the stream comes first
            self._write_chunks(route, block=block or route.regular)
        except OSError as e:
            failed, self._pending, self._pending_bytes = e, [], 0
        finally:
            route.handler.release()
        if failed is not None:
            log.error("access log: writing to the log stream failed (%s); lines lost", failed)
            return
        if self.dropped != self._reported_drops and not self._pending:
            lost, self._reported_drops = self.dropped - self._reported_drops, self.dropped
            log.warning(
                "access log: %d lines dropped while the log stream did not take them "
                "(over %d bytes pending); whatever reads the agent's stderr is too slow",
                lost,
                MAX_PENDING,
            )

    def _write_chunks(self, route: _Route, *, block: bool) -> None:
        pending, fd = self._pending, route.fd
        poller = None if block else route.poller
        start = 0
        while start < len(pending):
            end, size = start + 1, len(pending[start])
            while end < len(pending) and size + len(pending[end]) <= CHUNK:
                size += len(pending[end])
                end += 1
            if poller is not None and not poller.poll(0):
                break  # the pipe is full: the rest waits for the next try
            chunk = memoryview(b"".join(pending[start:end]))
            while chunk:
                chunk = chunk[os.write(fd, chunk) :]
            self._pending_bytes -= size
            start = end
        del pending[:start]

    def close(self) -> None:
        """Write what is pending, waiting if need be (at exit, and for tests)."""
        self.flush(block=True)
