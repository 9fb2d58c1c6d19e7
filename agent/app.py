"""``nodemesh agent``: the node agent process and its wiring.

Theory of operation:
  1. Before the event loop starts (pyroute2 and BCC are synchronous): start the state source
     (it loads synchronously, then follows changes in its own thread), adopt
     or load the capture programs, open the transparent listeners, register them in the
     programs' SOCKMAP, and reconcile once. From then on, meshed pods' connections are captured.
  2. In the event loop (uvloop): accept captured connections and hand them to the connection
     handler (the node proxy; without a CA, plain passthrough), keep the
     datapath in step with state changes (in a worker thread, coalesced), run the plug-in
     components, and serve readiness on ``--ready-port`` from this same loop so that "ready"
     proves the loop turns.
  3. On SIGTERM/SIGINT: report not ready, close the listeners (their SOCKMAP entries vanish with
     them, so new SYNs of meshed pods fail closed until the next agent registers its own), give
     open connections ``--drain-seconds`` to finish, then exit 0. Programs, maps and filters stay
     pinned for the next agent; ``--uninstall`` removes them.
  4. Upgrades (``agent.handover``): an agent that finds another one running on its node starts
     beside it without touching the SOCKMAP, filters or ports, waits until its components are
     ready, then takes the node over (the old one stops writing to the kernel, the new one
     registers its listeners, reconciles and binds metrics/admin, then readiness). The old
     agent stops accepting a moment later and serves its established connections until SIGTERM
     drains it; a SIGTERM that arrives while a successor is still starting waits for the
     handover.
  5. With ``--workers N`` (N > 1) the accept loops and the node proxy run in N worker processes
     (``agent.workers``) on reuseport listener groups; this process keeps the rest, feeds them
     state and certificates, and restarts a worker that dies.

The parts: ``mesh_components()`` builds the identity manager and the node proxy (with a CA),
``connection_handler()`` picks what serves the listeners, and ``agent.wiring.observability``
adds metrics and the admin API over all of them. Each is an ``agent.base.component.Component``
(start, readiness reasons, begin drain, stop), driven in that order by ``Agent``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from agent import handover
from agent.acceptor import accept_forever, drain, serve_accepted
from agent.base import runtime
from agent.base.component import Component, StateSource
from agent.base.conncaps import ConnectionCaps, Gate, raise_descriptor_limit
from agent.base.constants import Listener
from agent.base.endpoint import HttpComponent
from agent.base.http import HttpServer, Request, Response
from agent.config import AgentConfig, ConfigError, add_arguments, from_args
from agent.datapath.datapath import Datapath, SpliceUnavailable, uninstall
from agent.datapath.listeners import open_listener_groups, open_listeners
from agent.datapath.programs import ProgramLoadError
from agent.datapath.splice import KernelSplice
from agent.sources.localfile import LocalFileError, LocalFileSource
from agent.state import Snapshot, StateStore
from agent.wiring import (
    connection_caps,
    count_in_proxy,
    local_pods,
    node_proxy,
    observability,
)

if TYPE_CHECKING:
    from agent.identity.component import IdentityComponent
    from agent.policy.ratelimit import Limiter
    from agent.policy.sharedbuckets import BucketTable
    from agent.proxy.component import ProxyComponent
    from agent.workers.supervisor import Workers

log = logging.getLogger(__name__)

RESYNC_SECONDS = 5.0
KUBE_SYNC_SECONDS = 120.0
# After a handover the old listeners stay open this long, so handshakes that were under way
# when the successor took the SYNs complete (a SYN-ACK retransmission comes after 1 s).
HANDSHAKE_GRACE_SECONDS = 2.0
TAKEOVER_LOG_SECONDS = 10.0


class ConnectionHandler(Protocol):
    """Serves one captured connection; ``listener`` says which port captured it. It may return
    a future the connection goes on in once the handler's task ended (a relay without a task:
    an idle connection then holds no task and no coroutine frames); the future owns ``conn``
    from then on, and cancelling it closes the connection (the drain's deadline does)."""

    async def handle(
        self, conn: socket.socket, listener: Listener
    ) -> asyncio.Future[None] | None: ...


class StartupError(RuntimeError):
    """The agent cannot start; the message says why and what to change."""


def open_source(config: AgentConfig, store: StateStore) -> StateSource:
    """The configured source, started: ``store`` holds the full state when this returns.

    The datapath's first reconcile must not see a partial state: it would delete the entries of
    pods not listed yet and let their traffic escape capture. So Kubernetes mode waits for the
    first full list of every resource (up to ``KUBE_SYNC_SECONDS``; meanwhile an adopted datapath
    keeps steering with the previous agent's entries).
    """
    source: StateSource
    if config.cluster_file is not None:
        source = LocalFileSource(config.cluster_file, store)
        try:
            source.start()
        except LocalFileError as e:
            raise StartupError(str(e)) from e
        return source
    from agent.sources.kube import KubeSource, api_client  # imports kubernetes: only here

    kubeconfig = str(config.kubeconfig) if config.kubeconfig else None
    try:
        api = api_client(kubeconfig=kubeconfig, in_cluster=config.in_cluster)
    except RuntimeError as e:
        raise StartupError(str(e)) from e
    kube = KubeSource(api, store, node=config.node)
    kube.start()
    deadline = time.monotonic() + KUBE_SYNC_SECONDS
    while not kube.wait_ready(timeout=5.0):
        if time.monotonic() > deadline:
            kube.stop()
            raise StartupError(
                f"the Kubernetes API did not list {kube.not_ready()} within "
                f"{KUBE_SYNC_SECONDS:.0f}s; check the API server address and the agent's RBAC"
            )
        log.info("waiting for the first list of %s from the Kubernetes API", kube.not_ready())
    return kube


def continued_buckets(name: bytes) -> tuple[BucketTable, handover.HandedBuckets] | None:
    """The rate-limit table of the agent this one replaces (holding ``name``) and what came
    with it (that agent's pid and pidfd), or None when this agent's buckets start full: logged
    either way, once. Never fails the start."""
    from agent.policy import sharedbuckets  # only at an upgrade: not in every agent's memory

    try:
        handed = handover.fetch_buckets(name, sharedbuckets.LAYOUT)
    except handover.HandoverError as e:
        log.warning("rate-limit buckets start full: %s", e)
        return None
    table = sharedbuckets.adopt(handed.fd, handed.pid)
    if table is None:
        if handed.exit_fd >= 0:
            os.close(handed.exit_fd)
        return None
    return table, handed


class _Limited(Protocol):
    limiter: Limiter  # what ``Core`` holds


class TablePeers:
    """The other agents that take from this single-process agent's bucket table: its
    predecessor until it exits, a successor it handed the table to until that one exits. Once
    the last of them has exited, back to in-process buckets at the table's levels
    (``leave_table``); one that cannot be watched keeps this agent on the table for its life
    (right, for the table's cost per limited request), said once."""

    def __init__(self, core: _Limited) -> None:
        self._core = core
        self._watches: set[handover.ExitWatch] = set()
        self._started = False
        self._for_life = False

    def watch(self, pidfd: int, who: str, why: str = "") -> None:
        """Count agent ``who`` (its ``pidfd``, owned from here on; -1: none, ``why``)."""
        if pidfd < 0:
            log.warning(
                "cannot watch %s for its exit (%s): rate limits stay on the shared bucket "
                "table for this agent's life",
                who,
                why,
            )
            self._for_life = True
            return
        w = handover.ExitWatch(pidfd, lambda: self._exited(w, who))
        self._watches.add(w)
        if self._started:
            w.start()

    def start(self) -> None:
        """Watch in the running loop (watches added later start at once)."""
        self._started = True
        for w in self._watches:
            w.start()

    def _exited(self, w: handover.ExitWatch, who: str) -> None:
        self._watches.discard(w)
        if not self._watches and not self._for_life:
            leave_table(self._core, who)

    def close(self) -> None:
        for w in self._watches:
            w.close()
        self._watches.clear()


def share_until_exit(
    core: _Limited, table: BucketTable, handed: handover.HandedBuckets
) -> TablePeers:
    """A single-process successor's buckets: ``core`` takes from its predecessor's ``table``
    for as long as that agent serves, draining included, so both take from the same buckets;
    once it has exited (``handed.exit_fd``), and any successor this agent handed the table to
    as well, from in-process buckets again (``TablePeers``; to start in the loop)."""
    from agent.policy import sharedbuckets

    core.limiter = sharedbuckets.SharedRateLimiter(table)
    peers = TablePeers(core)
    peers.watch(handed.exit_fd, f"agent {handed.pid}", handed.why)
    return peers


def leave_table(core: _Limited, who: str) -> None:
    """No other agent takes from the table ``core`` is on any more (``who`` was the last):
    back to in-process buckets at the table's levels."""
    from agent.policy import sharedbuckets

    limiter = sharedbuckets.unshare(core.limiter)
    if limiter is not core.limiter:
        core.limiter = limiter
        log.info("%s exited: rate-limit buckets in this process again, levels kept", who)


def mesh_components(
    config: AgentConfig, store: StateStore
) -> tuple[IdentityComponent | None, ProxyComponent | None]:
    """The identity manager and the node proxy, which needs its certificates; neither without
    a CA (``--ca-address``)."""
    if config.ca is None:
        return None, None
    from agent.identity.component import IdentityComponent

    identity = IdentityComponent(
        node=config.node,
        store=store,
        ca_address=config.ca.address,
        ca_root=config.ca.root,
        token_file=config.ca.token_file,
        server_name=config.ca.server_name,
        validity_seconds=config.ca.cert_ttl_seconds,
    )
    if config.workers > 1:
        return identity, None  # the workers run the proxy (agent.workers)
    proxy = node_proxy(config, store, identity.manager)
    forget = proxy.proxy.core.contexts.forget  # a dropped identity's key leaves OpenSSL too
    identity.manager.observers.append(lambda name, cert: forget(name) if cert is None else None)
    return identity, proxy


def connection_handler(proxy: ProxyComponent | None) -> ConnectionHandler:
    """What serves captured connections: the node proxy; without a CA, plain passthrough (no
    mTLS, no policy)."""
    if proxy is not None:
        return proxy
    from agent.proxy.passthrough import Passthrough

    return Passthrough()


class ReadinessServer:
    """``GET /healthz/ready``: 200 when nothing is pending, else 503 with a JSON list of what
    is not ready (served by ``agent.base.http``, like metrics and the admin API)."""

    def __init__(self, not_ready: Callable[[], list[str]]) -> None:
        self._not_ready = not_ready
        self._server = HttpServer(self._answer)

    async def start(self, port: int, host: str = "0.0.0.0") -> int:
        """Listen on ``host:port``; returns the bound port (``port=0`` picks one)."""
        return await self._server.start(host, port)

    async def stop(self) -> None:
        await self._server.stop()

    def _answer(self, request: Request) -> Response:
        if request.path != "/healthz/ready":
            return Response.json(404, {"error": "only /healthz/ready is served here"})
        if reasons := self._not_ready():
            return Response.json(503, {"ready": False, "not_ready": reasons})
        return Response.json(200, {"ready": True})


async def open_ports(
    ready: ReadinessServer, address: tuple[str, int], http: list[HttpComponent]
) -> None:
    """A successor's ports, readiness last. From the moment a port is bound here, new
    connections to it come to this agent, not to its predecessor (``newest_wins``). Readiness
    is 503 while metrics or the admin API are not listening, and each ``start`` yields to the
    loop: bound first, readiness would answer a probe that arrives in between with 503, and
    an upgrade would look like an outage to the kubelet. Bound last, the predecessor (ready)
    answers every probe until this agent is ready too."""
    for c in http:
        await c.start()
    await ready.start(address[1], address[0])


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        # a Kubernetes source's trust domain (--trust-domain); a cluster document sets its own
        self.store = StateStore(config.trust_domain)
        self.datapath = Datapath(config.datapath())
        self.source: StateSource | None = None
        self.listeners: dict[Listener, socket.socket] = {}
        self.identity, self.proxy = mesh_components(config, self.store)
        self.handler: ConnectionHandler = connection_handler(self.proxy)
        # What the accept loops admit (``agent.base.conncaps``); with --workers N, the workers'.
        self.caps: ConnectionCaps | None = None
        if config.workers <= 1:
            self.caps = connection_caps(config, passthrough=self.proxy is None)
            if self.proxy is not None:  # its refusals and HBONE streams counted there too
                count_in_proxy(self.caps, self.proxy)
        else:  # a flag the workers' limit cannot hold fails here, before they start
            config.connection_cap(raise_descriptor_limit())
        self.components: list[Component] = [c for c in (self.identity, self.proxy) if c]
        self.workers: Workers | None = None  # --workers N > 1: set by prepare()
        fanout = None
        if config.workers > 1:
            from agent.workers.views import WorkerViews

            fanout = WorkerViews(lambda: self.workers, config.node)
        # metrics and the admin API observe the rest (and, with --workers N, ask the workers)
        self.components += observability(self, fanout)
        self._connections: set[asyncio.Future[None]] = set()  # tasks, detached relays
        self._dirty = asyncio.Event()
        self._synced = False
        self._draining = False
        self._reconcile_error: str | None = None
        self._stop = asyncio.Event()
        self._ready = ReadinessServer(self.not_ready)
        self._accepting: list[asyncio.Task[None]] = []
        # Upgrades: the agent this one replaces (if one was running), and this agent's own
        # handover endpoint once it holds the node.
        self.predecessor: handover.Successor | None = None
        self._handover: handover.HandoverServer | None = None
        self._handover_sock: socket.socket | None = None
        self._release: asyncio.Task[None] | None = None
        # Single-process: the agents this one shares its rate-limit buckets with (an upgrade's).
        self._table_peers: TablePeers | None = None

    # -- before the loop -------------------------------------------------------------------
    def prepare(self) -> None:
        # First of all, so that a running agent knows at once that it is being replaced (a
        # SIGTERM it gets from now on waits for the takeover).
        name = handover.socket_name(self.config.pin_dir)
        self.predecessor = handover.Successor.find(name)
        continued = None
        if self.predecessor is None:
            self._handover_sock = handover.bind(name)
            if self._handover_sock is None:
                raise StartupError(
                    "another agent for this node is starting in this network namespace; "
                    "start one at a time"
                )
        elif self.proxy is not None or self.config.workers > 1:
            continued = continued_buckets(name)
        self.source = open_source(self.config, self.store)
        self.datapath.start()
        splice = self._splice()
        if self.config.workers > 1:
            self._start_workers(splice, continued[0] if continued is not None else None)
        else:
            if continued is not None and self.proxy is not None:
                self._table_peers = share_until_exit(self.proxy.proxy.core, *continued)
            if splice is not None and self.proxy is not None:
                self.proxy.use_splicer(splice)  # with workers, they build their own
            self.listeners = open_listeners(
                self.config.listeners, beside_another=self.predecessor is not None
            )
        if self.predecessor is None:
            self._take_datapath()

    def _splice(self) -> KernelSplice | None:
        """The kernel's splice maps for the proxy (``--splice``), or None, saying why not."""
        if not self.config.splice:
            return None
        if self.proxy is None and self.config.workers <= 1:
            log.warning("--splice: no node proxy without a CA (--ca-address): nothing to splice")
            return None
        try:
            splice = self.datapath.splice()
        except SpliceUnavailable as e:
            log.warning(
                "same-node splice unavailable: %s; same-node bytes are relayed in user space", e
            )
            return None
        log.info("same-node splice on: the kernel moves admitted same-node connections' bytes")
        return splice

    def _start_workers(self, splice: KernelSplice | None, buckets: BucketTable | None) -> None:
        """Listener groups for the workers; the first of each group goes in the SOCKMAP. The
        workers share ``buckets`` (the predecessor's table), else a new table."""
        from agent.workers.supervisor import Workers

        assert self.identity is not None  # config: --workers N > 1 needs a CA
        groups = open_listener_groups(
            self.config.listeners, self.config.workers, beside_another=self.predecessor is not None
        )
        self.listeners = {slot: group[0] for slot, group in groups.items()}
        self.workers = Workers(
            self.config, self.store, groups, self.identity.manager, splice, buckets
        )
        self.components.insert(0, self.workers)  # stopped (drained) before what it asks

    def _take_datapath(self) -> None:
        """New SYNs come here from now on; the maps and filters follow this agent's state."""
        self.datapath.register_listeners(self.listeners)
        self.datapath.reconcile(local_pods(self.store.snapshot(), self.config.node))
        self._synced = True

    # -- in the loop -----------------------------------------------------------------------
    def not_ready(self) -> list[str]:
        reasons = []
        if self._draining:
            reasons.append("agent: draining")
        if not self._synced:
            reasons.append("datapath: not reconciled")
        elif self._reconcile_error is not None:
            reasons.append(f"datapath: last reconcile failed: {self._reconcile_error}")
        if len(self.listeners) != len(Listener) or any(
            s.fileno() == -1 for s in self.listeners.values()
        ):
            ports = "/".join(str(p) for p in self.config.listeners.by_slot().values())
            reasons.append(f"listeners: not all of {ports} are open")
        if self.source is not None and not self.source.ready:
            reasons.append("state: not loaded")
        for c in self.components:
            reasons += c.not_ready()
        return reasons

    def degraded(self) -> list[str]:
        """Trouble that does not stop the agent from serving (a CA outage while certificates
        are still valid): shown in /status, never a readiness failure."""
        return [line for c in self.components for line in c.degraded()]

    def request_stop(self) -> None:
        """Drain and exit, as on SIGTERM (the admin API's ``POST /quitquitquit``)."""
        self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = self._stop
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if self._table_peers is not None:
            self._table_peers.start()

        def changed(_snapshot: Snapshot, _kinds: frozenset[str]) -> None:
            loop.call_soon_threadsafe(self._dirty.set)  # sources may write from any thread

        unsubscribe = self.store.subscribe(changed)
        http = [c for c in self.components if isinstance(c, HttpComponent)]
        self._accepting = [
            asyncio.create_task(self._accept_loop(slot, sock), name=f"accept-{slot.name}")
            for slot, sock in self.listeners.items()
            if self.workers is None  # else the workers accept
        ]
        if self.predecessor is None:
            await self._ready.start(self.config.ready_port)
        for c in self.components:
            if c not in http or self.predecessor is None:
                await c.start()
        if self.predecessor is not None:
            if not await self._take_over(self.predecessor, stop):
                return await self._finish([], unsubscribe, failed=False)
            await open_ports(self._ready, ("0.0.0.0", self.config.ready_port), http)
            await self._announce_taken_over(self.predecessor)
        await self._serve_handover()
        tasks = [asyncio.create_task(self._reconcile_loop(), name="datapath-reconcile")]
        runtime.settle_for_data_plane()
        log.info("agent %s ready", self.config.node)
        waiter = asyncio.create_task(stop.wait(), name="stop-signal")
        while True:
            watched = [t for t in [*tasks, *self._accepting] if not t.cancelled()]
            done, _ = await asyncio.wait([waiter, *watched], return_when=asyncio.FIRST_COMPLETED)
            failed = [t for t in done if t is not waiter and not t.cancelled() and t.exception()]
            if waiter in done or failed:
                break
        for t in failed:
            log.error("agent task %s failed: %r; shutting down", t.get_name(), t.exception())
        if self._handover is not None and not self._handover.settled.is_set():
            log.info("stop requested while another agent takes over: draining once it has")
            await self._handover.settled.wait()
        waiter.cancel()
        return await self._finish(tasks, unsubscribe, failed=bool(failed))

    async def _finish(
        self, tasks: list[asyncio.Task[None]], unsubscribe: Callable[[], None], *, failed: bool
    ) -> int:
        await self._drain([*tasks, *self._accepting])
        unsubscribe()
        await self._ready.stop()
        if self._handover is not None:
            await self._handover.stop()
        if self._table_peers is not None:
            self._table_peers.close()
        return 1 if failed else 0

    # -- upgrades (agent.handover) ---------------------------------------------------------
    def _pending_takeover(self) -> list[str]:
        """What must be ready before this agent takes the node from the running one."""
        reasons = []
        for c in self.components:
            if not isinstance(c, HttpComponent):
                reasons += c.not_ready()
        if self.source is not None and not self.source.ready:
            reasons.append("state: not loaded")
        return reasons

    async def _take_over(self, predecessor: handover.Successor, stop: asyncio.Event) -> bool:
        """Wait until ready, then take the node from the running agent; False if stopped."""
        try:
            pid: int | None = await predecessor.hello()
        except (OSError, handover.HandoverError, TimeoutError) as e:
            log.warning("the running agent did not answer (%s); taking over when ready", e)
            pid = None
        log.info(
            "agent %s: starting beside agent %s; taking over once ready", self.config.node, pid
        )
        lost = asyncio.create_task(predecessor.lost(), name="handover-predecessor")
        stopped = asyncio.create_task(stop.wait(), name="handover-stop")
        last_log = time.monotonic()
        while (pending := self._pending_takeover()) and not (lost.done() or stop.is_set()):
            if time.monotonic() - last_log >= TAKEOVER_LOG_SECONDS:
                last_log = time.monotonic()
                log.info("waiting for %s before taking over", "; ".join(pending))
            await asyncio.wait({lost, stopped}, timeout=0.2)
        for t in (lost, stopped):
            t.cancel()
        await asyncio.gather(lost, stopped, return_exceptions=True)
        if stop.is_set():
            log.info("stopped before taking over: the running agent keeps the node")
            predecessor.close()
            return False
        try:
            await predecessor.freeze()
        except (OSError, handover.HandoverError, TimeoutError) as e:
            log.warning("the agent being replaced did not freeze (%s): taking over anyway", e)
        await asyncio.to_thread(self._take_datapath)
        return True

    async def _announce_taken_over(self, predecessor: handover.Successor) -> None:
        try:
            await predecessor.took_over()
        except (OSError, handover.HandoverError, TimeoutError) as e:
            log.warning("could not tell the replaced agent it is replaced: %s", e)
        predecessor.close()
        name = handover.socket_name(self.config.pin_dir)
        for _ in range(50):  # the old agent released the name before answering
            if (sock := handover.bind(name)) is not None:
                self._handover_sock = sock
                break
            await asyncio.sleep(0.1)
        else:
            log.error("cannot hold the handover name: the next upgrade will not find this agent")
        log.info("agent %s: took over from agent %s", self.config.node, predecessor.pid)

    async def _serve_handover(self) -> None:
        if self._handover_sock is None:
            return
        actions: handover.Actions = {
            "freeze": lambda: asyncio.to_thread(self.datapath.freeze),
            "release": self._handed_over,
            "resume": self._take_back,
        }
        state = handover.Predecessor(os.getpid())
        self._handover = handover.HandoverServer(
            self._handover_sock, state, actions, self._buckets_for_successor
        )
        await self._handover.start()

    def _buckets_for_successor(self, layout: int, successor: int) -> int:
        """The rate-limit table a successor continues (``handover.Buckets``): the workers'
        shared one, the one this agent still shares with its own predecessor, or this
        process's buckets copied into one that it uses from now on, until the successor (its
        pidfd ``successor``) and any predecessor have exited (``TablePeers``)."""
        from agent.policy import sharedbuckets

        if layout != sharedbuckets.LAYOUT:
            raise ValueError(
                f"the successor reads bucket table layout {layout}, this agent writes layout "
                f"{sharedbuckets.LAYOUT} (agents of different versions)"
            )
        if self.workers is not None:
            fd = os.dup(self.workers.buckets_fd)
            if successor >= 0:
                os.close(successor)  # the workers stay on their table whatever
            return fd
        if self.proxy is None:
            raise ValueError("this agent enforces no rate limits (no node proxy without a CA)")
        core = self.proxy.proxy.core
        fd, core.limiter = sharedbuckets.share(core.limiter)
        if self._table_peers is None:
            self._table_peers = TablePeers(core)
            self._table_peers.start()  # in the loop: the handover server calls this
        self._table_peers.watch(successor, "the agent that took the buckets", "no pidfd")
        return fd

    async def _handed_over(self) -> None:
        self._release = asyncio.create_task(self._stop_accepting(), name="handed-over")

    async def _stop_accepting(self) -> None:
        """After the handover: no new connection reaches this agent's listeners or ports any
        more; close them, keep the established connections until SIGTERM drains them."""
        await asyncio.sleep(HANDSHAKE_GRACE_SECONDS)
        for t in self._accepting:
            t.cancel()
        for sock in self.listeners.values():
            sock.close()
        await self._ready.stop()
        for c in self.components:
            if isinstance(c, HttpComponent):
                await c.stop()
        log.info(
            "agent handed over: listeners and ports closed, %d connection(s) still served",
            len(self._connections),
        )

    async def _take_back(self) -> None:
        await asyncio.to_thread(self.datapath.resume)
        await asyncio.to_thread(self.datapath.register_listeners, self.listeners)
        self._dirty.set()

    async def _drain(self, tasks: list[asyncio.Task[None]]) -> None:
        self._draining = True
        if self._release is not None:
            await self._release  # handshakes under way at the handover complete first
        log.info(
            "agent draining: %d open connection(s), up to %.1fs",
            len(self._connections),
            self.config.drain_seconds,
        )
        for sock in self.listeners.values():
            sock.close()  # its SOCKMAP entry goes with it: new SYNs now fail closed
        for c in self.components:
            c.begin_drain()  # the proxy: GOAWAY to its peers
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        cut = await drain(self._connections, self.config.drain_seconds)
        if cut:
            log.info("agent: closed %d connection(s) still open at the drain deadline", cut)
        for c in self.components:
            await c.stop()
        if self.source is not None:
            self.source.stop()
        self.datapath.close()

    async def _accept_loop(self, slot: Listener, sock: socket.socket) -> None:
        name = f"conn-{slot.name}"  # once per listener, not per connection
        gate = self.caps.gate(slot) if self.caps is not None else None

        def serve(conn: socket.socket) -> None:
            task = asyncio.create_task(self._serve(conn, slot, gate), name=name)
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

        await accept_forever(sock, serve, listener=slot.name, gate=gate)

    async def _serve(self, conn: socket.socket, slot: Listener, gate: Gate | None = None) -> None:
        await serve_accepted(self.handler.handle, conn, slot, self._connections, gate)

    async def _reconcile_loop(self) -> None:
        """Apply state changes to the kernel, one pass at a time, in a worker thread; retry
        every few seconds as well, for pods whose interface appeared after their IP."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), RESYNC_SECONDS)
            self._dirty.clear()
            try:
                pods = local_pods(self.store.snapshot(), self.config.node)
                await asyncio.to_thread(self.datapath.reconcile, pods)
                self._reconcile_error = None
            except (OSError, LookupError) as e:  # netlink/bpf errors, a named uplink gone
                self._reconcile_error = str(e)
                log.error("datapath reconcile failed: %s; retrying in %.0fs", e, RESYNC_SECONDS)


def run_agent(args: argparse.Namespace) -> int:
    try:
        config = from_args(args)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    if args.uninstall:
        for item in uninstall(config.pin_dir, config.routing):
            log.info("removed %s", item)
        return 0
    try:
        agent = Agent(config)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    try:
        agent.prepare()
    except (StartupError, ProgramLoadError, LookupError, OSError) as e:
        log.error("agent cannot start: %s", e)
        return 1
    import uvloop

    return uvloop.run(agent.run())


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "agent",
        help="run the node agent (capture datapath, listeners, readiness)",
        description="Run the nodemesh node agent, or remove its kernel state with --uninstall.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run_agent)
