"""The main process's side of ``--workers N``: start, feed, ask and restart the workers.

Each worker gets one socket of each listener group (``open_listener_groups``), inherited at
``exec`` together with its end of a fresh ``socketpair``; the main process keeps every listener
open, so a worker's death never shrinks a reuseport group: connections the kernel queues on the
dead worker's socket meanwhile wait there for its successor, which inherits the same sockets.
Every worker also inherits the descriptor of the node's rate-limit table
(``agent.policy.sharedbuckets``), which the main process keeps open for the agent's life.
Over the channel the main process sends the configuration and the full state (``setup``) and
every certificate its identity manager holds, then every state commit (``state``) and every
certificate change (``certificate``: renewed or dropped, ``agent.workers.certs``), answers
certificate requests, and asks the workers for what the admin API and ``/metrics`` show
(``gather``).

A worker that exits while the agent is not draining is started again after a backoff (0.1 s,
doubling up to 5 s; back to 0.1 s after it ran 10 s), counted in
``nodemesh_worker_restarts_total{worker}``, and reported by readiness as ``workers: worker N
down`` until its successor says it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from agent.base.component import Component
from agent.base.constants import Listener
from agent.base.metrics import counter
from agent.config import AgentConfig
from agent.identity.certs import WorkloadCertificate
from agent.identity.manager import CertificateObserver
from agent.policy.sharedbuckets import BucketTable, create_table
from agent.state import Snapshot, StateStore
from agent.workers import replica
from agent.workers.certs import CertificateFeed, Identities
from agent.workers.channel import Channel, ChannelClosed, RemoteError
from agent.workers.wire import Note, WireError

log = logging.getLogger(__name__)

RESTARTS = counter(
    "nodemesh_worker_restarts_total",
    "Worker processes started again after they exited while the agent was not draining.",
    ["worker"],
)
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
STABLE_SECONDS = 10.0
GATHER_TIMEOUT = 5.0
STOP_MARGIN = 5.0  # after --drain-seconds, how long a draining worker may take before SIGKILL


@dataclass(eq=False)
class _Handle:
    index: int
    sockets: list[socket.socket]
    proc: subprocess.Popen[bytes] | None = None
    channel: Channel | None = None
    up: bool = False
    pid: int | None = None
    restarts: int = 0
    synced: int = -1  # the state version its setup carried
    outbox: asyncio.Queue[Note] = field(default_factory=asyncio.Queue)


class ManagedIdentities(Identities, Protocol):
    """The identity manager as the supervisor uses it: certificates and their changes."""

    observers: list[CertificateObserver]


class SpliceMaps(Protocol):
    """The same-node splice's maps (``agent.datapath.splice.KernelSplice``)."""

    def fds(self) -> list[int]: ...


class Workers(Component):
    name = "workers"

    def __init__(
        self,
        config: AgentConfig,
        store: StateStore,
        groups: Mapping[Listener, list[socket.socket]],
        identities: ManagedIdentities,
        splice: SpliceMaps | None = None,
        buckets: BucketTable | None = None,
    ) -> None:
        self._config = config
        # --splice: the kernel's splice maps, inherited by every worker (``--splice-fds``)
        self._splice_fds = splice.fds() if splice is not None else []
        # The rate-limit buckets of the node, shared by every worker (``--ratelimit-fd``); kept
        # open here so that a restarted worker maps the same table. After an upgrade, the
        # predecessor agent's table (``buckets``, checked): the two agents share it.
        self._buckets_fd = create_table() if buckets is None else buckets.fd
        self._store = store
        self._identities = identities
        self._certs = CertificateFeed(identities)
        self._handles = [
            _Handle(i, [groups[slot][i] for slot in Listener]) for i in range(config.workers)
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self._draining = False
        self._unsubscribe: Callable[[], None] | None = None

    # -- Component ---------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def changed(snapshot: Snapshot, kinds: frozenset[str]) -> None:
            loop.call_soon_threadsafe(self._forward, snapshot, kinds)

        self._unsubscribe = self._store.subscribe(changed)
        self._identities.observers.append(self._certificate_changed)
        self._tasks = [
            asyncio.create_task(self._supervise(h), name=f"worker-{h.index}") for h in self._handles
        ]

    def not_ready(self) -> list[str]:
        return [f"workers: worker {h.index} down" for h in self._handles if not h.up]

    def begin_drain(self) -> None:
        self._draining = True
        for h in self._handles:
            h.outbox.put_nowait(Note("drain"))

    async def stop(self) -> None:
        self._draining = True
        deadline = self._config.drain_seconds + STOP_MARGIN
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), deadline)
        for h in self._handles:
            if h.proc is not None and h.proc.poll() is None:
                log.warning("worker %d (pid %d) did not drain in time: killed", h.index, h.pid)
                h.proc.kill()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._certificate_changed in self._identities.observers:
            self._identities.observers.remove(self._certificate_changed)
        if self._buckets_fd >= 0:
            os.close(self._buckets_fd)
            self._buckets_fd = -1

    @property
    def buckets_fd(self) -> int:
        """The shared table's descriptor, for a successor agent (``Agent`` hands it over)."""
        if self._buckets_fd < 0:
            raise ValueError("the workers stopped: their bucket table is closed")
        return self._buckets_fd

    # -- what the admin API and /metrics read ------------------------------------------------
    def describe(self) -> list[dict[str, object]]:
        return [
            {"worker": h.index, "pid": h.pid, "up": h.up, "restarts": h.restarts}
            for h in self._handles
        ]

    @property
    def count(self) -> int:
        return len(self._handles)

    def serving(self) -> list[int]:
        """The workers that said they serve and whose channel is open."""
        return [h.index for h in self._handles if h.up and h.channel is not None]

    async def call(
        self, index: int, kind: str, args: object = None, timeout: float = GATHER_TIMEOUT
    ) -> object:
        channel = self._handles[index].channel
        if channel is None:
            raise ChannelClosed(f"worker {index} is not running")
        return await channel.call(kind, args, timeout=timeout)

    async def gather(
        self, kind: str, args: object = None, timeout: float = GATHER_TIMEOUT
    ) -> dict[int, object]:
        """Each serving worker's answer to ``kind`` (workers that fail to answer are left out
        and logged: a dying worker must not break a scrape)."""
        live = [h for h in self._handles if h.up and h.channel is not None]

        async def ask(h: _Handle) -> object:
            assert h.channel is not None
            return await h.channel.call(kind, args, timeout=timeout)

        answers = await asyncio.gather(*(ask(h) for h in live), return_exceptions=True)
        out: dict[int, object] = {}
        for h, answer in zip(live, answers, strict=True):
            if isinstance(answer, (ChannelClosed, RemoteError, TimeoutError)):
                log.warning("worker %d did not answer %s: %s", h.index, kind, answer)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                out[h.index] = answer
        return out

    # -- per worker ----------------------------------------------------------------------------
    def _forward(self, snapshot: Snapshot, kinds: frozenset[str]) -> None:
        delta = None
        for h in self._handles:
            if h.channel is None or snapshot.version <= h.synced:
                continue
            delta = delta or replica.changes_of(snapshot, kinds)
            h.outbox.put_nowait(Note("state", delta))

    def _certificate_changed(self, spiffe_id: str, cert: WorkloadCertificate | None) -> None:
        """The identity manager's observer: every running worker gets the change, in order
        with the state (a worker not running gets the current set when it starts)."""
        note = self._certs.changed(spiffe_id, cert)
        for h in self._handles:
            if h.channel is not None:
                h.outbox.put_nowait(note)

    async def _supervise(self, h: _Handle) -> None:
        backoff = BACKOFF_FIRST
        while True:
            started = time.monotonic()
            try:
                code = await self._run_once(h)
            except OSError as e:  # out of processes or descriptors: retried like an exit
                log.error("cannot start worker %d: %s", h.index, e)
                code = None
            if self._draining:
                log.info("worker %d exited (%s)", h.index, code)
                return
            if time.monotonic() - started >= STABLE_SECONDS:
                backoff = BACKOFF_FIRST
            h.restarts += 1
            RESTARTS.labels(worker=str(h.index)).inc()
            log.error(
                "worker %d (pid %s) exited with status %s; starting it again in %.1fs",
                h.index, h.pid, code, backoff,
            )  # fmt: skip
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            if self._draining:
                return

    async def _run_once(self, h: _Handle) -> int | None:
        """Start worker ``h``, feed it until its channel closes; its exit status."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [s.fileno() for s in h.sockets]
        argv = [
            sys.executable, "-m", "agent.workers.worker",
            "--index", str(h.index),
            "--control-fd", str(child.fileno()),
            "--listener-fds", ",".join(map(str, fds)),
            "--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel()),
            "--ratelimit-fd", str(self._buckets_fd),
        ]  # fmt: skip
        if self._splice_fds:
            argv += ["--splice-fds", ",".join(map(str, self._splice_fds))]
        try:
            h.proc = subprocess.Popen(
                argv,
                pass_fds=[child.fileno(), *fds, *self._splice_fds, self._buckets_fd],
                stdin=subprocess.DEVNULL,
            )
        except OSError:
            parent.close()
            raise
        finally:
            child.close()
        h.pid = h.proc.pid
        h.outbox = asyncio.Queue()
        channel = h.channel = Channel(parent, self._serve, lambda k, a: self._note(h, k, a))
        channel.start()
        snapshot = self._store.snapshot()
        h.synced = snapshot.version
        h.outbox.put_nowait(Note("setup", (self._config, replica.full_state(snapshot))))
        for note in self._certs.current():
            h.outbox.put_nowait(note)
        if self._draining:
            h.outbox.put_nowait(Note("drain"))
        sender = asyncio.create_task(self._send(h, channel), name=f"worker-{h.index}-send")
        try:
            await channel.closed.wait()
        finally:
            h.up = False
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            await channel.close()
            h.channel = None
        proc = h.proc
        return await asyncio.to_thread(proc.wait)

    async def _send(self, h: _Handle, channel: Channel) -> None:
        while True:
            note = await h.outbox.get()
            try:
                await channel.send(note)
            except ChannelClosed:
                return
            except WireError as e:  # a bug: this worker's state now lags the main process's
                log.error("worker %d: %s", h.index, e)

    def _note(self, h: _Handle, kind: str, args: object) -> None:
        if kind == "up":
            h.up = True
            log.info("worker %d serving (pid %s)", h.index, args)
        else:
            log.warning("unknown note %r from worker %d", kind, h.index)

    async def _serve(self, kind: str, args: object) -> object:
        if kind == "certificate":
            return await self._certs.answer(args)
        raise ValueError(f"the main process answers certificate calls, not {kind!r}")
