"""The local-file source: the state from one cluster document, reloaded when the file changes.

Used in standalone mode and by the lab, where there is no API server: ``nodemesh lab annotate``
and friends rewrite the document atomically (temp file + rename) and every agent and the CA pick
the change up here. A change is noticed by comparing the file's ``(inode, mtime, size)``, which
catches a rename over it, an in-place edit and a file that reappears; the comparison runs when
inotify reports a change in the file's directory (``filewatch``: within a millisecond) and in
any case every ``interval`` (200 ms), so a missed or unavailable inotify costs latency only.

A bad edit never reaches the store: the document is parsed and validated completely first
(``agent.sources.document``), and on error the message (file, path inside it, what is allowed)
is logged and kept in ``last_error`` while the previous good state stays in force. The first
load is synchronous in ``start()``, so a caller can read the store as soon as it returns.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import threading
from pathlib import Path

from agent.sources.document import DocumentError, parse_document
from agent.sources.filewatch import DirectoryWatch
from agent.state import StateStore

log = logging.getLogger(__name__)

_Stamp = tuple[int, int, int]  # inode, mtime_ns, size


class LocalFileError(RuntimeError):
    """The cluster document could not be loaded at start; the message says why and where."""


class LocalFileSource:
    """Feed ``store`` from the cluster document at ``path``; the store's only writer."""

    def __init__(
        self, path: str | os.PathLike[str], store: StateStore, *, interval: float = 0.2
    ) -> None:
        self.path = Path(path)
        self.store = store
        self.interval = interval
        self.loads = 0  # successful loads, for the admin API and tests
        self.last_error: str | None = None
        # sha256 (hex) of the document last applied and its file's mtime then (ns): one tuple,
        # replaced whole by the reload thread, so the admin API never sees half of a change
        self._applied: tuple[str, int | None] | None = None
        self._stamp: _Stamp | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: DirectoryWatch | None = None

    @property
    def ready(self) -> bool:
        """True once a document has been loaded (a later bad edit does not unready it)."""
        return self.loads > 0

    def describe(self) -> dict[str, object]:
        """What the admin API shows about this source (``agent.base.component.StateSource``)."""
        return {
            "source": "file",
            "path": str(self.path),
            "loads": self.loads,
            "last_error": self.last_error,
            "applied": self.applied(),
        }

    def applied(self) -> dict[str, dict[str, object]]:
        """What this agent has applied (``nodemesh proxy-status`` compares agents): the
        document's content hash, equal on every agent that applied the same document, and the
        file's modification time when it was read (UTC, microseconds; the newest is the
        document the others should catch up with)."""
        applied = self._applied
        sha256, mtime_ns = applied if applied is not None else (None, None)
        modified = None
        if mtime_ns is not None:
            when = dt.datetime.fromtimestamp(mtime_ns / 1e9, dt.UTC)
            modified = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {
            "cluster-file": {
                "sha256": sha256,
                "modified": modified,
                "synced": self.loads > 0,
            }
        }

    def stats(self) -> dict[str, dict[str, int]]:
        return {"cluster-file": {"loads": self.loads}}

    def start(self) -> None:
        """Load the document now (raising ``LocalFileError`` if it is invalid), then follow it."""
        # Watch before the first load, so that an edit racing with it still wakes the thread.
        watch = DirectoryWatch(self.path.parent)
        if not self.reload():
            watch.close()
            raise LocalFileError(
                f"cannot start the local-file source: {self.last_error}; fix the file and retry"
            )
        self._stop.clear()
        self._watch = watch
        self._thread = threading.Thread(
            target=self._follow, args=(watch,), name=f"localfile:{self.path.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def _current_stamp(self) -> _Stamp | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _follow(self, watch: DirectoryWatch) -> None:
        while not self._stop.is_set():
            watch.wait(self.interval)
            stamp = self._current_stamp()
            if not self._stop.is_set() and stamp is not None and stamp != self._stamp:
                self.reload()

    def reload(self) -> bool:
        """Load the file now; on success replace the store's contents, else keep them."""
        stamp = self._current_stamp()
        try:
            try:
                data = self.path.read_bytes()
            except OSError as e:
                why = f"cannot read the file: {e.strerror}"
                raise DocumentError(str(self.path), "", why) from e
            doc = parse_document(data.decode("utf-8"), source=str(self.path))
        except DocumentError as e:
            self._stamp = stamp  # do not retry the same bad content every interval
            if str(e) != self.last_error:
                log.error("%s; keeping the previous state until the file is fixed", e)
            self.last_error = str(e)
            return False
        state = doc.to_state()
        # The error is cleared before the commit: the store notifies its subscribers inside
        # it, and one that asks this source's status then (readiness, `nodemesh status`) must
        # not see the state of the new file beside the error of the old one.
        if self.last_error is not None:
            log.info("%s: loaded again after the error was fixed", self.path)
        self.last_error = None
        self._applied = (hashlib.sha256(data).hexdigest(), None if stamp is None else stamp[1])
        with self.store.update() as txn:
            txn.trust_domain = state.trust_domain
            txn.replace("namespaces", state.namespaces)
            txn.replace("workloads", state.workloads)
            txn.replace("services", state.services)
            txn.replace("policies", state.policies)
            txn.replace("routes", state.routes)
        self._stamp = stamp
        self.loads += 1
        return True
