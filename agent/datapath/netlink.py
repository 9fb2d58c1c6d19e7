"""The agent's side of the netlink helper: routing and tc through a child process.

Why a child: pyroute2 is the project's routing library, and importing it costs about 22 MiB of
RSS (some 300 modules: its NDB, sqlite3, multiprocessing) that the long-running agent would
carry for a few netlink calls per reconcile (ARCHITECTURE.md, "No compiler in the agent").
``agent.datapath.netlinkd`` holds pyroute2 instead. It is one persistent child, started with
the first call and restarted after it dies, rather than a child per operation: the reconcile
runs every few seconds and on every state change, and a fresh interpreter that imports pyroute2
costs about 0.14 s of CPU (measured), which would be spent 12 times a minute and would delay
every state change's reconcile by as much.

The protocol is one JSON object per line each way over the child's stdin and stdout:
``{"op": name, "args": {...}}`` in, ``{"ok": result}`` or ``{"error": {"kind", "message",
"errno"}}`` out. Errors come back as the exceptions the callers already handle: ``LookupError``
(a named uplink that does not exist), ``AttachError`` (tc refused a filter), ``OSError`` with its
errno (any other netlink failure). The programs' file descriptors are inherited by the child
(``keep_fds``, same numbers), so ``apply`` attaches exactly the programs this agent holds. A
child that does not answer within ``timeout`` is killed; its death is an ``OSError`` naming its
exit status, and the next call starts a new one. Calls are serialized (one line in flight).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from agent.base.constants import CAPTURE_MARK, ROUTE_TABLE, RULE_PRIORITY

log = logging.getLogger(__name__)

HELPER_MODULE = "agent.datapath.netlinkd"


@dataclass(frozen=True)
class RoutingConfig:
    capture_mark: int = CAPTURE_MARK
    table: int = ROUTE_TABLE
    rule_priority: int = RULE_PRIORITY

    def as_args(self) -> dict[str, int]:
        return asdict(self)


class AttachError(RuntimeError):
    """A tc operation failed on an interface."""


class HelperError(OSError):
    """The netlink helper died, hung or answered nonsense; the next call starts a new one."""


def raise_reported(error: dict[str, Any]) -> None:
    """Raise what the helper reported, as the exception its callers handle."""
    kind, message = error.get("kind"), str(error.get("message", "(no message)"))
    if kind == "LookupError":
        raise LookupError(message)
    if kind == "AttachError":
        raise AttachError(message)
    if kind == "OSError":
        raise OSError(int(error.get("errno") or 0), message)
    raise RuntimeError(f"the netlink helper failed: {message}")


class NetlinkHelper:
    """The child running ``agent.datapath.netlinkd``; ``call(op, **args)`` returns its answer."""

    def __init__(self, *, keep_fds: Sequence[int] = (), timeout: float = 30.0) -> None:
        self._keep_fds = tuple(keep_fds)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def call(self, op: str, **args: object) -> Any:
        with self._lock:
            proc = self._running()
            assert proc.stdin is not None
            try:
                proc.stdin.write(json.dumps({"op": op, "args": args}).encode() + b"\n")
                proc.stdin.flush()
                line = self._read_line(proc, time.monotonic() + self._timeout)
            except (OSError, TimeoutError) as e:
                raise self._lost(proc, f"{op}: {e}") from e
            try:
                answer = json.loads(line)
            except ValueError as e:
                raise self._lost(proc, f"{op}: answered {line[:200]!r}") from e
            if "error" in answer:
                raise_reported(answer["error"])
            return answer.get("ok")

    def close(self) -> None:
        """Stop the child: it exits when its stdin closes."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    def _running(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._buffer = b""
        self._proc = subprocess.Popen(
            [sys.executable, "-m", HELPER_MODULE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=self._keep_fds,
        )
        log.info("datapath: netlink helper started (pid %d)", self._proc.pid)
        return self._proc

    def _read_line(self, proc: subprocess.Popen[bytes], deadline: float) -> bytes:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        # poll, not select: a helper restarted while the agent holds over 1,024 descriptors
        # (its raised open-files limit) gets a pipe that select() refuses.
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise TimeoutError(f"no answer within {self._timeout:.0f}s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise ConnectionError("it closed its output")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _lost(self, proc: subprocess.Popen[bytes], what: str) -> HelperError:
        """Kill and forget a child that failed a call; the error names how it ended."""
        if proc.poll() is None:
            proc.kill()
        status = proc.wait()
        self._proc = None
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):  # a broken pipe to a dead child
                    stream.close()
        ended = f"signal {-status}" if status < 0 else f"status {status}"
        return HelperError(
            f"the netlink helper (pid {proc.pid}, {HELPER_MODULE}) failed during {what}; it "
            f"ended with {ended} (its stderr is in the agent's log); a new one starts on the "
            "next call"
        )
