"""Handing a node from a running agent to its successor (an upgrade) without dropping a flow.

Why a channel between the two processes: an upgrade runs two agents on one node for a while (the
DaemonSet surges a new pod beside the old one; ``nodemesh lab upgrade`` does the same). Both see
the same pinned maps and tc filters, and only one may write them: an old agent reconciling with
its own programs after the new one swapped the filters would swap them back. And the successor
must take new SYNs only once it can serve them, while the predecessor must not stop before that.
So the two agree, over a Unix socket with an abstract name (scoped to the network namespace, like
the agents' ports and filters; no file to mount or clean up), in three steps:

1. ``freeze``: the successor is ready to take over (components ready, certificates loaded).
   The predecessor finishes any reconcile pass under way, then stops writing to the kernel.
2. The successor registers its listeners (new SYNs go to it; established flows keep reaching
   the predecessor's sockets through the programs' socket lookup), reconciles, and binds the
   metrics, admin and then readiness ports (``SO_REUSEPORT``; new connections go to the
   newest).
3. ``took_over``: the predecessor releases the name (the successor now holds it, for the next
   upgrade) and, after a short grace for handshakes already under way, closes its listeners. It
   keeps serving its established connections until SIGTERM drains it.

Before all that, at its start, the successor asks for the node's rate-limit buckets
(``fetch_buckets``, on a connection of its own): the predecessor answers with the descriptor of
a bucket table (``SCM_RIGHTS``) and the table layout it was asked for, so a rollout does not
give every limited client a fresh burst. The layout travels in the request and in the table's
own header, so agents of different versions refuse each other's tables rather than misread
them; an agent that predates this answers "unknown operation". Whatever goes wrong there, the
successor starts with full buckets and the handover goes on. A single-process successor takes
from that table until the predecessor has exited, which it learns from the predecessor's
process itself (``ExitWatch``: a pidfd of the agent that answered, got from the kernel on the
answer's connection, valid across PID namespaces and readable however the process ended), not
from a connection, which the handover closes at its end anyway; and a single-process
predecessor, which moved to the table it handed over, leaves it once that successor has exited
(a pidfd of it from the same connection: the ``Buckets`` hook's second argument).

A successor that disappears before step 3 gives the node back: the predecessor resumes writing
and registers its listeners again. Only a process of the same user may talk to an agent here
(``SO_PEERCRED``), since ``freeze`` stops the reconciler.

``Predecessor`` is the old side's state machine (messages in, decisions out); the asyncio shells
are ``HandoverServer`` (old side) and ``Successor`` (new side); ``who`` answers ``nodemesh lab
upgrade``'s question "which agent holds the node now".
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

log = logging.getLogger(__name__)

REPLY_TIMEOUT = 30.0  # a freeze waits for one reconcile pass at most
BUCKETS_TIMEOUT = 5.0  # copying in-process buckets into a table: well under a second
LINE_LIMIT = 4096


class HandoverError(RuntimeError):
    """The other agent broke the handover protocol or went away."""


def socket_name(pin_dir: Path) -> bytes:
    """The abstract socket name of the agent owning ``pin_dir`` (one agent per pin directory)."""
    digest = hashlib.sha256(str(pin_dir).encode()).hexdigest()[:16]
    return b"\0nodemesh-agent-" + digest.encode()


class Phase(enum.Enum):
    SERVING = "serving"  # alone, or a successor announced itself but is not ready yet
    FROZEN = "frozen"  # the successor is taking over; no kernel writes
    SUPERSEDED = "superseded"  # the successor holds the node; drain on SIGTERM


Action = Literal["freeze", "release", "resume", "buckets"]


@dataclass(frozen=True)
class Reply:
    """What the predecessor answers and what it must do before answering (``action``)."""

    message: dict[str, Any]
    action: Action | None = None


class Predecessor:
    """The old agent's side of the handover, sans-IO: one message or event in, one ``Reply``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.phase = Phase.SERVING
        self.successor: int | None = None

    def receive(self, message: dict[str, Any]) -> Reply:
        op = message.get("op")
        if op == "who":
            return Reply({"pid": self.pid, "phase": self.phase.value})
        if op == "hello":
            pid = message.get("pid")
            if self.phase is Phase.SERVING and isinstance(pid, int):
                log.info("agent %s started beside this one; it takes over once ready", pid)
                self.successor = pid
            return Reply({"pid": self.pid, "phase": self.phase.value})
        if op == "freeze":
            if self.phase is not Phase.SERVING:
                return Reply({"error": f"agent {self.successor} is taking over (or took over)"})
            pid = message.get("pid")
            if not isinstance(pid, int):
                return Reply({"error": "freeze needs the successor's pid"})
            self.successor, self.phase = pid, Phase.FROZEN
            return Reply({"ok": True, "pid": self.pid}, action="freeze")
        if op == "buckets":
            layout = message.get("layout")
            if not isinstance(layout, int) or isinstance(layout, bool):
                return Reply({"error": "buckets needs the table layout the successor reads"})
            if self.phase is Phase.SUPERSEDED:
                return Reply({"error": "this agent handed the node over already"})
            return Reply({"ok": True, "pid": self.pid, "layout": layout}, action="buckets")
        if op == "took_over":
            if self.phase is not Phase.FROZEN:
                return Reply({"error": f"took_over while {self.phase.value}: freeze first"})
            self.phase = Phase.SUPERSEDED
            return Reply({"ok": True}, action="release")
        return Reply({"error": f"unknown operation {op!r}"})

    def successor_lost(self) -> str | None:
        """The successor's connection ended; ``"resume"`` when the node must be taken back."""
        if self.phase is Phase.FROZEN:
            log.error(
                "agent %s went away during the handover: this agent takes the node back",
                self.successor,
            )
            self.phase, self.successor = Phase.SERVING, None
            return "resume"
        return None


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError as e:
        raise HandoverError(f"not a handover message: {line[:80]!r}") from e
    if not isinstance(value, dict):
        raise HandoverError(f"not a handover message: {line[:80]!r}")
    return value


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def bind(name: bytes) -> socket.socket | None:
    """A listening socket on ``name``, or None when another agent holds it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(name)
    except OSError:
        sock.close()
        return None
    sock.listen(8)
    sock.setblocking(False)
    return sock


Actions = dict[Action, Callable[[], Awaitable[None]]]
# The rate-limit table for a successor that reads ``layout``: a descriptor the server sends and
# then closes; raises (ValueError, OSError...) with the reason when there is none to give. The
# second argument is a pidfd of that successor (-1: none), which the hook owns once it returns.
Buckets = Callable[[int, int], int]


class HandoverServer:
    """Serves the handover name for this agent: ``freeze``/``took_over`` from a successor,
    ``who`` from anyone of the same user. ``actions`` are the agent's hooks; ``buckets``
    gives its rate-limit table (None: an agent without rate limits)."""

    def __init__(
        self,
        sock: socket.socket,
        state: Predecessor,
        actions: Actions,
        buckets: Buckets | None = None,
    ) -> None:
        self._sock: socket.socket | None = sock
        self.state = state
        self._actions = actions
        self._buckets = buckets
        self._server: asyncio.AbstractServer | None = None
        self._peers = 0
        # Set while no other agent is connected (or after the handover): SIGTERM may drain now.
        self.settled = asyncio.Event()
        self.settled.set()

    async def start(self) -> None:
        assert self._sock is not None
        self._server = await asyncio.start_unix_server(
            self._serve, sock=self._sock, limit=LINE_LIMIT
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self._sock = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if _peer_uid(sock) != os.geteuid():
            writer.close()
            return
        froze = False
        self._peers += 1
        self.settled.clear()
        try:
            while line := await reader.readline():
                reply = self.state.receive(decode(line))
                if reply.action == "buckets":
                    await self._send_buckets(writer, reply.message)
                    continue
                froze = froze or reply.action == "freeze"
                if reply.action is not None:
                    await self._actions[reply.action]()
                if reply.action == "release":
                    await self.stop()  # the name is free for the successor to claim
                writer.write(encode(reply.message))
                await writer.drain()
        except (OSError, HandoverError, ValueError) as e:
            log.warning("handover connection failed: %s", e)
        finally:
            writer.close()
            self._peers -= 1
            if froze and self.state.successor_lost() == "resume":
                await self._actions["resume"]()
            if self._peers == 0 or self.state.phase is Phase.SUPERSEDED:
                self.settled.set()

    async def _send_buckets(self, writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        """The answer to ``buckets`` with the table's descriptor attached, or the reason there
        is none; never an exception that would end the connection over the buckets alone."""
        successor = _successor_pidfd(writer.get_extra_info("socket"))
        try:
            if self._buckets is None:
                raise ValueError("this agent enforces no rate limits (no node proxy)")
            fd = self._buckets(int(message["layout"]), successor)
        except Exception as e:  # a successor without buckets still takes over
            if successor >= 0:
                os.close(successor)
            log.warning("cannot hand the rate-limit buckets over: %s", e)
            writer.write(encode({"error": f"no rate-limit buckets from this agent: {e}"}))
            await writer.drain()
            return
        try:
            await writer.drain()
            if writer.transport.get_write_buffer_size():
                raise HandoverError("earlier answers are still queued")
            # asyncio's streams carry no descriptors: send on a duplicate of the connection's
            # socket, whose queue is empty (above), so the answer keeps its place.
            raw = writer.get_extra_info("socket")
            with socket.socket(fileno=os.dup(raw.fileno())) as dup:
                data = encode(message)
                if socket.send_fds(dup, [data], [fd]) != len(data):
                    raise HandoverError("the answer was cut short")
        finally:
            os.close(fd)


class Successor:
    """The new agent's side: a connection to the running agent, opened before anything else."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.pid: int | None = None

    @classmethod
    def find(cls, name: bytes) -> Successor | None:
        """Connect to the agent holding ``name``; None when there is none (a fresh start)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(name)
        except OSError:  # ECONNREFUSED: nobody listens on the name
            sock.close()
            return None
        sock.setblocking(False)
        return cls(sock)

    async def _streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._stream is None:
            self._stream = await asyncio.open_unix_connection(sock=self._sock, limit=LINE_LIMIT)
        return self._stream

    async def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        reader, writer = await self._streams()
        writer.write(encode(message))
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT)
        if not line:
            raise HandoverError("the running agent closed the handover connection")
        reply = decode(line)
        if "error" in reply:
            raise HandoverError(str(reply["error"]))
        return reply

    async def hello(self) -> int:
        """Announce this agent; returns the running agent's pid."""
        reply = await self._ask({"op": "hello", "pid": os.getpid()})
        self.pid = int(reply["pid"])
        return self.pid

    async def freeze(self) -> int:
        """Ask the running agent to stop writing to the kernel; returns its pid."""
        reply = await self._ask({"op": "freeze", "pid": os.getpid()})
        self.pid = int(reply["pid"])
        return self.pid

    async def took_over(self) -> None:
        await self._ask({"op": "took_over"})

    async def lost(self) -> None:
        """Returns when the running agent's end closes (it exited); cancel it before asking."""
        reader, _ = await self._streams()
        with contextlib.suppress(OSError):
            while await reader.read(LINE_LIMIT):
                pass

    def close(self) -> None:
        if self._stream is not None:
            self._stream[1].close()
        else:
            self._sock.close()


class HandedBuckets(NamedTuple):
    """What a successor gets from ``fetch_buckets``."""

    fd: int  # the bucket table
    pid: int  # the agent that answered, in its own PID namespace (for the log)
    exit_fd: int  # a pidfd of that agent, readable once it has exited (``ExitWatch``); or -1
    why: str = ""  # why there is no pidfd


def fetch_buckets(name: bytes, layout: int, timeout: float = BUCKETS_TIMEOUT) -> HandedBuckets:
    """The rate-limit table of the agent holding ``name`` for a successor that reads table
    ``layout``, with a pidfd of that agent. Blocking, on a connection of its own, so a late or
    garbled answer cannot disturb the handover's; HandoverError says why there is none."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        line, fds = b"", []
        try:
            sock.connect(name)
            sock.sendall(encode({"op": "buckets", "layout": layout}))
            while not line.endswith(b"\n") and len(line) < LINE_LIMIT:
                data, got, _, _ = socket.recv_fds(sock, LINE_LIMIT, 4)
                fds += got
                if not data:
                    break
                line += data
        except OSError as e:
            for fd in fds:
                os.close(fd)
            raise HandoverError(f"the running agent did not hand over its buckets: {e}") from e
        try:
            fd, pid = _bucket_reply(line, fds, layout)
        except HandoverError:
            for fd in fds:
                os.close(fd)
            raise
        try:
            return HandedBuckets(fd, pid, _peer_pidfd(sock, pid))
        except OSError as e:
            return HandedBuckets(fd, pid, -1, str(e))


# getsockopt: a pidfd of the process at the other end of a Unix socket (Linux 6.5; Python's
# socket module has no name for it yet).
SO_PEERPIDFD = 77


def _peer_pidfd(sock: socket.socket, pid: int | None = None) -> int:
    """A pidfd of the agent at the other end of ``sock`` (which says it is ``pid``, if given):
    from the kernel (``SO_PEERPIDFD``), whatever PID namespace that agent runs in (a
    DaemonSet's old and new pods have one each); before Linux 6.5, ``pidfd_open`` of the pid
    the kernel's credentials of the peer name here (``SO_PEERCRED``: 0 for a process of
    another PID namespace), if it is the pid the agent says."""
    with contextlib.suppress(OSError):
        return int(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    seen = int(struct.unpack("3i", creds)[0])
    if seen == 0 or (pid is not None and seen != pid):
        raise OSError(
            f"the kernel has no SO_PEERPIDFD (Linux < 6.5) and sees the agent as pid {seen}, "
            f"not {pid}: another PID namespace"
        )
    return os.pidfd_open(seen)


def _successor_pidfd(sock: socket.socket) -> int:
    """A pidfd of the successor that asked for the buckets on ``sock``, or -1 (logged)."""
    try:
        return _peer_pidfd(sock)
    except OSError as e:
        log.warning("cannot watch the agent that takes the rate-limit buckets for its exit: %s", e)
        return -1


def _bucket_reply(line: bytes, fds: list[int], layout: int) -> tuple[int, int]:
    if not line.endswith(b"\n"):
        raise HandoverError(f"the running agent's answer to buckets was cut short: {line[:80]!r}")
    reply = decode(line)
    if "error" in reply:
        raise HandoverError(f"the running agent answered: {reply['error']}")
    pid = reply.get("pid")
    if reply.get("layout") != layout or not isinstance(pid, int) or len(fds) != 1:
        raise HandoverError(
            f"the running agent's answer to buckets is not one table of layout {layout}: "
            f"{line[:80]!r} with {len(fds)} descriptor(s)"
        )
    os.set_inheritable(fds[0], False)
    return fds[0], pid


class ExitWatch:
    """Says once that another agent's process has ended, however it ended (an exit, SIGKILL, a
    crash): its pidfd (``HandedBuckets.exit_fd``, owned from here on) turns readable then, and
    names that process even if its pid is reused later; one that has ended already fires as
    soon as ``start`` runs. It waits in the loop at no cost until it fires."""

    def __init__(self, pidfd: int, gone: Callable[[], None]) -> None:
        self._gone = gone
        self._fd = pidfd
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Call ``gone`` from the running loop once the process has ended."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._ended)

    def _ended(self) -> None:
        self.close()
        self._gone()

    def close(self) -> None:
        """Stop watching (also after it fired)."""
        if self._fd < 0:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1


def who(name: bytes, timeout: float = 2.0) -> dict[str, Any] | None:
    """``{"pid", "phase"}`` of the agent holding ``name``, or None (blocking; for the lab)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(name)
            sock.sendall(encode({"op": "who"}))
            line = sock.makefile("rb").readline(LINE_LIMIT)
        except OSError:
            return None
    return decode(line) if line else None
