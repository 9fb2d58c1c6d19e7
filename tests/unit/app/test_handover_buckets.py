"""Rate-limit buckets across an upgrade: the successor agent continues its predecessor's
buckets, over the real handover socket (an abstract Unix name, no root), with the agent's own
glue on both sides (``Agent._buckets_for_successor``, ``continued_buckets``). The clock is
injected (each request is given its time), so the counts are exact.

A predecessor runs in-process buckets (``--workers 1``) or the workers' shared table
(``--workers N``); a successor seeds in-process buckets from the table it gets, or its workers
share that very table. Anything wrong with the buckets makes the successor start full, says so
once, and leaves the handover itself alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent import handover
from agent.app import Agent, continued_buckets
from agent.handover import HandoverServer, Predecessor, Reply, Successor
from agent.policy import sharedbuckets
from agent.policy.ratelimit import Limiter, RateLimit, RateLimiter
from agent.policy.sharedbuckets import HEADER, LAYOUT, MAGIC, SET, BucketTable, SharedRateLimiter

POD = "10.244.1.3"
LIMIT = RateLimit("default/l", "web.default.svc.cluster.local", 1, 3, False)
PER_IDENTITY = RateLimit("default/i", "web.default.svc.cluster.local", 1, 2, True)
NOW = 100.0  # the frozen clock


def _name() -> bytes:
    return handover.socket_name(Path(f"/sys/fs/bpf/nodemesh/test-{secrets.token_hex(4)}"))


class OldAgent:
    """The predecessor: ``Agent``'s bucket hook over its limiter (in-process, or the workers'
    table), served by a ``HandoverServer`` on a fresh name."""

    def __init__(self, mode: str, limiter: Limiter | None = None) -> None:
        self.table_fd = -1
        workers = None
        if mode == "shared":
            self.table_fd = sharedbuckets.create_table(sets=64)
            limiter = SharedRateLimiter(BucketTable(self.table_fd))
            workers = SimpleNamespace(buckets_fd=self.table_fd)
        elif limiter is None:
            limiter = RateLimiter()
        self.core = SimpleNamespace(limiter=limiter)
        proxy = SimpleNamespace(proxy=SimpleNamespace(core=self.core))
        self.agent = SimpleNamespace(workers=workers, proxy=proxy)

    def buckets(self, layout: int) -> int:
        return Agent._buckets_for_successor(self.agent, layout)  # type: ignore[arg-type]

    @property
    def limiter(self) -> Limiter:
        return self.core.limiter  # type: ignore[no-any-return]

    async def serve(self, name: bytes) -> HandoverServer:
        sock = handover.bind(name)
        assert sock is not None
        hooks: handover.Actions = {a: _nothing for a in ("freeze", "release", "resume")}
        server = HandoverServer(sock, Predecessor(os.getpid()), hooks, self.buckets)
        await server.start()
        return server

    def close(self) -> None:
        if self.table_fd >= 0:
            os.close(self.table_fd)


async def _nothing() -> None:
    return None


def _successor_limiter(table: BucketTable, mode: str) -> Limiter:
    """What the new agent builds on the table it got: ``prepare`` seeds in-process buckets;
    with workers, each worker maps the descriptor (``Workers`` passes ``table.fd``)."""
    if mode == "shared":
        return SharedRateLimiter(BucketTable(table.fd))
    return RateLimiter(seed=sharedbuckets.TableSeed(table))


def _hand_over(old: OldAgent) -> BucketTable | None:
    async def scenario() -> BucketTable | None:
        name = _name()
        server = await old.serve(name)
        try:
            return await asyncio.to_thread(continued_buckets, name)
        finally:
            await server.stop()

    return asyncio.run(asyncio.wait_for(scenario(), 10))


def _admitted(limiter: Limiter, limit: RateLimit, now: float, tries: int, who: str = "") -> int:
    return sum(limiter.admit([limit], POD, who, now) is None for _ in range(tries))


@pytest.mark.parametrize("new_mode", ["in-process", "shared"])
@pytest.mark.parametrize("old_mode", ["in-process", "shared"])
def test_a_pod_at_its_limit_before_the_handover_is_still_limited_after_it(
    old_mode: str, new_mode: str
) -> None:
    old = OldAgent(old_mode)
    try:
        assert _admitted(old.limiter, LIMIT, NOW, 5) == 3  # the burst, then limited
        assert _admitted(old.limiter, PER_IDENTITY, NOW, 3, "spiffe://a") == 2
        table = _hand_over(old)
        assert table is not None
        new = _successor_limiter(table, new_mode)
        # Same instant: no fresh burst for the pod, nor for the identity.
        assert _admitted(new, LIMIT, NOW, 3) == 0
        assert _admitted(new, PER_IDENTITY, NOW, 3, "spiffe://a") == 0
        assert _admitted(new, PER_IDENTITY, NOW, 2, "spiffe://b") == 2  # untouched: full
        # And the refill goes on from the predecessor's stamp: 1 rps, one second later.
        assert _admitted(new, LIMIT, NOW + 1.0, 3) == 1
    finally:
        old.close()


def test_after_the_handover_both_agents_take_from_one_table() -> None:
    """The predecessor's established connections still bring requests while it drains: they
    count in the table the successor reads (an in-process predecessor moves to the copy)."""
    old = OldAgent("in-process")
    try:
        assert _admitted(old.limiter, LIMIT, NOW, 3) == 3
        table = _hand_over(old)
        assert table is not None and isinstance(old.limiter, SharedRateLimiter)
        new = _successor_limiter(table, "shared")
        assert _admitted(old.limiter, LIMIT, NOW + 1.0, 2) == 1  # the one token refilled
        assert _admitted(new, LIMIT, NOW + 1.0, 2) == 0  # ... is gone for the successor too
    finally:
        old.close()


def test_a_bucket_the_middle_agent_never_touched_keeps_its_level_for_the_next_one() -> None:
    """Two upgrades in a row, single-process agents: the second agent hands on the table it was
    seeded from, with its own buckets written in."""
    first = OldAgent("in-process")
    try:
        assert _admitted(first.limiter, LIMIT, NOW, 4) == 3
        table = _hand_over(first)
        assert table is not None
        second = OldAgent("in-process", RateLimiter(seed=sharedbuckets.TableSeed(table)))
        assert _admitted(second.limiter, PER_IDENTITY, NOW, 3, "spiffe://a") == 2  # its own
        handed_on = _hand_over(second)
        assert handed_on is not None
        third = _successor_limiter(handed_on, "in-process")
        assert _admitted(third, LIMIT, NOW, 2) == 0  # the first agent's level
        assert _admitted(third, PER_IDENTITY, NOW, 2, "spiffe://a") == 0  # the second's
    finally:
        first.close()


def test_the_predecessors_answer_names_the_action_and_checks_the_request() -> None:
    old = Predecessor(pid=100)
    assert old.receive({"op": "buckets", "layout": 1}) == Reply(
        {"ok": True, "pid": 100, "layout": 1}, "buckets"
    )
    assert "layout" in old.receive({"op": "buckets"}).message["error"]
    old.receive({"op": "freeze", "pid": 2})
    old.receive({"op": "took_over"})
    assert "handed the node over" in old.receive({"op": "buckets", "layout": 1}).message["error"]


# -- what must make the successor start full -------------------------------------------------


def _memfd(content: bytes, size: int | None = None) -> int:
    fd = os.memfd_create("test-buckets")
    os.write(fd, content)
    if size is not None:
        os.ftruncate(fd, size)
    return fd


def _table_header(layout: int, sets: int, size: int) -> bytes:
    return HEADER.pack(MAGIC, layout, sets) + bytes(size - HEADER.size)


GOOD = b'{"ok": true, "pid": 7, "layout": %d}\n' % LAYOUT
RAW_REPLIES: dict[str, tuple[bytes, bytes | None, str]] = {
    # name: (answer line, content of the descriptor sent with it or None, reason logged)
    "older agent": (b'{"error": "unknown operation \'buckets\'"}\n', None, "unknown operation"),
    "truncated answer": (b'{"ok": true, "pid": 7, "lay', None, "cut short"),
    "garbage answer": (b"\x00\xffnot json\n", None, "not a handover message"),
    "no descriptor": (GOOD, None, "0 descriptor(s)"),
    "other layout asked": (b'{"ok": true, "pid": 7, "layout": 99}\n', b"", "layout 1"),
    "garbage table": (GOOD, os.urandom(4096), "no nmbucket header"),
    "newer table layout": (GOOD, _table_header(LAYOUT + 1, 1, HEADER.size + SET.size), "layout 2"),
    "truncated table": (GOOD, _table_header(LAYOUT, 64, HEADER.size + SET.size), "truncated"),
}


@pytest.mark.parametrize("case", list(RAW_REPLIES))
def test_bad_buckets_from_the_predecessor_start_full_and_say_why_once(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    line, content, reason = RAW_REPLIES[case]
    name = _name()
    listener = handover.bind(name)
    assert listener is not None
    listener.setblocking(True)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.makefile("rb").readline()
            fds = [_memfd(content)] if content is not None else []
            socket.send_fds(conn, [line], fds)
            for fd in fds:
                os.close(fd)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    before = set(os.listdir("/proc/self/fd"))
    with caplog.at_level(logging.INFO):
        assert continued_buckets(name) is None
    thread.join(5)
    listener.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("rate-limit buckets start full"), lines
    assert reason in lines[0], lines
    assert set(os.listdir("/proc/self/fd")) <= before  # a refused descriptor is closed
    # And a limiter built without a table starts full: the burst is there.
    assert _admitted(RateLimiter(), LIMIT, NOW, 5) == 3


def test_a_layout_mismatch_is_refused_by_the_predecessor_and_the_handover_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = OldAgent("shared")

    async def scenario() -> tuple[str, int]:
        name = _name()
        server = await old.serve(name)
        with pytest.raises(handover.HandoverError) as refused:  # a successor of a newer layout
            await asyncio.to_thread(handover.fetch_buckets, name, LAYOUT + 1)
        new = Successor.find(name)
        assert new is not None
        pid = await new.freeze()  # the handover itself is unaffected
        await new.took_over()
        new.close()
        await server.stop()
        return str(refused.value), pid

    try:
        with caplog.at_level(logging.WARNING):
            error, pid = asyncio.run(asyncio.wait_for(scenario(), 10))
    finally:
        old.close()
    assert pid == os.getpid()
    assert "reads bucket table layout 2, this agent writes layout 1" in error
    assert any("layout 2" in r.getMessage() for r in caplog.records)  # the predecessor's log


def test_a_predecessor_whose_bucket_hook_fails_still_hands_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(layout: int) -> int:
        raise OSError(24, "Too many open files")

    async def scenario() -> tuple[BucketTable | None, list[str]]:
        name = _name()
        sock = handover.bind(name)
        assert sock is not None
        calls: list[str] = []

        async def freeze() -> None:
            calls.append("freeze")

        async def release() -> None:
            calls.append("release")

        server = HandoverServer(
            sock, Predecessor(os.getpid()), {"freeze": freeze, "release": release}, broken
        )
        await server.start()
        table = await asyncio.to_thread(continued_buckets, name)
        new = Successor.find(name)
        assert new is not None
        await new.freeze()
        await new.took_over()
        new.close()
        await server.stop()
        return table, calls

    with caplog.at_level(logging.WARNING):
        table, calls = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert table is None and calls == ["freeze", "release"]
    assert any("Too many open files" in r.getMessage() for r in caplog.records)


def test_an_agent_loads_the_bucket_tables_modules_only_for_an_upgrade() -> None:
    """Importing the agent loads neither ``sharedbuckets`` nor ``ratelimit``: they are needed
    only at an upgrade (or by the proxy, which imports ``ratelimit`` itself), and loaded at
    start-up they added about 0.5 MB to every agent's main process."""
    code = (
        "import sys, agent.app; "
        "print(sorted(m for m in ('agent.policy.sharedbuckets', 'agent.policy.ratelimit') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
