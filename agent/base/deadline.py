"""A deadline for a whole HTTP answer read by a blocking client (the view's GETs, the admin
CLI's requests).

A socket timeout bounds each read, not their number: a server that trickles its answer a byte
every few seconds holds such a client for ever. ``AnswerDeadline`` ends that from outside.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class AnswerDeadline:
    """Shuts the answer's sockets down once ``seconds`` have passed since it was made.

    A timer rather than a check between reads: a read blocked in ``recv`` (or in
    ``http.client`` reading the headers, or in a TLS handshake) only returns when the socket
    is shut; the check after each read would allow one more ``TIMEOUT`` per read."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.passed = False
        self._end = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._done = False
        self._timers: list[threading.Timer] = []

    def watch(self, sock: socket.socket) -> None:
        timer = threading.Timer(max(0.0, self._end - time.monotonic()), self._expire, (sock,))
        timer.daemon = True
        with self._lock:
            if self._done:
                return
            self._timers.append(timer)
        timer.start()

    def _expire(self, sock: socket.socket) -> None:
        with self._lock:
            if self._done:
                return
            self.passed = True
        with contextlib.suppress(OSError):  # already closed: nothing left to wait on
            sock.shutdown(socket.SHUT_RDWR)

    def finish(self) -> bool:
        """Stops the timers; whether the deadline passed before."""
        with self._lock:
            self._done = True
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
        return self.passed
