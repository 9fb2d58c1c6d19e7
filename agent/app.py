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
import signal
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from agent.acceptor import accept_forever
from agent.base.component import Component, StateSource
from agent.base.constants import Listener
from agent.base.http import HttpServer, Request, Response
from agent.config import AgentConfig, ConfigError, add_arguments, from_args
from agent.datapath.datapath import Datapath, uninstall
from agent.datapath.listeners import open_listeners
from agent.datapath.programs import ProgramLoadError
from agent.sources.localfile import LocalFileError, LocalFileSource
from agent.state import Snapshot, StateStore
from agent.wiring import local_pods, observability

if TYPE_CHECKING:
    from agent.identity.component import IdentityComponent
    from agent.proxy.component import ProxyComponent

log = logging.getLogger(__name__)

RESYNC_SECONDS = 5.0
KUBE_SYNC_SECONDS = 120.0


class ConnectionHandler(Protocol):
    """Serves one captured connection; ``listener`` says which port captured it."""

    async def handle(self, conn: socket.socket, listener: Listener) -> None: ...


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


def mesh_components(
    config: AgentConfig, store: StateStore
) -> tuple[IdentityComponent | None, ProxyComponent | None]:
    """The identity manager and the node proxy, which needs its certificates; neither without
    a CA (``--ca-address``)."""
    if config.ca is None:
        return None, None
    from agent.identity.component import IdentityComponent
    from agent.proxy.component import ProxyComponent
    from agent.proxy.core import Core, ProxySettings
    from agent.proxy.server import NodeProxy

    identity = IdentityComponent(
        node=config.node,
        store=store,
        ca_address=config.ca.address,
        ca_root=config.ca.root,
        token_file=config.ca.token_file,
        server_name=config.ca.server_name,
        validity_seconds=config.ca.cert_ttl_seconds,
    )
    # Loop protection: the ports this agent listens on, as configured (not the defaults).
    settings = ProxySettings(proxy_ports=config.own_ports())
    core = Core(node=config.node, store=store, identities=identity.manager, settings=settings)
    return identity, ProxyComponent(NodeProxy(core))


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


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.store = StateStore()
        self.datapath = Datapath(config.datapath())
        self.source: StateSource | None = None
        self.listeners: dict[Listener, socket.socket] = {}
        self.identity, self.proxy = mesh_components(config, self.store)
        self.handler: ConnectionHandler = connection_handler(self.proxy)
        self.components: list[Component] = [c for c in (self.identity, self.proxy) if c]
        self.components += observability(self)  # metrics and admin API observe the rest
        self._connections: set[asyncio.Task[None]] = set()
        self._dirty = asyncio.Event()
        self._synced = False
        self._draining = False
        self._reconcile_error: str | None = None
        self._stop = asyncio.Event()

    # -- before the loop -------------------------------------------------------------------
    def prepare(self) -> None:
        self.source = open_source(self.config, self.store)
        self.datapath.start()
        self.listeners = open_listeners(self.config.listeners)
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

        def changed(_snapshot: Snapshot, _kinds: frozenset[str]) -> None:
            loop.call_soon_threadsafe(self._dirty.set)  # sources may write from any thread

        unsubscribe = self.store.subscribe(changed)
        ready = ReadinessServer(self.not_ready)
        await ready.start(self.config.ready_port)
        tasks = [
            asyncio.create_task(self._reconcile_loop(), name="datapath-reconcile"),
            *(
                asyncio.create_task(self._accept_loop(slot, sock), name=f"accept-{slot.name}")
                for slot, sock in self.listeners.items()
            ),
        ]
        for c in self.components:
            await c.start()
        log.info("agent %s ready", self.config.node)
        waiter = asyncio.create_task(stop.wait(), name="stop-signal")
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in done if t is not waiter and not t.cancelled() and t.exception()]
        for t in failed:
            log.error("agent task %s failed: %r; shutting down", t.get_name(), t.exception())
        await self._drain(tasks)
        waiter.cancel()
        unsubscribe()
        await ready.stop()
        return 1 if failed else 0

    async def _drain(self, tasks: list[asyncio.Task[None]]) -> None:
        self._draining = True
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
        if self._connections:
            _, pending = await asyncio.wait(self._connections, timeout=self.config.drain_seconds)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if pending:
                log.info(
                    "agent: closed %d connection(s) still open at the drain deadline", len(pending)
                )
        for c in self.components:
            await c.stop()
        if self.source is not None:
            self.source.stop()
        self.datapath.close()

    async def _accept_loop(self, slot: Listener, sock: socket.socket) -> None:
        def serve(conn: socket.socket) -> None:
            task = asyncio.create_task(self._serve(conn, slot), name=f"conn-{slot.name}")
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

        await accept_forever(sock, serve, listener=slot.name)

    async def _serve(self, conn: socket.socket, slot: Listener) -> None:
        try:
            await self.handler.handle(conn, slot)
        except Exception:
            log.exception("handler failed on a %s connection", slot.name.lower())
        finally:
            conn.close()

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
    agent = Agent(config)
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
