"""The HBONE buffer budget over real TLS sockets on loopback: many streams over several HBONE
connections to a pod that does not read make the destination agent hold and promise no more
than its (small) budget plus HTTP/2's initial window per connection; the agent keeps serving a
new connection meanwhile; and once the pod reads, every byte arrives intact."""

from __future__ import annotations

import asyncio
import socket

import pytest

from agent.proxy import budget as budget_module
from agent.proxy.budget import FLOOR, HboneBudget
from agent.proxy.h2wire import MIB
from agent.proxy.pool import PoolKey
from agent.proxy.tunnel import HboneProtocol, TunnelStream
from tests.integration.proxy.mesh import CLIENT, CLIENT_ID, SERVER, SERVER_ID, Mesh, mesh_test

pytestmark = pytest.mark.root

BUDGET = 2 * MIB
CONNECTIONS = 4
STREAMS = 4  # per connection
PAYLOAD = 4 * MIB  # per stream: 64 MiB in all, more than the pod's sockets take


class SlowPod:
    """A pod app that accepts and reads nothing until ``reading`` is set, then reads each
    connection to its end; its sockets have small buffers, so the kernel takes little of what
    the agent writes."""

    def __init__(self) -> None:
        self.reading = asyncio.Event()
        self.got: dict[bytes, bytes] = {}

    def listen(self, mesh: Mesh) -> int:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by accepted ones
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((SERVER, 0))
        sock.listen(64)
        sock.setblocking(False)
        mesh._sockets.append(sock)
        mesh._tasks.append(asyncio.create_task(self._accept(sock, mesh)))
        return int(sock.getsockname()[1])

    async def _accept(self, sock: socket.socket, mesh: Mesh) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            mesh._sockets.append(conn)
            mesh._tasks.append(asyncio.create_task(self._read(conn)))

    async def _read(self, conn: socket.socket) -> None:
        """Raw socket reads: an asyncio stream would take 128 KiB ahead of its reader."""
        await self.reading.wait()
        loop = asyncio.get_running_loop()
        data = bytearray()
        while chunk := await loop.sock_recv(conn, 1 << 16):
            data += chunk
        self.got[bytes(data[:8])] = bytes(data)
        conn.close()


async def count_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A pod that reads everything and answers how many bytes that was."""
    writer.write(str(len(await reader.read())).encode())
    writer.close()


def payload(tag: int) -> bytes:
    head = tag.to_bytes(8)
    return head + bytes((tag + i) % 251 for i in range(251)) * ((PAYLOAD - 8) // 251)


async def send_all(stream: TunnelStream, data: bytes) -> None:
    for start in range(0, len(data), 64 * 1024):
        await stream.write(data[start : start + 64 * 1024])
    stream.write_eof()


async def settled(budget: HboneBudget) -> int:
    """What the budget holds once that stopped changing (the agent wrote what the pod's
    sockets take and everything else waits in the windows)."""
    last, steady = -1, 0
    for _ in range(600):
        await asyncio.sleep(0.05)
        held = int(budget.snapshot()["held"] or 0)
        steady = steady + 1 if held == last else 0
        last = held
        if steady >= 10 and held > 0:
            break
    return last


@mesh_test
async def test_many_stalled_streams_stay_within_the_budget_and_arrive_when_read(
    mesh: Mesh,
) -> None:
    budget = HboneBudget(BUDGET)
    mesh.node2.core.hbone_budget = budget  # the destination agent's, before any connection
    peak = [0]
    take = budget_module.Account.take

    def recorded(account: budget_module.Account, want: int) -> int:
        n = take(account, want)
        if account.budget is budget:
            peak[0] = max(peak[0], budget.committed)
        return n

    setattr(budget_module.Account, "take", recorded)  # noqa: B010 (a method, restored below)
    try:
        await scenario(mesh, budget, peak)
    finally:
        setattr(budget_module.Account, "take", take)  # noqa: B010


async def scenario(mesh: Mesh, budget: HboneBudget, peak: list[int]) -> None:
    pod = SlowPod()
    port = pod.listen(mesh)
    key = PoolKey(CLIENT_ID, SERVER_ID, SERVER, mesh.hbone_port)
    conns: list[HboneProtocol] = [
        await mesh.node1._dial(key, lambda _p: None) for _ in range(CONNECTIONS)
    ]
    sent: dict[bytes, bytes] = {}
    writers = []
    for c, proto in enumerate(conns):
        for s in range(STREAMS):
            data = payload(c * STREAMS + s)
            sent[data[:8]] = data
            stream = await proto.open(f"{SERVER}:{port}", CLIENT)
            writers.append(asyncio.create_task(send_all(stream, data)))
    held = await settled(budget)
    live = len(mesh.node2.inbound.connections)
    assert live == CONNECTIONS
    bound = BUDGET + FLOOR * live
    assert 0 < held <= budget.committed <= bound
    assert peak[0] <= bound
    assert budget.withheld > 0  # it was the budget, not the pod's sockets, that stopped them
    assert not all(w.done() for w in writers)

    # A new connection (node1's pool dials its own) is served while the budget is used up, and
    # moves more than HTTP/2's initial window: its floor is granted again as its pod reads.
    counter = mesh.app(SERVER, count_all)
    reader, writer = await mesh.connect(CLIENT, (SERVER, counter))
    writer.write(b"n" * (4 * FLOOR))
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 30) == str(4 * FLOOR).encode()
    writer.close()
    assert budget.committed <= BUDGET + FLOOR * len(mesh.node2.inbound.connections)

    pod.reading.set()
    await asyncio.wait_for(asyncio.gather(*writers), 60)
    for _ in range(600):
        if len(pod.got) == len(sent):
            break
        await asyncio.sleep(0.05)
    assert pod.got.keys() == sent.keys()
    assert all(pod.got[tag] == data for tag, data in sent.items())
    assert budget.committed <= BUDGET + FLOOR * len(mesh.node2.inbound.connections)

    # Closed connections give their whole charge back.
    for proto in conns:
        assert proto.transport is not None
        proto.transport.close()
    for _ in range(600):
        if len(mesh.node2.inbound.connections) == 1:  # the pool's, for the echo
            break
        await asyncio.sleep(0.05)
    (pooled,) = mesh.node2.inbound.connections
    assert budget.committed == pooled.codec.held_received + pooled.codec.promised
