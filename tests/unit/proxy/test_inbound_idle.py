"""The HBONE inbound's idle limit per connection: one timer, not one per stream's end."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from agent.proxy.hbone import HboneConnection
from agent.proxy.hbone_limits import InboundLimits
from agent.proxy.inbound import InboundHbone
from agent.proxy.tunnel import HboneProtocol
from tests.unit.proxy.looptimers import record_timers
from tests.unit.proxy.memtransport import MemoryTransport


def served(inbound: InboundHbone) -> tuple[HboneProtocol, MemoryTransport]:
    proto = HboneProtocol(HboneConnection(client_side=False), on_idle=inbound._arm_idle)
    transport = MemoryTransport(proto)
    proto.connection_made(transport)
    return proto, transport


def test_streams_one_after_another_keep_one_idle_timer() -> None:
    """Every stream's end armed a timer and the next CONNECT cancelled it; now the time of the
    last idle is noted, and the one timer checks it when it fires."""

    async def scenario() -> tuple[int, bool]:
        inbound = InboundHbone(SimpleNamespace(registry=None))  # type: ignore[arg-type]
        proto, transport = served(inbound)
        made = record_timers(asyncio.get_running_loop())
        inbound._arm_idle(proto)  # the connection is up, no stream yet
        for _ in range(5):  # a CONNECT (``_spawn``), then its stream's end (``stream_closed``)
            inbound._busy(proto)
            proto.stream_closed()
        return sum(1 for c in made if c == inbound._close_idle), transport.is_closing()

    assert asyncio.run(scenario()) == (1, False)


def test_a_connection_is_closed_a_whole_timeout_after_its_last_idle() -> None:
    """The timer that fires while the connection idles for less than the timeout (a stream
    came and went in between) waits for the rest of it; one busy when it fires stays open (the
    loop's clock set by the test: the timer is fired by calling it)."""

    async def scenario() -> list[bool]:
        inbound = InboundHbone(SimpleNamespace(registry=None))  # type: ignore[arg-type]
        inbound.limits = InboundLimits(idle_timeout=10.0)
        proto, transport = served(inbound)
        now = [100.0]
        asyncio.get_running_loop().time = lambda: now[0]  # type: ignore[method-assign]
        inbound._arm_idle(proto)  # due at 110
        now[0] = 105.0
        inbound._busy(proto)
        proto.stream_closed()  # idle again at 105
        seen = []
        for now[0] in (110.0, 115.0):
            inbound._close_idle(proto)
            seen.append(transport.is_closing())
        other, other_transport = served(inbound)  # busy when its timer fires: stays open
        inbound._arm_idle(other)
        inbound._busy(other)
        now[0] = 130.0
        inbound._close_idle(other)
        seen.append(other_transport.is_closing())
        return seen

    assert asyncio.run(scenario()) == [False, True, False]


def test_a_connection_gone_leaves_no_idle_timer() -> None:
    async def scenario() -> tuple[int, int]:
        inbound = InboundHbone(SimpleNamespace(registry=None))  # type: ignore[arg-type]
        proto, _ = served(inbound)
        inbound._arm_idle(proto)
        inbound._disarm_idle(proto)
        return len(inbound._idle_timers), len(inbound._idle_since)

    assert asyncio.run(scenario()) == (0, 0)
