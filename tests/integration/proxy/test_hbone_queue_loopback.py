"""The HBONE outgoing queue budget over real TLS sockets on loopback: a peer opens many streams
over several HBONE connections to a pod that sends a lot, and reads none of it (its windows
close), so the agent's relays queue for it. What the agent holds for that peer, by its own
accounting, by the metric and measured on its connections, stays within the queue budget plus
``MAX_WRITE`` plus twice ``QUEUE_FLOOR`` per connection, although each connection alone would
queue its cap (``OUT_BUDGET``); once the peer reads, every byte arrives intact."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import Iterator

import pytest

from agent.proxy import budget as budget_module
from agent.proxy.budget import QUEUE_FLOOR, HboneBudget, QueueBudget
from agent.proxy.h2wire import KIB, MIB
from agent.proxy.hbone_limits import MAX_WRITE, OUT_BUDGET, with_stream_window
from agent.proxy.pool import PoolKey
from agent.proxy.tunnel import HboneProtocol, TunnelStream
from agent.telemetry.agentmetrics import AgentCollector, AgentSources
from tests.integration.proxy.mesh import CLIENT, CLIENT_ID, SERVER, SERVER_ID, Mesh, mesh_test

pytestmark = pytest.mark.root

QUEUE_LIMIT = 2 * MIB
CONNECTIONS = 8
STREAMS = 4  # per connection
PAYLOAD = MIB  # per stream: more than the peer's windows (64 KiB per stream) and a queue take


def payload(tag: int) -> bytes:
    head = tag.to_bytes(8)
    return head + bytes((tag + i) % 251 for i in range(251)) * ((PAYLOAD - 8) // 251)


def bound(queue: QueueBudget, connections: int) -> int:
    return QUEUE_LIMIT + MAX_WRITE + 2 * QUEUE_FLOOR * connections


def queued_metric(budget: HboneBudget) -> float:
    """``nodemesh_hbone_buffer_bytes{kind="queued"}`` as a scrape would read it."""
    for family in AgentCollector(AgentSources(hbone_budget=budget.snapshot)).collect():
        if family.name == "nodemesh_hbone_buffer_bytes":
            return sum(s.value for s in family.samples if s.labels["kind"] == "queued")
    raise AssertionError("no nodemesh_hbone_buffer_bytes family")


def measured(protos: list[HboneProtocol]) -> int:
    """What the agent's connections hold for their peer, read off them (not the accounting)."""
    total = 0
    for proto in protos:
        size = proto.transport.get_write_buffer_size() if proto.transport is not None else 0
        total += proto.codec.queued + proto.codec.unsent() + size
    return total


async def settled(queue: QueueBudget) -> int:
    """The queue budget's total once it stopped changing (the relays wait)."""
    last, steady = -1, 0
    for _ in range(600):
        await asyncio.sleep(0.05)
        steady = steady + 1 if queue.committed == last else 0
        last = queue.committed
        if steady >= 10 and last > 0:
            break
    return last


async def read_all(stream: TunnelStream) -> bytes:
    data = bytearray()
    while (chunk := await stream.read()) is not None:
        data += chunk
        stream.consumed(len(chunk))
    return bytes(data)


@contextlib.contextmanager
def peak_committed(queue: QueueBudget) -> Iterator[list[int]]:
    """``[the most queue.committed reached]``, updated at every charge change of ``queue``'s
    accounts while inside (``QueueAccount.set`` wrapped, and restored on leaving)."""
    peak = [0]
    set_charge = budget_module.QueueAccount.set

    def recorded(account: budget_module.QueueAccount, n: int) -> None:
        set_charge(account, n)
        if account.budget is queue:
            peak[0] = max(peak[0], queue.committed)

    setattr(budget_module.QueueAccount, "set", recorded)  # noqa: B010 (restored below)
    try:
        yield peak
    finally:
        setattr(budget_module.QueueAccount, "set", set_charge)  # noqa: B010


@mesh_test
async def test_streams_a_peer_does_not_read_stay_within_the_queue_budget_and_arrive(
    mesh: Mesh,
) -> None:
    budget = HboneBudget(None, queue_limit=QUEUE_LIMIT)
    mesh.node2.core.hbone_budget = budget  # the sending agent's, before any connection
    queue = budget.queue
    # The peer (node1's dialled connections, as a hostile peer may dial them) grants small
    # windows, so they close after 64 KiB per stream and node2's relays queue the rest.
    settings = mesh.node1.core.settings
    mesh.node1.core.settings = dataclasses.replace(settings, hbone=with_stream_window(64 * KIB))
    tags = itertools.count()

    async def sends_a_lot(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload(next(tags)))
        await writer.drain()
        writer.close()

    with peak_committed(queue) as peak:
        port = mesh.app(SERVER, sends_a_lot)
        key = PoolKey(CLIENT_ID, SERVER_ID, SERVER, mesh.hbone_port)
        conns = [await mesh.node1._dial(key, lambda _p: None) for _ in range(CONNECTIONS)]
        streams = [
            await proto.open(f"{SERVER}:{port}", CLIENT) for proto in conns for _ in range(STREAMS)
        ]
        held = await settled(queue)
        agent = list(mesh.node2.inbound.connections)
        assert len(agent) == CONNECTIONS
        assert queue.connections == CONNECTIONS
        limit = bound(queue, CONNECTIONS)
        now = measured(agent)
        assert QUEUE_LIMIT < now <= held <= limit  # the budget, not the pod, stopped them
        assert peak[0] <= limit < CONNECTIONS * OUT_BUDGET
        assert queued_metric(budget) == held
        assert queue.stalled > 0

        readers = [asyncio.create_task(read_all(s)) for s in streams]
        got = await asyncio.wait_for(asyncio.gather(*readers), 60)
        assert sorted(got) == sorted(payload(tag) for tag in range(CONNECTIONS * STREAMS))
        assert peak[0] <= limit
        for proto in conns:
            assert proto.transport is not None
            proto.transport.close()
        for _ in range(600):
            if not mesh.node2.inbound.connections:
                break
            await asyncio.sleep(0.05)
        assert (queue.committed, queue.connections) == (0, 0)
