"""An exhausted outgoing queue budget over real TLS sockets on loopback: many tunnels from
node1's client pod to node2's pod, which accepts them and reads nothing, with node1's queue
budget at the smallest ``--hbone-queue-budget`` allows (2 MiB).

Why the source's queues fill: node2 holds at most a small stream window per tunnel (64 KiB
here) and the kernel what the pod's socket and node2's socket to it buffer; beyond that node2's
windows close and node1 queues what its relays read from the client. The client writes each
tunnel more than all of that, sized from the kernel's own numbers (the pod's receive buffer as
the kernel reports it, node2's send buffer at its ``tcp_wmem`` maximum): a fixed few MiB can all
land in kernel buffers on loopback and leave the proxy holding nothing. Eight HBONE
connections (two streams each) together would queue far more than the budget.

What must hold: node1's queued bytes (its accounting, checked at every change, and the metric)
stay within the bound ``QueueBudget`` states, ``nodemesh_hbone_writes_stalled_total`` grows, and
once the pod reads again every tunnel's bytes arrive complete and in order. No timing in the
assertions: the waits only wait for states (with a generous cap for a broken run).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import socket
from collections.abc import Callable

import pytest

from agent.base.metrics import REGISTRY
from agent.proxy.budget import MIN_QUEUE_BUDGET, QUEUE_FLOOR, HboneBudget
from agent.proxy.h2wire import KIB, MIB, HboneSettings
from agent.proxy.hbone_limits import MAX_WRITE, OUT_BUDGET, with_stream_window
from agent.telemetry.agentmetrics import AgentCollector, AgentSources
from tests.integration.proxy.mesh import CLIENT, SERVER, Mesh, mesh_test
from tests.integration.proxy.test_hbone_queue_loopback import peak_committed

pytestmark = pytest.mark.root

TUNNELS = 16
STREAMS_PER_CONNECTION = 2  # node1 dials TUNNELS / 2 HBONE connections
CONNECTIONS = TUNNELS // STREAMS_PER_CONNECTION
STREAM_WINDOW = 64 * KIB  # node2's receive windows: it holds little, node1 queues the rest
POD_RCVBUF = 64 * KIB  # asked of the pod's socket; the kernel reports what it allows
CHUNK = 256 * KIB


def bound() -> int:
    """``QueueBudget``'s invariant for node1."""
    return MIN_QUEUE_BUDGET + MAX_WRITE + 2 * QUEUE_FLOOR * CONNECTIONS


def stalled_total() -> float:
    return REGISTRY.get_sample_value("nodemesh_hbone_writes_stalled_total") or 0.0


def queued_metric(budget: HboneBudget) -> float:
    """``nodemesh_hbone_buffer_bytes{kind="queued"}`` as a scrape would read it."""
    for family in AgentCollector(AgentSources(hbone_budget=budget.snapshot)).collect():
        if family.name == "nodemesh_hbone_buffer_bytes":
            return sum(s.value for s in family.samples if s.labels["kind"] == "queued")
    raise AssertionError("no nodemesh_hbone_buffer_bytes family")


def tunnel_size(pod_rcvbuf: int) -> int:
    """More than node2 and the kernel can hold for one tunnel whose pod does not read: the
    pod's receive buffer, node2's send buffer to it (autotuned up to ``tcp_wmem``'s maximum),
    node2's stream window; plus more than node1 may queue for one stream (its stream's high
    water and a write), so that the tunnels together ask far more than the budget."""
    with open("/proc/sys/net/ipv4/tcp_wmem") as wmem:
        wmem_max = int(wmem.read().split()[2])
    return pod_rcvbuf + wmem_max + STREAM_WINDOW + OUT_BUDGET


def chunk_of(tag: int, index: int) -> bytes:
    """The ``index``-th chunk of tunnel ``tag``: distinct per tunnel and per position, so a
    lost, repeated or reordered chunk changes the digest."""
    head = tag.to_bytes(4) + index.to_bytes(4)
    return (head * (CHUNK // len(head)))[:CHUNK]


class StalledPod:
    """node2's pod: accepts every tunnel and reads nothing until ``read`` is set, then reads
    each connection to its end and keeps its length and digest. Raw sockets, so nothing reads
    ahead in user space (an asyncio stream would buffer up to 128 KiB per connection)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Fixed before listen, so every accepted socket has it and the kernel does not grow
        # it (autotuning would, up to ``tcp_rmem``'s maximum: 32 MiB per tunnel here).
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, POD_RCVBUF)
        self.sock.bind((SERVER, 0))
        self.sock.listen(128)
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])
        self.read = asyncio.Event()
        self.got: list[asyncio.Task[tuple[int, str]]] = []
        self.rcvbuf = 0
        self._accepting = asyncio.create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            conn.setblocking(False)
            self.rcvbuf = max(self.rcvbuf, conn.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
            self.got.append(asyncio.create_task(self._drain(conn)))

    async def _drain(self, conn: socket.socket) -> tuple[int, str]:
        loop = asyncio.get_running_loop()
        digest, n = hashlib.sha256(), 0
        with conn:
            await self.read.wait()
            while data := await loop.sock_recv(conn, MIB):
                digest.update(data)
                n += len(data)
        return n, digest.hexdigest()

    def close(self) -> None:
        self._accepting.cancel()
        for task in self.got:
            task.cancel()
        self.sock.close()


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for a state (the cap only ends a broken run)."""
    for _ in range(2400):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


async def write_tunnel(mesh: Mesh, port: int, tag: int, size: int) -> tuple[int, str]:
    _, writer = await mesh.connect(CLIENT, (SERVER, port))
    digest, n, index = hashlib.sha256(), 0, 0
    while n < size:
        chunk = chunk_of(tag, index)
        writer.write(chunk)
        await writer.drain()  # the client's own buffer stays small: TCP stops it
        digest.update(chunk)
        n += len(chunk)
        index += 1
    writer.write_eof()
    return n, digest.hexdigest()


@mesh_test
async def test_an_exhausted_queue_budget_holds_pods_that_stop_reading_and_loses_nothing(
    mesh: Mesh,
) -> None:
    budget = HboneBudget(None, queue_limit=MIN_QUEUE_BUDGET)
    mesh.node1.core.hbone_budget = budget  # the source agent's, before any connection
    queue = budget.queue
    one = mesh.node1.core.settings
    hbone = dataclasses.replace(HboneSettings(), max_concurrent_streams=STREAMS_PER_CONNECTION)
    mesh.node1.core.settings = dataclasses.replace(one, hbone=hbone)
    two = mesh.node2.core.settings
    mesh.node2.core.settings = dataclasses.replace(two, hbone=with_stream_window(STREAM_WINDOW))
    pod = StalledPod()
    stalled_before = stalled_total()
    # The kernel doubles the receive buffer a socket asks for (socket(7)), at most.
    size = tunnel_size(POD_RCVBUF * 2)
    writers: list[asyncio.Task[tuple[int, str]]] = []
    with peak_committed(queue) as peak:
        try:
            for tag in range(TUNNELS):
                writers.append(asyncio.create_task(write_tunnel(mesh, pod.port, tag, size)))
            await until(lambda: len(pod.got) == TUNNELS, "every tunnel reached the pod")
            assert pod.rcvbuf <= POD_RCVBUF * 2  # what ``tunnel_size`` counted the pod for
            await until(
                lambda: queue.committed > MIN_QUEUE_BUDGET and stalled_total() > stalled_before,
                "node1's queues filled the budget and its writers stalled",
            )
            assert len(mesh.node1.pool.connections()) == CONNECTIONS
            assert queue.connections == CONNECTIONS
            assert queue.stalled > 0
            assert queued_metric(budget) == queue.committed
            assert peak[0] <= bound() < CONNECTIONS * OUT_BUDGET

            pod.read.set()  # the pod reads again
            sent = await asyncio.wait_for(asyncio.gather(*writers), 110)
            got = await asyncio.wait_for(asyncio.gather(*pod.got), 110)
            assert sorted(got) == sorted(sent)  # every tunnel's bytes, complete and in order
            assert all(n >= size for n, _ in sent)
            assert peak[0] <= bound()
        finally:
            for writer in writers:
                writer.cancel()
            pod.close()
