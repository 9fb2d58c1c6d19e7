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

Sans-IO: no clock, no sockets; ``DataFlow`` asks and gives back, the metrics read
``snapshot``.
"""

from __future__ import annotations

import weakref
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

    def __init__(self, limit: int | None) -> None:
        # None: unbounded (tests and tools that make connections without an agent).
        self.limit = limit
        self.committed = 0
        self.withheld = 0
        self._holders: weakref.WeakSet[Holder] = weakref.WeakSet()

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
        """Limit, held and promised bytes, connections and withheld grants, for the metrics
        (``agent.telemetry.agentmetrics``). ``held`` is read from the live connections,
        ``promised`` is the rest of what they are charged."""
        held = sum(h.held for h in self._holders)
        return {
            "limit": self.limit,
            "committed": self.committed,
            "held": held,
            "promised": self.committed - held,
            "connections": len(self._holders),
            "withheld": self.withheld,
        }


class Account:
    """One connection's charge against a budget; ``close`` gives all of it back, once."""

    __slots__ = ("budget", "charge")

    def __init__(self, budget: HboneBudget, charge: int) -> None:
        self.budget: HboneBudget | None = budget
        self.charge = charge

    def take(self, want: int) -> int:
        """Up to ``want`` more bytes of window: what fits under the limit, or what keeps this
        connection's charge within ``FLOOR``; 0 when that is less than both ``want`` and
        ``MIN_GRANT``. Anything less than ``want`` is counted as withheld."""
        budget = self.budget
        if budget is None:  # closed: nothing more is promised
            return 0
        room = max(budget.free(), FLOOR - self.charge)
        n = want if want <= room else room
        if n < want:
            budget.withheld += 1
            WITHHELD.inc()
            if n < MIN_GRANT:
                return 0
        self.charge += n
        budget.committed += n
        return n

    def give_back(self, n: int) -> None:
        """``n`` charged bytes left the connection (forwarded, or dropped)."""
        budget = self.budget
        if budget is not None:
            self.charge -= n
            budget.committed -= n

    def close(self) -> None:
        """The connection is gone: its whole charge returns (idempotent)."""
        budget = self.budget
        if budget is not None:
            budget.committed -= self.charge
            self.charge = 0
            self.budget = None
