"""The agent's budget for HBONE receive buffers: held plus promised bytes, across connections.

Why: each HBONE connection bounds what its peer can make us hold by its connection window
(``agent.proxy.hbone_flow``), but nothing bounded the sum. A peer may open 256 connections per
address (``hbone_limits.InboundLimits``) whose streams target pods that stop reading, and the
source side receives the same way from destinations whose client does not read: 256 x 16 MiB
is more memory than an agent has, whatever the window. So every process running a proxy owns one
``HboneBudget`` and every connection's receive side (``DataFlow``) draws from it through an
``Account``.

What is counted, per connection: its *charge*, the bytes received and not yet forwarded
(``held``: delivered to the owner, not yet written to the pod or dropped) plus the bytes the peer
may still send without asking (``promised``: the open connection window). Every DATA byte counts
against the connection window, so the charge is exactly what the peer can make that connection
hold in received data; stream windows only share it out among the streams and are not charged
again.

The invariant (``HboneBudget.committed`` is the sum of the charges)::

    committed <= limit + FLOOR * open connections

because a grant either fits under ``limit`` or leaves its connection's charge at most ``FLOOR``
(65,535 bytes: the window HTTP/2 gives every new connection before we send anything, RFC 9113
section 6.9.2, so that part cannot be withheld from any HTTP/2 server). Proof sketch: after the
last grant that fitted under the limit, the connections whose last grant fitted under it hold no
more than they did then (a charge only grows by a grant), and every other connection holds at
most ``FLOOR``.

Why a floor, and why per connection: without it a budget filled by pods that never read (or a
peer that makes them so) would leave every other connection with a closed window forever. With
it, a connection whose pods read always gets its window back up to ``FLOOR`` as they drain, so it
keeps moving, slowly, whatever the rest of the node holds; and a stream whose pod reads again
frees its bytes at once. A floor per *stream* would let a hostile peer multiply it by 100 streams
per connection; per connection it is the 64 KiB HTTP/2 already forces. The cost: while the budget
is exhausted, a connection on which one stream's pod stopped reading and holds the floor stalls
that connection's other streams until the budget frees up (ARCHITECTURE.md, "HBONE buffer
budget").

Who gets freed budget while it is used up: the connections that wait for it, oldest first. A
grant refused or cut short puts its connection (once) in the budget's FIFO (``_waiting``, if
its owner gave a call-back: ``Account.on_room``); while anyone waits, only the oldest waiter
may draw on the free budget and every other connection gets its floor only (so a connection
that happens to consume next cannot take what the oldest waiter waits for); when a give-back
leaves at least ``MIN_GRANT`` free, the oldest waiter is called back once, and takes its grant
when its owner runs (``tunnel.HboneProtocol``: on the next pass of the loop). A waiter still
short after its turn goes to the back; a closed one leaves and passes the turn on, and so does
one whose call-back answers that it will not take (its owner was dropped, or its connection is
closing): a dead waiter never holds the turn. The
invariant's argument is unchanged: the oldest waiter's grant fits under the limit. The FIFO is
empty unless the budget was used up: the normal path pays one truth test per grant and per
give-back.

Sans-IO: no clock, no sockets; ``DataFlow`` asks and gives back, the metrics read
``snapshot``; the call-back only schedules.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Protocol

from agent.base.metrics import counter
from agent.proxy.h2wire import KIB, MIB

# The connection window every HTTP/2 connection starts with (RFC 9113 section 6.9.2).
FLOOR = 65_535
# A grant smaller than this (and smaller than what the connection wants) is withheld instead:
# under pressure a consumer that drains in small writes must not cost a WINDOW_UPDATE each.
# Below ``FLOOR``, so a connection that drained everything always gets a grant (no deadlock).
MIN_GRANT = 16 * KIB
# ``nodemesh agent --hbone-buffer-budget``: the range an operator may choose. At least 16 MiB:
# one connection window at the default ``--hbone-window``. At most 64 GiB: far beyond any node.
MIN_BUDGET = 16 * MIB
MAX_BUDGET = 64 * 1024 * MIB
# The default, for the whole agent (split among ``--workers``): 16 connection windows of the
# default 16 MiB, so a few bulk streams never wait for it (each takes at most two stream
# windows: ``DataFlow``), a quarter of the agent container's 1 GiB memory limit.
DEFAULT_BUDGET = 256 * MIB

WITHHELD = counter(
    "nodemesh_hbone_window_updates_withheld_total",
    "HBONE connection-window grants cut short or withheld because the buffer budget "
    "(--hbone-buffer-budget) was exhausted",
)


class Holder(Protocol):
    """What the budget reads of a live connection for its snapshot (``DataFlow``)."""

    held: int


class HboneBudget:
    """Bytes all HBONE connections of this process may hold or have promised (module docstring)."""

    def __init__(self, limit: int | None, *, queue_limit: int | None = None) -> None:
        # None: unbounded (tests and tools that make connections without an agent).
        self.limit = limit
        self.committed = 0
        self.withheld = 0
        self._holders: weakref.WeakSet[Holder] = weakref.WeakSet()
        # The send side's budget, with its own limit (``QueueBudget``; ``--hbone-queue-budget``):
        # one object per process carries both to every connection.
        self.queue = QueueBudget(queue_limit)
        # Connections whose grant was refused or cut short while the budget was used up, oldest
        # first (insertion-ordered): freed budget goes to them in that order (``Account.take``).
        self._waiting: dict[Account, None] = {}
        self._called = False  # the oldest waiter was called back and has not taken yet

    def _call_head(self) -> None:
        """If anyone waits and at least ``MIN_GRANT`` is free: call the oldest waiter back
        (once per turn). A waiter whose call-back answers False (its owner was dropped, or
        its connection is closing: it will take nothing) leaves the FIFO at once and the next
        one is called instead, so a dead waiter never holds the turn."""
        waiting = self._waiting
        while waiting and self.free() >= MIN_GRANT:
            head = next(iter(waiting))
            self._called = True
            assert head.on_room is not None  # only accounts with a call-back wait
            if head.on_room():
                return
            self._called = False
            del waiting[head]

    def open(self, holder: Holder) -> Account:
        """A new connection: charged the window HTTP/2 gives it before we can withhold anything."""
        self._holders.add(holder)
        self.committed += FLOOR
        return Account(self, FLOOR)

    def discard(self, holder: Holder) -> None:
        """``holder`` closed its account: no longer read by ``snapshot``."""
        self._holders.discard(holder)

    def free(self) -> int:
        """What a grant may take beyond the floor (0 when exhausted; huge when unbounded)."""
        if self.limit is None:
            return 1 << 62
        return max(self.limit - self.committed, 0)

    def snapshot(self) -> dict[str, int | None]:
        """Limit, held and promised bytes, connections and withheld grants, and the send
        side's (``QueueBudget.snapshot``), for the metrics (``agent.telemetry.agentmetrics``).
        ``held`` is read from the live connections, ``promised`` is the rest of what they are
        charged."""
        held = sum(h.held for h in self._holders)
        return {
            "limit": self.limit,
            "committed": self.committed,
            "held": held,
            "promised": self.committed - held,
            "connections": len(self._holders),
            "withheld": self.withheld,
        } | self.queue.snapshot()


class Account:
    """One connection's charge against a budget; ``close`` gives all of it back, once."""

    __slots__ = ("budget", "charge", "on_room")

    def __init__(self, budget: HboneBudget, charge: int) -> None:
        self.budget: HboneBudget | None = budget
        self.charge = charge
        # The owner's call-back for freed budget (None: never waits in the budget's FIFO). It
        # is called from inside another connection's ``give_back`` or ``take``, so it must only
        # schedule the owner's ``take`` (``tunnel.HboneProtocol``), never grant from inside;
        # it answers whether it did (False: the owner is gone or closing, skip it).
        self.on_room: Callable[[], bool] | None = None

    def take(self, want: int) -> int:
        """Up to ``want`` more bytes of window: what fits under the limit, or what keeps this
        connection's charge within ``FLOOR``; 0 when that is less than both ``want`` and
        ``MIN_GRANT``. Anything less than ``want`` is counted as withheld, and a connection
        with a call-back (``on_room``) then waits in the budget's FIFO for freed budget
        (``HboneBudget``: while any connection waits, only the oldest waiter may draw on the
        free budget)."""
        budget = self.budget
        if budget is None:  # closed: nothing more is promised
            return 0
        if budget._waiting:  # the budget was used up: freed budget goes to waiters first
            return self._take_in_turn(budget, want)
        room = max(budget.free(), FLOOR - self.charge)
        n = want if want <= room else room
        if n < want:
            budget.withheld += 1
            WITHHELD.inc()
            if self.on_room is not None:
                budget._waiting[self] = None  # the only waiter: called back on a give-back
            if n < MIN_GRANT:
                return 0
        self.charge += n
        budget.committed += n
        return n

    def wait(self) -> None:
        """Wait (at the back, once) for freed budget, as ``take`` makes an account with a
        call-back do when its grant falls short: for an owner that gives the call-back only
        then (``hbone_flow.DataFlow``)."""
        budget = self.budget
        if budget is not None and self.on_room is not None and self not in budget._waiting:
            budget._waiting[self] = None

    def _take_in_turn(self, budget: HboneBudget, want: int) -> int:
        """``take`` while connections wait for freed budget: the oldest waiter may take what
        is free; every other connection only what keeps it within ``FLOOR``, and waits (at
        the back, once) if that is less than it wants. A waiter that took its turn and still
        wants more goes to the back, so one large window cannot hold the others at the floor
        for longer than a turn."""
        waiting = budget._waiting
        head = next(iter(waiting))
        room = max(budget.free() if head is self else 0, FLOOR - self.charge)
        n = want if want <= room else room
        if n < want:
            budget.withheld += 1
            WITHHELD.inc()
            if head is self:
                del waiting[self]
            if self.on_room is not None:
                waiting[self] = None  # no-op if already waiting: its place is kept
            if n < MIN_GRANT:
                n = 0
        else:
            waiting.pop(self, None)
        if n:
            self.charge += n
            budget.committed += n
        if head is self:  # its turn is over: the next waiter's, if budget is free
            budget._called = False
            budget._call_head()
        return n

    def give_back(self, n: int) -> None:
        """``n`` charged bytes left the connection (forwarded, or dropped). If connections wait
        for freed budget and at least ``MIN_GRANT`` is free, the oldest is called back."""
        budget = self.budget
        if budget is not None:
            self.charge -= n
            budget.committed -= n
            if budget._waiting and not budget._called:
                budget._call_head()

    def close(self) -> None:
        """The connection is gone: its whole charge returns and it leaves the budget's FIFO
        (idempotent). If it was the waiter called back, the turn passes on."""
        budget = self.budget
        if budget is not None:
            budget.committed -= self.charge
            self.charge = 0
            self.budget = None
            self.on_room = None
            waiting = budget._waiting
            if self in waiting:
                if budget._called and next(iter(waiting)) is self:
                    budget._called = False
                del waiting[self]
            if waiting and not budget._called:
                budget._call_head()


# ---- outgoing queues ------------------------------------------------------------------------

# A connection may queue more while its own outgoing bytes are within this, however full the
# queue budget: the TLS transport's high-water mark (``hbone_limits.TRANSPORT_HIGH_WATER``).
# Below it a transport that is not paused gives no sign when it drains, so a connection whose
# peer reads must be let through there, or it could wait for a wake-up that never comes.
QUEUE_FLOOR = 64 * KIB
# ``nodemesh agent --hbone-queue-budget``: at least 2 MiB (two connections' ``OUT_BUDGET``, so
# one bulk stream never waits for it), at most 64 GiB.
MIN_QUEUE_BUDGET = 2 * MIB
MAX_QUEUE_BUDGET = 64 * 1024 * MIB
# The default, for the whole agent (split among ``--workers``): 64 connections each holding
# their own cap (``OUT_BUDGET``, 1 MiB), a sixteenth of the agent container's 1 GiB limit.
DEFAULT_QUEUE_BUDGET = 64 * MIB

STALLED = counter(
    "nodemesh_hbone_writes_stalled_total",
    "Times an HBONE connection's writers had to wait because the outgoing queue budget "
    "(--hbone-queue-budget) was used up",
)


class QueueBudget:
    """Bytes all HBONE connections of this process may hold in outgoing queues, together.

    Why: each connection caps what it queues for its peer (``hbone_limits.OUT_BUDGET`` plus
    one write), but a peer that grants windows and never reads its socket (or reads slowly) can
    make each of its 256 connections per address hold that cap: 336 MiB per peer address with
    the transport buffers. So every process owns one ``QueueBudget`` and every connection's
    send side (``tunnel.HboneProtocol``) reports what it holds through a ``QueueAccount``.

    A connection's *charge* is what it holds for its peer: DATA queued for the peer's windows,
    framed bytes not yet given to the transport, and the transport's write buffer. The owner
    sets it after every change it makes (``QueueAccount.set``); the transport buffer also
    drains on its own, so a charge may be higher than what the connection still holds, never
    lower (at most ``QUEUE_FLOOR`` higher: a transport that is not paused holds no more).

    The rule: a connection may write while the budget's total is within ``limit`` or its own
    charge is within ``QUEUE_FLOOR`` (``may_grow``). Otherwise its writers wait, the relay stops
    reading from the pod (TCP backpressure to the pod: nothing dropped or reordered), and the
    connection is called back (``on_room``) as soon as the total is within ``limit`` again.

    How much a write may add (``tunnel.TunnelStream.write_room``): ``MAX_WRITE`` while the
    total is within the limit, ``QUEUE_FLOOR`` when the connection is let through on its floor
    only. Every writer keeps to it: the relay reads its pod's socket only that far; the HTTP
    shells' writes from callbacks (``TunnelStream.write_some``, ``try_write``) take only that
    much of a message, and their outbox keeps the rest and stops reading its source; a task's
    ``write`` (an outbox draining, an HTTP/1.1 body, a mirror's copy) writes a long message
    in such pieces and waits for room between them. Hence the invariant::

        committed <= limit + MAX_WRITE + 2 * QUEUE_FLOOR * open connections

    Proof sketch, as for the receive budget: after the last write let through by the limit
    (which left the total at most ``limit + MAX_WRITE``), a connection that wrote only under its
    floor since then holds at most ``2 * QUEUE_FLOOR``, and every other one no more than it did
    then (a charge grows only by a write). Frames the codec produces itself (WINDOW_UPDATEs,
    PING and SETTINGS ACKs) also land in the transport buffer, and are charged like the rest,
    but a connection's charge may grow by them without asking; ``hbone_limits`` bounds them
    per connection (``max_unsent_replies``).

    Sans-IO: no clock, no sockets, no loop; ``on_room`` is the owner's callback (it schedules
    its wake-up, it does not write from inside ``set``).
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit  # None: unbounded (tests and tools without an agent)
        self.committed = 0
        self.connections = 0
        self.stalled = 0
        self._waiting: dict[QueueAccount, None] = {}  # insertion-ordered: woken oldest first

    def open(self, on_room: Callable[[], None] | None = None) -> QueueAccount:
        self.connections += 1
        return QueueAccount(self, on_room)

    def within(self) -> bool:
        return self.limit is None or self.committed <= self.limit

    def _room(self) -> None:
        """The total is within the limit again: every waiting connection may try once more."""
        waiting, self._waiting = self._waiting, {}
        for account in waiting:
            if account.on_room is not None:
                account.on_room()

    def snapshot(self) -> dict[str, int | None]:
        return {
            "queue_limit": self.limit,
            "queued": self.committed,
            "queue_connections": self.connections,
            "stalled": self.stalled,
        }


class QueueAccount:
    """One connection's charge against a ``QueueBudget``; ``close`` gives it back, once."""

    __slots__ = ("budget", "charge", "on_room")

    def __init__(self, budget: QueueBudget | None, on_room: Callable[[], None] | None) -> None:
        # None: not open (yet, or any more): charges nothing, may always grow.
        self.budget = budget
        self.charge = 0
        self.on_room = on_room

    def set(self, n: int) -> None:
        """The connection now holds ``n`` outgoing bytes. A decrease that brings the total
        within the limit calls back the connections waiting for room."""
        budget = self.budget
        if budget is None or n == self.charge:
            return
        budget.committed += n - self.charge
        shrank = n < self.charge
        self.charge = n
        if shrank and budget._waiting and budget.within():
            budget._room()

    def budget_within(self) -> bool:
        """The budget's total is within its limit (or the account is closed)."""
        budget = self.budget
        return budget is None or budget.within()

    def may_grow(self) -> bool:
        """May the connection write more now (the class docstring's rule)? If not, it is
        called back (``on_room``) once the total is within the limit."""
        budget = self.budget
        if budget is None or self.charge <= QUEUE_FLOOR or budget.within():
            return True
        if self not in budget._waiting:
            budget._waiting[self] = None
            budget.stalled += 1
            STALLED.inc()
        return False

    def close(self) -> None:
        """The connection is gone: its charge returns (idempotent). The call-back is dropped
        too: it is the owner's bound method, and the owner holds this account."""
        budget = self.budget
        if budget is not None:
            budget._waiting.pop(self, None)  # before ``set``: not called back itself
            self.set(0)
            budget.connections -= 1
            self.budget = None
            self.on_room = None
