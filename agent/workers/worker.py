"""One worker process of ``nodemesh agent --workers N``: ``python -m agent.workers.worker``.

Started by the main process (``agent.workers.supervisor``) with its control socket and its
three listening sockets inherited (``--control-fd``, ``--listener-fds``, in ``Listener``
order). It runs its own uvloop event loop with the accept loops and the node proxy
(``ProxyComponent``, exactly as a single-process agent builds it), a copy of the state
(``agent.workers.replica``) and certificates asked from the main process
(``agent.workers.certs``). It never talks to the Kubernetes API, the CA or the kernel's maps,
except the same-node splice's (``--splice``: their descriptors are inherited, ``--splice-fds``).
Its proxy takes rate-limit tokens from the table the agent's workers share (``--ratelimit-fd``,
``agent.policy.sharedbuckets``), so a RateLimitPolicy holds per node, not per worker.

What the main process may ask (calls on the channel): ``metrics`` (this worker's exposition:
its connections, requests, proxy counters, accept errors), ``connections`` (``/connections``
rows), ``routed`` (requests per route rule and backend, for ``/routes``), ``traffic``
(``/traffic``), ``requests`` (the
tap: ``agent.admin.tap``'s answer), ``status`` (PID, accepted connections per listener, open
connections, log levels, the certificates it holds), ``logging`` (a level change). Notes:
``state`` (a ``StateDelta``), ``certificate`` (one identity's certificate renewed or dropped),
``drain``; first of all ``setup`` (the ``AgentConfig`` and the full state), sent by the main
process as soon as the worker starts, so that every later ``state`` note applies on top of it
in order.

Stopping: a ``drain`` note, SIGTERM, or the main process going away (the channel closes) all
drain the same way as a single agent: stop accepting (the listeners stay open in the main
process: connections queued meanwhile wait for a successor), GOAWAY, ``--drain-seconds`` for
open connections, exit 0. SIGINT is ignored: a terminal's Ctrl-C reaches the main process,
which drains the workers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
from collections import Counter

from agent.acceptor import accept_forever, drain, serve_accepted
from agent.admin.tap import requests_view
from agent.base import runtime
from agent.base.component import Component
from agent.base.conncaps import Gate
from agent.base.constants import Listener
from agent.config import AgentConfig
from agent.policy.sharedbuckets import BucketTable, SharedRateLimiter
from agent.state import StateStore
from agent.telemetry import loglevel
from agent.telemetry.agentmetrics import AgentSources
from agent.telemetry.component import TelemetryComponent
from agent.telemetry.loglevel import levels, set_level
from agent.workers import replica
from agent.workers.certs import RemoteCertificates
from agent.workers.channel import Channel

log = logging.getLogger("agent.workers.worker")  # also when run as __main__


class Worker:
    def __init__(
        self,
        index: int,
        control: socket.socket,
        listeners: list[socket.socket],
        splice_fds: list[int] | None = None,
        buckets: BucketTable | None = None,
    ):
        self.index = index
        self.splice_fds = splice_fds  # --splice: the splice maps' descriptors, inherited
        self.buckets = buckets  # the node's rate-limit buckets (None: this process's own)
        self.listeners = dict(zip(Listener, listeners, strict=True))
        self.channel = Channel(control, self._serve, self._note)
        self.store = StateStore()
        self.accepted: Counter[str] = Counter()
        self._connections: set[asyncio.Future[None]] = set()  # tasks, detached relays
        self._stop = asyncio.Event()
        self.components: list[Component] = []
        self._config: AgentConfig | None = None
        self._setup = asyncio.Event()
        # before the channel runs: the main process pushes certificates right after the setup
        self.certs = RemoteCertificates(lambda spiffe: self.channel.call("certificate", spiffe))

    async def run(self) -> int:
        # the same proxy and admission a single-process agent runs
        from agent.wiring import connection_caps, count_in_proxy, node_proxy

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        self.channel.start()
        waits = [
            asyncio.create_task(self._setup.wait()),
            asyncio.create_task(self.channel.closed.wait()),
        ]
        await asyncio.wait(waits, return_when="FIRST_COMPLETED")
        for w in waits:
            w.cancel()
        if self._config is None:
            log.error("worker %d: the main process closed the channel before the setup", self.index)
            return 1
        config = self._config
        self.drain_seconds = config.drain_seconds
        self.proxy = node_proxy(config, self.store, self.certs)
        # Its own descriptor limit and connections: each worker admits for itself.
        self.caps = connection_caps(config, passthrough=False)
        count_in_proxy(self.caps, self.proxy)
        if self.splice_fds:
            from agent.datapath.splice import KernelSplice  # libbpf only, as the main process

            self.proxy.use_splicer(KernelSplice.from_fds(self.splice_fds))
        if self.buckets is not None:
            self.proxy.proxy.core.limiter = SharedRateLimiter(self.buckets)
        self.certs.forgotten.append(self.proxy.proxy.core.contexts.forget)
        self.node = config.node
        self.telemetry = TelemetryComponent(
            store=self.store,
            address=("127.0.0.1", 0),  # never started: the main process serves /metrics
            sources=AgentSources(
                rejections=lambda: self.proxy.connections.rejections,
                denials=lambda: self.proxy.connections.denials,
                rate_limited=lambda: self.proxy.connections.rate_limited,
                pool_size=self.proxy.pool_size,
                inbound_tunnels=self.proxy.inbound_tunnels,
                hbone_budget=self.proxy.hbone_budget,
            ),
            access_log_sample=config.access_log_sample,
        )
        self.proxy.connections.observers.append(self.telemetry.tcp)
        self.proxy.connections.request_observers.append(self.telemetry.http)
        self.components = [self.proxy]
        if config.traces is not None:
            from agent.telemetry.traces import Tracing

            tracing = Tracing(config.traces, self.store, config.node)
            self.telemetry.registry.register(tracing)
            self.proxy.connections.request_observers.append(tracing)
            if config.traces.tcp:
                self.proxy.connections.observers.append(tracing)
            self.components.append(tracing)
        for c in self.components:
            await c.start()
        accepting = [
            asyncio.create_task(self._accept_loop(slot, sock), name=f"accept-{slot.name}")
            for slot, sock in self.listeners.items()
        ]
        await self.channel.note("up", os.getpid())
        runtime.settle_for_data_plane()  # as the single-process agent does once it started
        log.info("worker %d (pid %d) serving", self.index, os.getpid())
        ends = [
            asyncio.create_task(self.channel.closed.wait()),
            asyncio.create_task(self._stop.wait()),
        ]
        done, _ = await asyncio.wait([*ends, *accepting], return_when="FIRST_COMPLETED")
        failed = [t for t in accepting if t in done and t.exception() is not None]
        for t in failed:
            log.error("worker %d: %s failed: %r", self.index, t.get_name(), t.exception())
        if ends[0] in done and not self._stop.is_set():
            log.warning("worker %d: the agent's main process is gone; draining", self.index)
        for task in [*ends, *accepting]:
            task.cancel()
        await asyncio.gather(*ends, *accepting, return_exceptions=True)
        await self._drain()
        return 1 if failed else 0

    async def _drain(self) -> None:
        for sock in self.listeners.values():
            sock.close()  # this process's copy only: the main process keeps the group open
        for c in self.components:
            c.begin_drain()
        await drain(self._connections, self.drain_seconds)
        for c in self.components:
            await c.stop()
        await self.channel.close()

    async def _accept_loop(self, slot: Listener, sock: socket.socket) -> None:
        key, name = slot.name, f"conn-{slot.name}"  # once per listener, not per connection
        gate = self.caps.gate(slot)

        def serve(conn: socket.socket) -> None:
            self.accepted[key] += 1
            task = asyncio.create_task(self._handle(conn, slot, gate), name=name)
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

        await accept_forever(sock, serve, listener=slot.name, gate=gate)

    async def _handle(self, conn: socket.socket, slot: Listener, gate: Gate | None = None) -> None:
        # as ``agent.app.Agent._serve``: the connection may go on without the task
        await serve_accepted(self.proxy.handle, conn, slot, self._connections, gate)

    # -- the channel -----------------------------------------------------------------------
    async def _serve(self, kind: str, args: object) -> object:
        if kind == "metrics":
            return await self.telemetry.render()
        if kind == "connections":
            return self.telemetry.tcp.live()
        if kind == "routed":
            return dict(self.proxy.routed())
        if kind == "traffic":
            return self.proxy.traffic(self.store.snapshot())
        if kind == "requests":
            assert isinstance(args, dict)
            response = await requests_view(self.telemetry.http.tap, self.node, args)
            return (response.status, json.loads(response.body))
        if kind == "status":
            return {
                "worker": self.index,
                "pid": os.getpid(),
                "accepted": dict(self.accepted),
                "connections": len(self._connections),
                "not_ready": [r for c in self.components for r in c.not_ready()],
                "levels": levels(),
                "certificates": self.certs.describe(),
            }
        if kind == "logging":
            assert isinstance(args, tuple)
            return set_level(*args)
        raise ValueError(
            "a worker answers metrics, connections, routed, traffic, requests, status and "
            "logging; "
            f"not {kind!r}"
        )

    def _note(self, kind: str, args: object) -> None:
        if kind == "setup":  # first of all notes: the configuration and the full state
            assert isinstance(args, tuple)
            self._config, state = args
            replica.apply(self.store, state)
            self._setup.set()
        elif kind == "state":
            assert isinstance(args, replica.StateDelta)
            replica.apply(self.store, args)
        elif kind == "certificate":
            self.certs.apply(args)
        elif kind == "drain":
            self._stop.set()
        else:
            log.warning("worker %d: unknown note %r from the main process", self.index, kind)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.workers.worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--listener-fds", required=True, help="outbound,inbound,hbone")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--splice-fds", help="--splice: links,credits,targets,sources map fds")
    parser.add_argument("--ratelimit-fd", type=int, help="the node's shared rate-limit buckets")
    args = parser.parse_args(argv)
    loglevel.configure(
        args.log_level, f"%(asctime)s %(levelname)s %(name)s[w{args.index}]: %(message)s"
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = socket.socket(fileno=args.control_fd)
    listeners = [socket.socket(fileno=int(fd)) for fd in args.listener_fds.split(",")]
    for sock in listeners:
        sock.setblocking(False)
    import uvloop

    splice_fds = [int(fd) for fd in args.splice_fds.split(",")] if args.splice_fds else None
    buckets = BucketTable(args.ratelimit_fd) if args.ratelimit_fd is not None else None
    return uvloop.run(Worker(args.index, control, listeners, splice_fds, buckets).run())


if __name__ == "__main__":
    raise SystemExit(main())
