"""The outgoing queue budget (``agent.proxy.budget.QueueBudget``) and the tunnel's use of it.

What must hold: what all HBONE connections of a process hold for their peers (queued for
windows, framed, in the transport's buffer) never exceeds the queue budget plus
``MAX_WRITE`` plus twice ``QUEUE_FLOOR`` per connection; a connection whose peer reads keeps
moving while other peers read nothing; a writer that may not write is called back, so nothing
deadlocks; and once every peer reads, every byte arrives, in order.

The tunnel tests drive ``TunnelStream`` as the callback relay does (``write_room``, then
``write_now`` of at most that much) over an in-memory transport that buffers what the client
writes until the test lets the peer read it (``deliver``), with asyncio's high-water mark, so a
peer that does not read its socket pauses the transport as a TLS transport would.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proxy import hbone_events as ev
from agent.proxy.budget import QUEUE_FLOOR, HboneBudget, QueueBudget
from agent.proxy.h2wire import KIB, MIB
from agent.proxy.hbone import HboneConnection
from agent.proxy.hbone_limits import MAX_WRITE, OUT_BUDGET, with_stream_window
from agent.proxy.tunnel import HboneProtocol, TunnelStream
from tests.unit.proxy.memtransport import MemoryTransport

LIMIT = 512 * KIB


def bound(budget: QueueBudget, connections: int) -> int:
    """``QueueBudget``'s documented invariant."""
    assert budget.limit is not None
    return budget.limit + MAX_WRITE + 2 * QUEUE_FLOOR * connections


# ---- the accounting alone --------------------------------------------------------------------


def test_a_connection_may_write_within_the_limit_or_within_its_floor() -> None:
    budget = QueueBudget(LIMIT)
    a, b = budget.open(), budget.open()
    a.set(LIMIT)
    assert a.may_grow() and b.may_grow()  # within the limit: everyone
    a.set(LIMIT + 1)
    assert not a.may_grow()  # over it, holding more than its floor
    b.set(QUEUE_FLOOR)
    assert b.may_grow()  # over it, but within its own floor
    b.set(QUEUE_FLOOR + 1)
    assert not b.may_grow()
    assert budget.committed == LIMIT + QUEUE_FLOOR + 2
    assert budget.stalled == 2  # each counted once while it waits


def test_a_waiting_connection_is_called_back_once_the_total_is_within_the_limit() -> None:
    budget = QueueBudget(LIMIT)
    woken: list[str] = []
    a = budget.open(lambda: woken.append("a"))
    b = budget.open(lambda: woken.append("b"))
    a.set(LIMIT)
    b.set(QUEUE_FLOOR + 1)
    assert not b.may_grow() and not a.may_grow()
    a.set(LIMIT - 1)  # still over: nobody
    assert woken == []
    a.set(LIMIT - QUEUE_FLOOR - 1)  # within: both, oldest first, once
    assert woken == ["b", "a"]
    a.set(0)
    assert woken == ["b", "a"]


def test_closing_gives_the_charge_back_once_and_stops_waiting() -> None:
    budget = QueueBudget(LIMIT)
    woken: list[int] = []
    a, b = budget.open(), budget.open(lambda: woken.append(1))
    a.set(LIMIT)
    b.set(2 * QUEUE_FLOOR)
    assert not b.may_grow()
    b.close()
    b.close()
    a.close()
    assert (budget.committed, budget.connections, woken) == (0, 0, [])
    assert b.may_grow()  # a closed account asks nothing of the budget


ACTION = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 3)),
    st.tuples(st.just("read"), st.integers(0, 3), st.integers(1, 512 * KIB)),
    st.tuples(st.just("toggle"), st.integers(0, 3)),
)


@settings(max_examples=200, deadline=None)
@given(st.integers(2 * MIB // 4, 4 * MIB), st.lists(ACTION, max_size=80))
def test_random_interleavings_of_the_accounting_stay_bounded_and_drain(
    limit: int, actions: list[tuple[Any, ...]]
) -> None:
    """A model of four relays: each writes what ``write_room`` allows while ``may_grow`` (a
    waiting one is called back), its peer reads (when it reads at all) any amount. A queue is
    first in, first out, so it is the range of bytes written and not yet read (order: the
    tunnel tests below)."""
    budget = QueueBudget(limit)
    woken = [0] * 4
    accounts = [budget.open(lambda c=c: woken.__setitem__(c, woken[c] + 1)) for c in range(4)]
    written, arrived = [0] * 4, [0] * 4
    reading = [False] * 4
    target = 4 * MIB

    def write(c: int) -> None:
        if written[c] < target and accounts[c].may_grow():
            room = MAX_WRITE if accounts[c].budget_within() else QUEUE_FLOOR
            written[c] += min(room, target - written[c])
            accounts[c].set(written[c] - arrived[c])

    def read(c: int, n: int) -> None:
        arrived[c] += min(n, written[c] - arrived[c])
        accounts[c].set(written[c] - arrived[c])

    for action in actions:
        if action[0] == "write":
            write(action[1])
        elif action[0] == "read" and reading[action[1]]:
            read(action[1], action[2])
        elif action[0] == "toggle":
            reading[action[1]] = not reading[action[1]]
        assert budget.committed == sum(a.charge for a in accounts)
        assert budget.committed <= bound(budget, 4)
    # Every peer reads from now on: each relay gets to write again and everything arrives.
    for _ in range(10_000):
        if arrived == [target] * 4:
            break
        for c in range(4):
            write(c)
            read(c, written[c] - arrived[c])
            assert budget.committed <= bound(budget, 4)
    else:
        raise AssertionError("no progress: a writer waits for a budget nobody frees")
    assert budget.committed == 0


# ---- the tunnel ------------------------------------------------------------------------------


class HeldTransport(MemoryTransport):
    """What the client writes waits here until ``deliver`` (the peer reads its socket); paused
    above the high-water mark and resumed at a quarter of it, as asyncio's transports do."""

    def __init__(self, peer: asyncio.Protocol, owner: HboneProtocol) -> None:
        super().__init__(peer)
        self.owner = owner
        self.buffer = bytearray()
        self.high = 64 * KIB
        self.paused = False

    def write(self, data: Any) -> None:
        if not self.closing:
            self.buffer += data
            if len(self.buffer) > self.high and not self.paused:
                self.paused = True
                self.owner.pause_writing()

    def deliver(self, n: int | None = None) -> None:
        n = len(self.buffer) if n is None else n
        chunk = bytes(self.buffer[:n])
        del self.buffer[:n]
        if chunk:
            self.peer.data_received(chunk)
        if self.paused and len(self.buffer) <= self.high // 4:
            self.paused = False
            self.owner.resume_writing()

    def get_write_buffer_size(self) -> int:
        return len(self.buffer)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = high or self.high


class Got:
    """The peer's pod (a ``Sink``): takes everything while it reads (the peer's windows stay
    open), nothing while it does not (they close: the agent queues for them)."""

    def __init__(self, reading: bool) -> None:
        self.data = bytearray()
        self.reading = reading

    def send(self, data: bytes) -> int:
        if not self.reading:
            return 0
        self.data += data
        return len(data)


class Peer:
    """One client HBONE connection of the agent under test and the peer's end of it; the
    peer's pods read or not (``pods_read``), and the peer reads its socket only in ``read``.
    Its windows are small (64 KiB per stream) so that closed windows show in a small test."""

    def __init__(self, budget: HboneBudget, *, pods_read: bool = True) -> None:
        self.got: dict[int, Got] = {}

        def on_request(proto: HboneProtocol, event: ev.TunnelRequested) -> None:
            got = self.got[event.stream_id] = Got(pods_read)
            proto.streams[event.stream_id].deliver_directly(got)
            proto.codec.respond(event.stream_id, 200)
            proto.flush()

        self.client = HboneProtocol(HboneConnection(client_side=True, budget=budget))
        self.server = HboneProtocol(
            HboneConnection(client_side=False, settings=with_stream_window(64 * KIB)),
            on_request=on_request,
        )
        self.wire = HeldTransport(self.server, self.client)
        back = MemoryTransport(self.client)
        self.wire.other, back.other = back, self.wire  # closing one end closes the other
        self.server.connection_made(back)
        self.client.connection_made(self.wire)

    def read_everything(self) -> None:
        """The peer reads its socket, and its pods read what it queued for them."""
        self.wire.deliver()
        for sid, got in self.got.items():
            got.reading = True
            stream = self.server.streams.get(sid)
            if stream is not None:
                stream.write_queued(got.send)

    def held(self) -> int:
        """What the agent holds for this peer, measured (not the accounting)."""
        codec = self.client.codec
        return codec.queued + codec.unsent() + self.wire.get_write_buffer_size()


async def pump() -> None:
    for _ in range(4):
        await asyncio.sleep(0)


async def opened(peer: Peer, streams: int) -> list[TunnelStream]:
    """``streams`` tunnels on ``peer`` (the CONNECTs and 200s cross while the peer reads)."""
    tasks = [asyncio.ensure_future(peer.client.open("10.0.0.2:80", None)) for _ in range(streams)]
    while not all(t.done() for t in tasks):
        await pump()
        peer.wire.deliver()
    return [t.result() for t in tasks]


def payload(tag: int, size: int) -> bytes:
    return bytes((tag * 7 + i) % 251 for i in range(251)) * (size // 251)


class Writer:
    """The pod side of one stream, written as the callback relay does."""

    def __init__(self, stream: TunnelStream, data: bytes) -> None:
        self.stream, self.data, self.at = stream, data, 0

    def step(self) -> None:
        room = self.stream.write_room()
        if room and self.at < len(self.data):
            chunk = self.data[self.at : self.at + room]
            self.stream.write_now(chunk)
            self.at += len(chunk)
            if self.at == len(self.data):
                self.stream.write_eof()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_peers_that_do_not_read_hold_no_more_than_the_queue_budget() -> None:
    """Two peers that read their sockets but whose pods do not (their windows close), one
    that does not read its socket, and one that reads everything: the three hold no more than
    the bound together, although each of the first two alone would hold its connection's cap
    (``OUT_BUDGET``, a write more than the budget here); the reading one moves 3 MiB meanwhile;
    once the three read, every byte arrives intact."""

    async def main() -> None:
        budget = HboneBudget(None, queue_limit=LIMIT)
        queue = budget.queue
        peers = [Peer(budget, pods_read=False) for _ in range(2)] + [Peer(budget), Peer(budget)]
        writers = []
        for p, peer in enumerate(peers):
            for s, stream in enumerate(await opened(peer, 3)):
                writers.append((peer, Writer(stream, payload(p * 3 + s, MIB))))
        stalled, reading = peers[:3], peers[3]
        peak = 0
        for _ in range(2000):
            for _peer, writer in writers:
                writer.step()
            await pump()
            reading.wire.deliver()
            for peer in stalled[:2]:
                peer.wire.deliver()  # these read their sockets; their pods read nothing
            measured = sum(p.held() for p in peers)
            assert measured <= queue.committed <= bound(queue, 4)
            peak = max(peak, measured)
            if all(w.at == len(w.data) for peer, w in writers if peer is reading):
                break
        assert all(w.at == len(w.data) for peer, w in writers if peer is reading)
        assert all(w.at < len(w.data) for peer, w in writers if peer is not reading)
        assert sum(p.held() for p in stalled) > LIMIT  # the budget, not the writers, stopped
        assert queue.stalled > 0
        assert peak <= bound(queue, 4) < 2 * OUT_BUDGET

        for _ in range(5000):  # every peer reads now
            for _peer, writer in writers:
                writer.step()
            await pump()
            for peer in peers:
                peer.read_everything()
            assert queue.committed <= bound(queue, 4)
            if all(w.at == len(w.data) for _p, w in writers) and not any(p.held() for p in peers):
                break
        await pump()
        for p, peer in enumerate(peers):
            for s, sid in enumerate(sorted(peer.got)):
                assert peer.got[sid].data == payload(p * 3 + s, MIB)
        for peer in peers:
            peer.wire.close()
        assert (queue.committed, queue.connections) == (0, 0)

    run(main())


STEP = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 5)),
    st.tuples(st.just("read"), st.integers(0, 2), st.integers(1, 256 * KIB)),
    st.tuples(st.just("pods"), st.integers(0, 2)),
    st.tuples(st.just("pump"), st.just(0)),
)


@settings(max_examples=15, deadline=None)
@given(st.lists(STEP, max_size=60))
def test_random_interleavings_through_the_tunnel_stay_bounded_and_deliver_everything(
    steps: list[tuple[Any, ...]],
) -> None:
    """Three connections of two streams each, writes, partial reads of its socket by each
    peer, its pods reading everything so far, and loop turns, in any order (pods read nothing
    otherwise: the windows close too): after every step what the agent holds (measured and
    accounted) is within the bound; then every peer reads, and every byte arrives in order."""

    async def main() -> None:
        budget = HboneBudget(None, queue_limit=LIMIT)
        queue = budget.queue
        peers = [Peer(budget, pods_read=False) for _ in range(3)]
        writers = []
        for p, peer in enumerate(peers):
            for s, stream in enumerate(await opened(peer, 2)):
                writers.append(Writer(stream, payload(p * 2 + s, 512 * KIB)))
        for step in steps:
            if step[0] == "write":
                writers[step[1]].step()
            elif step[0] == "read":
                peers[step[1]].wire.deliver(step[2])
            elif step[0] == "pods":
                peers[step[1]].read_everything()
                for got in peers[step[1]].got.values():
                    got.reading = False
            else:
                await pump()
            measured = sum(p.held() for p in peers)
            assert measured <= queue.committed <= bound(queue, 3)
        for _ in range(5000):
            for writer in writers:
                writer.step()
            await pump()
            for peer in peers:
                peer.read_everything()
            assert queue.committed <= bound(queue, 3)
            if all(w.at == len(w.data) for w in writers) and not any(p.held() for p in peers):
                break
        await pump()
        for p, peer in enumerate(peers):
            for s, sid in enumerate(sorted(peer.got)):
                assert peer.got[sid].data == payload(p * 2 + s, 512 * KIB)

    run(main())


def test_a_connection_counts_from_its_transport_to_its_loss_only() -> None:
    """A protocol whose TLS handshake fails never gets ``connection_made`` nor
    ``connection_lost``: it must not stay counted (it was, when the account opened with it)."""

    async def main() -> None:
        budget = HboneBudget(None, queue_limit=LIMIT)
        HboneProtocol(HboneConnection(client_side=True, budget=budget))  # handshake failed
        assert budget.queue.connections == 0
        peer = Peer(budget)
        assert budget.queue.connections == 1
        peer.wire.close()
        assert (budget.queue.connections, budget.queue.committed) == (0, 0)

    run(main())
