"""The HBONE buffer budget (``agent.proxy.budget``) and the codec's use of it, without sockets.

What must hold: what all connections hold and promise never exceeds the budget plus HTTP/2's
initial window per connection; a connection whose pods read keeps moving while others' pods do
not; a pod that reads again gets everything; and nothing deadlocks once every consumer drains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proxy import hbone_events as ev
from agent.proxy.budget import FLOOR, MIN_GRANT, HboneBudget
from agent.proxy.h2wire import KIB
from agent.proxy.hbone import HboneConnection
from agent.proxy.hbone_limits import with_stream_window

SETTINGS = with_stream_window(64 * KIB)  # connection window 256 KiB
LIMIT = 512 * KIB  # two connection windows


# ---- the accounting alone --------------------------------------------------------------------


class Conn:
    held = 0


def test_a_grant_takes_what_fits_under_the_limit() -> None:
    budget = HboneBudget(4 * FLOOR)
    account = budget.open(Conn())
    assert budget.committed == FLOOR  # HTTP/2's initial window, granted without asking
    assert account.take(2 * FLOOR) == 2 * FLOOR
    assert account.take(5 * FLOOR) == FLOOR  # only the rest of the limit
    assert (budget.committed, budget.withheld) == (4 * FLOOR, 1)


def test_an_exhausted_budget_still_tops_a_connection_up_to_the_floor() -> None:
    budget = HboneBudget(2 * FLOOR)
    hog = budget.open(Conn())
    assert hog.take(FLOOR) == FLOOR  # the budget is used up
    other = budget.open(Conn())  # charged its initial window anyway: over the limit
    assert budget.free() == 0
    other.give_back(FLOOR)  # it forwarded everything it had
    assert other.take(10 * FLOOR) == FLOOR  # back to the floor, no further
    other.give_back(MIN_GRANT - 1)
    assert other.take(10 * FLOOR) == 0  # less than MIN_GRANT: withheld, not a tiny update
    assert budget.withheld == 2


def test_closing_gives_everything_back_once() -> None:
    budget = HboneBudget(8 * FLOOR)
    account = budget.open(Conn())
    account.take(3 * FLOOR)
    account.close()
    account.close()
    account.give_back(FLOOR)  # the owner finishes writing a chunk after the close
    assert budget.committed == 0
    assert account.take(FLOOR) == 0


class Waiter:
    """An account's owner that records its call-backs (it would schedule its ``take``)."""

    held = 0

    def __init__(self, budget: HboneBudget) -> None:
        self.account = budget.open(self)
        self.calls = 0
        self.account.on_room = self.called

    def called(self) -> bool:
        self.calls += 1
        return True  # it will take its turn


def test_freed_budget_goes_to_the_oldest_waiter_before_a_later_consumer() -> None:
    budget = HboneBudget(4 * FLOOR)
    hog, waiter, newcomer = Waiter(budget), Waiter(budget), Waiter(budget)
    assert hog.account.take(FLOOR) == FLOOR  # the budget is used up (4 x FLOOR committed)
    assert waiter.account.take(4 * FLOOR) == 0  # refused: it waits for freed budget
    assert budget.withheld == 1 and waiter.calls == 0
    hog.account.give_back(2 * FLOOR)  # a stalled pod reads: 2 x FLOOR free
    assert waiter.calls == 1  # called back (it takes on its own time) ...
    newcomer.account.give_back(FLOOR)  # ... while another connection consumes first:
    assert newcomer.account.take(4 * FLOOR) == FLOOR  # its floor only, not the freed budget
    assert waiter.account.take(4 * FLOOR) == 2 * FLOOR  # the freed budget is the waiter's
    assert budget.committed == 4 * FLOOR  # the limit
    # Cut short again, the waiter went to the back, behind the newcomer.
    assert list(budget._waiting) == [newcomer.account, waiter.account]
    assert waiter.calls == 1 and newcomer.calls == 0  # nothing free: nobody called


def test_a_closed_waiter_leaves_the_fifo_and_passes_its_turn_on() -> None:
    budget = HboneBudget(2 * FLOOR)
    first, second = Waiter(budget), Waiter(budget)
    assert first.account.take(FLOOR) == 0 and second.account.take(FLOOR) == 0
    first.account.give_back(FLOOR)  # its own bytes: exactly a floor free
    assert (first.calls, second.calls) == (1, 0)
    first.account.close()  # gone before taking its turn: the next waiter's
    assert second.calls == 1
    assert list(budget._waiting) == [second.account]
    assert second.account.take(FLOOR) == FLOOR  # all it wanted: it leaves the FIFO
    assert not budget._waiting


def test_a_waiter_that_wants_nothing_when_called_passes_its_turn_on() -> None:
    budget = HboneBudget(2 * FLOOR)
    first, second = Waiter(budget), Waiter(budget)
    first.account.take(FLOOR), second.account.take(FLOOR)
    first.account.give_back(FLOOR)
    assert first.account.take(0) == 0  # its streams ended meanwhile
    assert second.calls == 1 and list(budget._waiting) == [second.account]


# ---- codecs sharing a budget ---------------------------------------------------------------


@dataclass
class Link:
    """A client codec and a server codec whose receive side draws from ``budget``; the server
    records what it received per stream and consumes only when told to."""

    budget: HboneBudget
    client: HboneConnection = field(init=False)
    server: HboneConnection = field(init=False)
    received: dict[int, bytearray] = field(default_factory=dict)
    unread: dict[int, int] = field(default_factory=dict)  # received, not consumed

    def __post_init__(self) -> None:
        self.client = HboneConnection(client_side=True, settings=SETTINGS)
        self.server = HboneConnection(client_side=False, settings=SETTINGS, budget=self.budget)
        # Freed budget's call-back only records, as ``tunnel.HboneProtocol`` only schedules:
        # ``room`` runs it later (the test decides when).
        self.called = 0
        self.server.on_budget_room(self._called_back)
        self.pump()

    def _called_back(self) -> bool:
        self.called += 1
        return True

    def room(self) -> None:
        """The scheduled call-backs run: the connection takes its turn at freed budget."""
        if self.called:
            self.called = 0
            self.server.regrant()
            self.pump()

    def pump(self) -> None:
        while True:
            c2s, s2c = self.client.data_to_send(), self.server.data_to_send()
            if not c2s and not s2c:
                return
            for e in self.server.receive(c2s) if c2s else []:
                if isinstance(e, ev.TunnelRequested):
                    self.server.respond(e.stream_id, 200)
                elif isinstance(e, ev.DataReceived):
                    self.received.setdefault(e.stream_id, bytearray()).extend(e.data)
                    self.unread[e.stream_id] = self.unread.get(e.stream_id, 0) + len(e.data)
            if s2c:
                self.client.receive(s2c)

    def open(self) -> int:
        sid = self.client.open_tunnel("10.0.0.2:80")
        self.pump()
        self.client.receive(b"")  # the 200 arrived in pump
        return sid

    def send(self, sid: int, data: bytes) -> None:
        self.client.send(sid, data)
        self.pump()

    def read(self, sid: int, n: int | None = None) -> None:
        """The pod behind ``sid`` reads ``n`` bytes (all it was given: None)."""
        unread = self.unread.get(sid, 0)
        n = unread if n is None else min(n, unread)
        if n:
            self.unread[sid] = unread - n
            self.server.consumed(sid, n)
            self.pump()

    def unread_total(self) -> int:
        return sum(self.unread.values())

    @property
    def charge(self) -> int:
        return self.server.held_received + self.server.promised


def bound(budget: HboneBudget, links: list[Link]) -> int:
    return (budget.limit or 0) + FLOOR * len(links)


def test_pods_that_stop_reading_hold_no_more_than_the_budget_across_connections() -> None:
    budget = HboneBudget(LIMIT)
    links = [Link(budget) for _ in range(8)]
    for link in links:
        for _ in range(4):  # four stalled streams: each connection's whole window
            link.send(link.open(), b"x" * SETTINGS.connection_window)
    held = sum(link.server.held_received for link in links)
    assert budget.committed == sum(link.charge for link in links)
    assert held <= budget.committed <= bound(budget, links)
    assert held < 8 * SETTINGS.connection_window // 2  # unbudgeted, it would be all eight
    assert budget.withheld > 0


def test_a_connection_whose_pod_reads_moves_while_the_budget_is_exhausted() -> None:
    budget = HboneBudget(LIMIT)
    stalled = [Link(budget) for _ in range(4)]
    for link in stalled:
        for _ in range(4):
            link.send(link.open(), b"x" * SETTINGS.connection_window)
    assert budget.free() < MIN_GRANT  # nothing more to grant from it
    reader = Link(budget)
    sid = reader.open()
    payload = bytes(range(256)) * (4 * SETTINGS.connection_window // 256)
    reader.client.send(sid, payload)
    for _ in range(10_000):
        reader.pump()
        reader.read(sid)
        if not reader.client.buffered(sid):
            break
    assert bytes(reader.received[sid]) == payload
    assert budget.committed <= bound(budget, [*stalled, reader])


def test_a_pod_that_reads_again_gets_everything_intact() -> None:
    budget = HboneBudget(LIMIT)
    links = [Link(budget) for _ in range(4)]
    sent: dict[tuple[int, int], bytes] = {}
    for i, link in enumerate(links):
        for j in range(3):
            sid = link.open()
            sent[i, sid] = bytes([i * 16 + j]) * (2 * SETTINGS.connection_window)
            link.send(sid, sent[i, sid])
    assert budget.withheld > 0
    for _ in range(10_000):
        for link in links:
            for sid in list(link.unread):
                link.read(sid)
        if not any(link.client.queued for link in links):
            break
    for (i, sid), data in sent.items():
        assert bytes(links[i].received[sid]) == data


def test_a_closed_connection_returns_its_whole_charge() -> None:
    budget = HboneBudget(LIMIT)
    link = Link(budget)
    link.send(link.open(), b"x" * SETTINGS.connection_window)
    assert budget.committed > FLOOR
    link.server.close_budget()
    assert budget.committed == 0
    link.read(1)  # the relay writes what it still had: nothing is given back twice
    assert budget.committed == 0


# ---- random interleavings ----------------------------------------------------------------

ACTION = st.one_of(
    st.tuples(st.just("open"), st.integers(0, 3)),
    st.tuples(st.just("send"), st.integers(0, 3), st.integers(0, 7), st.integers(1, 300 * KIB)),
    st.tuples(st.just("read"), st.integers(0, 3), st.integers(0, 7), st.integers(1, 300 * KIB)),
    st.tuples(st.just("end"), st.integers(0, 3), st.integers(0, 7)),
    st.tuples(st.just("close"), st.integers(0, 3)),
    st.tuples(st.just("room"), st.integers(0, 3)),  # scheduled call-backs for freed budget run
)


@settings(max_examples=200, deadline=None)
@given(st.integers(2 * FLOOR, 4 * SETTINGS.connection_window), st.lists(ACTION, max_size=40))
def test_random_interleavings_stay_bounded_and_drain_completely(
    limit: int, actions: list[tuple[int | str, ...]]
) -> None:
    budget = HboneBudget(limit)
    links = [Link(budget) for _ in range(4)]
    closed: set[int] = set()
    streams: list[list[int]] = [[] for _ in links]
    sent: dict[tuple[int, int], bytearray] = {}
    for action in actions:
        kind, i = action[0], int(action[1])
        link = links[i]
        if i in closed:
            continue
        if kind == "open" and len(sent) < 16:
            sid = link.open()
            streams[i].append(sid)
            sent[i, sid] = bytearray()
        elif kind == "send" and streams[i]:
            sid = streams[i][int(action[2]) % len(streams[i])]
            data = bytes([len(sent[i, sid]) % 251]) * int(action[3])
            sent[i, sid] += data
            link.send(sid, data)
        elif kind == "read" and streams[i]:
            link.read(streams[i][int(action[2]) % len(streams[i])], int(action[3]))
        elif kind == "end" and streams[i]:  # the client half-closes: nothing more to send
            link.client.end_stream(streams[i].pop(int(action[2]) % len(streams[i])))
            link.pump()
        elif kind == "close":
            link.server.close_budget()
            closed.add(i)
        elif kind == "room":
            link.room()
        live = [link for j, link in enumerate(links) if j not in closed]
        assert budget.committed == sum(link.charge for link in live)
        assert budget.committed <= bound(budget, live)
        # Only live connections wait for freed budget, each once (a dict's keys).
        accounts = {link.server._flow._account for link in live}
        assert set(budget._waiting) <= accounts
    # Every pod drains: everything sent on a live connection arrives, in order, with no
    # window left closed.
    live_ids = [j for j in range(len(links)) if j not in closed]
    for _ in range(10_000):
        for j in live_ids:
            links[j].room()
            for sid in list(links[j].unread):
                links[j].read(sid)
        if not any(links[j].client.queued or links[j].unread_total() for j in live_ids):
            break
    for (j, sid), data in sent.items():
        if j in live_ids:
            assert bytes(links[j].received.get(sid, b"")) == bytes(data)
    assert budget.committed <= bound(budget, [links[j] for j in live_ids])


def _used_up(budget: HboneBudget) -> list[Link]:
    """Two connections whose pods stopped reading, each holding its whole window (four stream
    windows): ``LIMIT`` is two connection windows, so the budget is used up."""
    stalled = [Link(budget) for _ in range(2)]
    for link in stalled:
        for _ in range(4):
            link.send(link.open(), b"x" * SETTINGS.stream_window)
    return stalled


def test_a_refused_connection_gets_freed_budget_before_a_newcomer_that_consumes_later() -> None:
    budget = HboneBudget(LIMIT)
    stalled = _used_up(budget)
    waiter, newcomer = Link(budget), Link(budget)
    w, n = waiter.open(), newcomer.open()  # their grants are refused: held to the floor
    assert waiter.server.promised == newcomer.server.promised == FLOOR
    assert list(budget._waiting) == [waiter.server._flow._account, newcomer.server._flow._account]
    newcomer.send(n, b"y" * FLOOR)  # the newcomer's pod has its floor's worth to read
    for sid in (1, 3, 5):  # stalled pods read three stream windows: budget frees up
        stalled[0].read(sid)
    assert budget.free() >= MIN_GRANT
    assert waiter.called == 1 and newcomer.called == 0
    newcomer.read(n)  # the newcomer consumes before the waiter's call-back runs
    assert newcomer.server.promised == FLOOR  # its floor again, not the freed budget
    waiter.room()
    assert waiter.server.promised > 2 * FLOOR  # the freed budget went to the waiter
    assert waiter.server.promised + waiter.server.held_received <= 2 * SETTINGS.stream_window
    w2 = waiter.open()
    waiter.send(w, b"z" * SETTINGS.stream_window)  # and its peer may use it: two stream
    waiter.send(w2, b"z" * SETTINGS.stream_window)  # windows, twice its floor
    assert waiter.unread_total() == 2 * SETTINGS.stream_window
    assert budget.committed <= bound(budget, [*stalled, waiter, newcomer])


def test_an_idle_connection_promises_only_http2s_initial_window() -> None:
    budget = HboneBudget(LIMIT)
    link = Link(budget)
    assert link.server.promised == FLOOR == budget.committed
    sid = link.open()  # one stream: two stream windows (its own, and one for the next stream)
    assert link.server.promised == 2 * SETTINGS.stream_window
    link.client.end_stream(sid)
    link.pump()
    link.open()  # a pooled connection's next stream finds the window open: no new grant
    assert link.server.promised == 2 * SETTINGS.stream_window


def test_a_connection_dropped_without_closing_gives_its_charge_back() -> None:
    """A TLS handshake that failed never reaches ``connection_lost``: the codec is dropped."""
    import gc

    budget = HboneBudget(LIMIT)
    link = Link(budget)
    link.send(link.open(), b"x" * SETTINGS.connection_window)
    assert budget.committed > FLOOR
    del link
    gc.collect()
    assert budget.committed == 0
    assert budget.snapshot()["connections"] == 0


def test_the_source_side_is_bounded_the_same_way() -> None:
    """Pooled (client) connections receive from destinations whose local client may not read:
    their receive side draws from the same budget."""
    budget = HboneBudget(LIMIT)
    pairs = [
        (HboneConnection(client_side=True, settings=SETTINGS, budget=budget),
         HboneConnection(client_side=False, settings=SETTINGS))
        for _ in range(6)
    ]  # fmt: skip

    def pump(client: HboneConnection, server: HboneConnection) -> list[ev.Event]:
        events: list[ev.Event] = []
        while True:
            c2s, s2c = client.data_to_send(), server.data_to_send()
            if not c2s and not s2c:
                return events
            for e in server.receive(c2s) if c2s else []:
                if isinstance(e, ev.TunnelRequested):
                    server.respond(e.stream_id, 200)
            if s2c:
                events += client.receive(s2c)

    for client, server in pairs:
        pump(client, server)
        for _ in range(4):
            sid = client.open_tunnel("10.0.0.2:80")
            pump(client, server)
            server.send(sid, b"r" * SETTINGS.connection_window)  # the local client never reads
            pump(client, server)
    charges = sum(client.held_received + client.promised for client, _ in pairs)
    assert budget.committed == charges <= LIMIT + FLOOR * len(pairs)
    assert sum(client.held_received for client, _ in pairs) > LIMIT // 2
    assert budget.withheld > 0


def _protocols_in_memory(budget: HboneBudget) -> tuple[Any, Any, Any]:
    """A client and a server ``HboneProtocol`` (the server's receive windows on ``budget``,
    accepting every CONNECT) joined by in-memory transports; returns the client, the server
    and the server's transport (to the client)."""
    from agent.proxy.tunnel import HboneProtocol
    from tests.unit.proxy.memtransport import MemoryTransport

    client = HboneProtocol(HboneConnection(client_side=True, settings=SETTINGS))
    server = HboneProtocol(
        HboneConnection(client_side=False, settings=SETTINGS, budget=budget),
        on_request=lambda proto, e: (proto.codec.respond(e.stream_id, 200), proto.flush()),
    )
    to_server, to_client = MemoryTransport(server), MemoryTransport(client)
    to_server.other, to_client.other = to_client, to_server
    server.connection_made(to_client)
    client.connection_made(to_server)
    return client, server, to_client


def test_the_proxy_takes_its_turn_on_the_next_pass_of_the_loop_not_from_inside() -> None:
    """``HboneProtocol``: the call-back comes from inside another connection's accounting, so
    the grant and its WINDOW_UPDATE are scheduled, and go out once the loop runs."""
    import asyncio

    async def main() -> None:
        budget = HboneBudget(4 * FLOOR)
        client, server, _ = _protocols_in_memory(budget)
        hog = budget.open(Conn())
        assert hog.take(2 * FLOOR) == 2 * FLOOR  # with the two connections' floors: used up
        await client.open("10.0.0.2:80", None)
        assert server.codec.promised == FLOOR  # its grant was refused: it waits
        hog.give_back(2 * FLOOR)
        assert server.codec.promised == FLOOR  # called back, not granted from inside
        await asyncio.sleep(0)
        assert server.codec.promised == 2 * SETTINGS.stream_window  # its turn, sent
        assert not budget._waiting

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_waiter_dropped_without_closing_leaves_the_fifo_at_once() -> None:
    """An owner dropped without ``close_budget`` (a TLS handshake that failed never reaches
    ``connection_lost``) goes with its last reference: its charge returns and it leaves the
    FIFO, so the next waiter gets the freed budget. Before, its codec held its call-back, a
    bound method of the owner, which held the codec: a cycle, so the dead waiter kept its
    charge and its turn until the garbage collector ran (disabled here, as it may not run for
    a long time in a busy agent)."""
    import gc

    gc.disable()
    try:
        budget = HboneBudget(LIMIT)
        stalled = _used_up(budget)
        dropped, waiter = Link(budget), Link(budget)
        dropped.open(), waiter.open()  # their grants are refused: both wait
        accounts = [dropped.server._flow._account, waiter.server._flow._account]
        assert list(budget._waiting) == accounts
        committed = budget.committed
        del dropped, accounts
        assert list(budget._waiting) == [waiter.server._flow._account]
        assert budget.committed == committed - FLOOR  # its floor came back
        for sid in (1, 3, 5):  # stalled pods read three stream windows: budget frees up
            stalled[0].read(sid)
        assert waiter.called == 1  # the turn is the live waiter's
        waiter.room()
        assert waiter.server.promised > FLOOR
    finally:
        gc.enable()


def test_a_closing_connection_passes_its_turn_on_at_once() -> None:
    """``HboneProtocol``: a waiter whose transport is closing (its ``connection_lost`` has
    not run yet) says so when called back; the budget skips it and calls the next waiter in
    the same give-back. Before, the closing connection took the freed budget on the next
    pass of the loop (held until its account closed) and the live waiter kept waiting."""
    import asyncio

    async def main() -> None:
        budget = HboneBudget(4 * FLOOR)
        servers, wires = [], []
        for _ in range(2):
            _, server, to_client = _protocols_in_memory(budget)
            servers.append(server)
            wires.append(to_client)
        hog = budget.open(Conn())
        assert hog.take(FLOOR) == FLOOR  # with the four floors: used up
        closing, waiter = servers
        for proto in (closing, waiter):
            assert proto.transport is not None
            client_proto = proto.transport.peer  # type: ignore[attr-defined]
            await client_proto.open("10.0.0.2:80", None)
        assert [a for a in budget._waiting] == [s.codec._flow._account for s in servers]
        wires[0].closing = True  # closed or aborted: ``connection_lost`` comes later
        hog.give_back(FLOOR)
        assert list(budget._waiting) == [waiter.codec._flow._account]
        await asyncio.sleep(0)
        assert closing.codec.promised == FLOOR  # it took nothing
        assert waiter.codec.promised > FLOOR  # the freed budget went to the live waiter

    asyncio.run(asyncio.wait_for(main(), 10))
