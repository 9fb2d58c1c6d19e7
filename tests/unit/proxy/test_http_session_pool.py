"""The source's pool of idle HTTP/1.1 upstream sessions: bounded, timed out, never stale."""

from __future__ import annotations

import asyncio
import socket

from agent.proxy.http_sessions import SessionKey, SessionPool, UpstreamSession
from tests.unit.proxy.looptimers import record_timers

KEY = SessionKey("local", "10.244.1.2", "10.244.1.3", 9080, "default/web")


def _session(key: SessionKey = KEY) -> tuple[UpstreamSession, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    return UpstreamSession(key, ours), theirs


def test_an_idle_session_is_reused_most_recent_first() -> None:
    async def main() -> None:
        pool = SessionPool()
        (a, _pa), (b, _pb) = _session(), _session()
        pool.put(a)
        pool.put(b)
        assert pool.take(KEY) is b and pool.take(KEY) is a and pool.take(KEY) is None
        other = SessionKey("local", "10.244.1.9", "10.244.1.3", 9080, "default/web")
        pool.put(a)
        assert pool.take(other) is None  # another client IP never gets it

    asyncio.run(main())


def test_a_session_the_far_side_closed_is_dropped_at_checkout() -> None:
    async def main() -> None:
        pool = SessionPool()
        (stale, peer), (live, _keep) = _session(), _session()
        pool.put(live)
        pool.put(stale)
        peer.close()
        assert pool.take(KEY) is live
        assert stale.conn.fileno() == -1  # closed, not leaked

    asyncio.run(main())


def test_the_pool_is_bounded_and_idle_sessions_expire() -> None:
    async def main() -> None:
        pool = SessionPool(idle_timeout=0.05, max_per_key=2, max_idle=3)
        made = [_session() for _ in range(3)]
        for session, _ in made:
            pool.put(session)
        assert pool.size == 2 and made[2][0].conn.fileno() == -1  # over the per-key bound
        other = SessionKey("local", "10.244.1.2", "10.244.1.4", 9080, "default/web")
        extra = [_session(other) for _ in range(2)]
        for session, _ in extra:
            pool.put(session)
        assert pool.size == 3 and extra[1][0].conn.fileno() == -1  # over the total bound
        await asyncio.sleep(0.2)
        assert pool.size == 0 and all(s.conn.fileno() == -1 for s, _ in made + extra)

    asyncio.run(main())


def test_after_drain_nothing_is_kept() -> None:
    async def main() -> None:
        pool = SessionPool()
        (a, _pa), (b, _pb) = _session(), _session()
        pool.put(a)
        pool.close_all()
        assert a.conn.fileno() == -1
        pool.put(b)
        assert pool.size == 0 and b.conn.fileno() == -1

    asyncio.run(main())


def test_one_timer_serves_the_pool_and_a_reused_session_is_timed_from_its_last_use() -> None:
    """A session goes back to the pool after every request: that arms no timer of its own
    (before: one ``call_later`` per put); the pool's sweep closes what has been idle for
    the whole timeout since it was last put back, and nothing younger."""

    async def main() -> None:
        armed = record_timers(asyncio.get_running_loop())
        now = 0.0
        pool = SessionPool(idle_timeout=30.0, clock=lambda: now)
        (a, _pa), (b, _pb) = _session(), _session()
        for _ in range(100):
            pool.put(a)
            assert pool.take(KEY) is a
        assert len(armed) == 1
        pool.put(a)
        now = 20.0
        assert pool.take(KEY) is a
        pool.put(b)  # idle since 20 s
        pool.put(a)  # idle since 20 s, again
        now = 31.0
        pool._sweep()  # as the timer armed at 0 s fires at 30 s
        assert pool.size == 2 and a.conn.fileno() != -1 and b.conn.fileno() != -1
        assert len(armed) == 2  # the next sweep, at the younger sessions' expiry
        now = 50.0
        pool._sweep()
        assert pool.size == 0 and a.conn.fileno() == -1 and b.conn.fileno() == -1
        pool.close_all()

    asyncio.run(main())
