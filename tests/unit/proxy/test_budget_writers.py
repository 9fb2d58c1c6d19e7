"""Every writer into a tunnel keeps to the outgoing queue budget, not only the callback relay.

The relay reads its socket only as far as ``TunnelStream.write_room`` allows; the other writers
have whole messages in hand: a task awaiting ``TunnelStream.write`` (an outbox draining, an
HTTP/1.1 body, a mirror's copy), the HTTP/1.1 shells' callback writes (the destination's
``StreamDownstream``, the source's ``UpstreamSession``) and the HTTP/2 source's
(``h2outbound._outbox``). Each is driven here with messages of 1 MiB, four times what one write
may add, into streams whose peers' pods do not read (their windows close, so the agent queues
for them), on three connections sharing a small queue budget: what the agent holds stays within
the bound ``QueueBudget`` states after every step (before, each such write added its whole
message past the budget), writers are stalled, and once the peers read every byte arrives, in
order. The harness (an in-memory transport the test lets the peer read) is
``test_budget_queue``'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from agent.proxy.budget import HboneBudget
from agent.proxy.h2outbound import _outbox
from agent.proxy.h2wire import MIB
from agent.proxy.hbone_limits import MAX_WRITE
from agent.proxy.http_inbound import StreamDownstream
from agent.proxy.http_sessions import SessionKey, UpstreamSession
from agent.proxy.httpshell import Outbox
from agent.proxy.tunnel import TunnelStream
from tests.unit.proxy.test_budget_queue import LIMIT, Peer, bound, opened, payload, pump, run

MESSAGE = 4 * MAX_WRITE  # a whole message, as an HTTP shell or a task has it in hand
MESSAGES = 2  # per stream

# One message into a stream, as each writer does it; returns once the writer would take the
# next message (an outbox's owner does not read its source while the outbox is busy).
Send = Callable[[bytes], Awaitable[None]]


def task_writes(stream: TunnelStream) -> Send:
    return stream.write


def drained(box: Outbox, errors: list[Exception]) -> Send:
    async def send(data: bytes) -> None:
        box.send(data)
        while box.busy:
            await box.idle.wait()
        assert not errors

    return send


def destination_http1(stream: TunnelStream) -> Send:
    errors: list[Exception] = []
    down = StreamDownstream(stream)
    return drained(Outbox(down.try_write, down.write, lambda: None, errors.append), errors)


def source_http1(stream: TunnelStream) -> Send:
    errors: list[Exception] = []
    session = UpstreamSession(SessionKey("hbone", "10.0.0.1", "10.0.0.2", 80, ""), stream)
    return drained(Outbox(session.try_write, session.write, lambda: None, errors.append), errors)


def source_h2(stream: TunnelStream) -> Send:
    """The HTTP/2 source from its client's read callback (``write_some``)."""
    errors: list[Exception] = []
    return drained(_outbox(stream, lambda: None, errors.append, at_once=lambda: True), errors)


def source_h2_end_of_pass(stream: TunnelStream) -> Send:
    """The HTTP/2 source outside its client's read callback: ``try_write`` (flushed at the
    end of the loop's pass)."""
    errors: list[Exception] = []
    return drained(_outbox(stream, lambda: None, errors.append), errors)


WRITERS = [task_writes, destination_http1, source_http1, source_h2, source_h2_end_of_pass]


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.__name__)
def test_whole_messages_stay_within_the_queue_budget_and_arrive(
    writer: Callable[[TunnelStream], Send],
) -> None:
    async def main() -> None:
        budget = HboneBudget(None, queue_limit=LIMIT)
        queue = budget.queue
        peers = [Peer(budget, pods_read=False) for _ in range(3)]
        streams = [s for peer in peers for s in await opened(peer, 2)]
        data = [payload(i, MESSAGES * MESSAGE) for i in range(len(streams))]

        async def writes(i: int) -> None:
            send = writer(streams[i])
            for m in range(MESSAGES):
                await send(data[i][m * MESSAGE : (m + 1) * MESSAGE])

        tasks = [asyncio.ensure_future(writes(i)) for i in range(len(streams))]
        limit = bound(queue, len(peers))
        for _ in range(200):  # the peers read their sockets; their pods read nothing
            await pump()
            for peer in peers:
                peer.wire.deliver()
            assert sum(p.held() for p in peers) <= queue.committed <= limit
        assert sum(p.held() for p in peers) > LIMIT  # the budget, not the writers, stopped
        assert queue.stalled > 0
        assert not any(t.done() for t in tasks)

        for _ in range(5000):  # the pods read again
            await pump()
            for peer in peers:
                peer.read_everything()
            assert queue.committed <= limit
            if all(t.done() for t in tasks) and not any(p.held() for p in peers):
                break
        for t in tasks:
            t.result()
        got = [peer.got[sid].data for peer in peers for sid in sorted(peer.got)]
        assert got == data
        for peer in peers:
            peer.wire.close()
        assert (queue.committed, queue.connections) == (0, 0)

    run(main())


@pytest.mark.parametrize("method", ["write_some", "try_write"])
def test_a_callback_write_takes_at_most_the_room(method: str) -> None:
    """``write_some`` and ``try_write`` cut a message at ``write_room`` (the caller's outbox
    keeps the rest): one write never adds more than a relay's read would."""

    async def main() -> None:
        budget = HboneBudget(None, queue_limit=LIMIT)
        (stream,) = await opened(Peer(budget), 1)
        write = getattr(stream, method)
        assert stream.write_room() == MAX_WRITE
        assert write(bytes(MIB)) == MAX_WRITE
        assert stream.write_room() == 0  # the peer's window took 64 KiB: the rest is queued
        assert write(bytes(MIB)) == 0

    run(main())
