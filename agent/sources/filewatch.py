"""Wake up when something in a directory changes (Linux inotify), with a timeout as a floor.

Why: the local-file source polls its file every 200 ms, which alone adds up to that much to the
time from ``nodemesh lab annotate`` to a pod being meshed. Watching the file's *directory*
(the lab replaces the file by renaming a temporary one over it, which inotify reports on the
directory, not on the replaced inode) lets the source react within a millisecond. The poll stays
as the floor: if inotify is unavailable (a read-only /proc, a watch limit reached, another OS)
``wait`` simply sleeps for the timeout, and correctness never depends on events arriving.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import select
from pathlib import Path

log = logging.getLogger(__name__)

_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
# IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
_MASK = 0x004 | 0x008 | 0x040 | 0x080 | 0x100 | 0x200


class DirectoryWatch:
    """``wait(timeout)`` returns when the directory changed or ``timeout`` seconds passed."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._fd = -1
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1")
            if libc.inotify_add_watch(fd, os.fsencode(Path(directory)), _MASK) < 0:
                err = ctypes.get_errno()
                os.close(fd)
                raise OSError(err, f"inotify_add_watch {directory}")
            self._fd = fd
        except (OSError, AttributeError) as e:
            log.info("inotify unavailable for %s (%s); polling only", directory, e)

    @property
    def active(self) -> bool:
        return self._fd >= 0

    def wait(self, timeout: float) -> None:
        # poll, not select: descriptors above 1,024 (the agent's raised open-files limit) work
        poller = select.poll()
        for fd in [self._wake_r] + ([self._fd] if self._fd >= 0 else []):
            poller.register(fd, select.POLLIN)
        for fd, _events in poller.poll(timeout * 1000):
            _drain(fd)

    def wake(self) -> None:
        """Make a ``wait`` in another thread return now (used to stop promptly)."""
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        for fd in (self._fd, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._fd = self._wake_r = self._wake_w = -1


def _drain(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 65536):
                return
        except BlockingIOError:
            return
