"""Rate-limit buckets across an upgrade: the successor agent continues its predecessor's
buckets, over the real handover socket (an abstract Unix name, no root), with the agent's own
glue on both sides (``Agent._buckets_for_successor``, ``continued_buckets``). The clock is
injected (each request is given its time), so the counts are exact.

A predecessor runs in-process buckets (``--workers 1``) or the workers' shared table
(``--workers N``); a successor's workers share the table it gets, and a single-process successor
takes from it too until its predecessor has exited, then goes back to in-process buckets at the
table's levels. Anything wrong with the buckets makes the successor start full, says so once,
and leaves the handover itself alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent import handover
from agent.app import Agent, TablePeers, continued_buckets, leave_table, share_until_exit
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
        self.agent = SimpleNamespace(workers=workers, proxy=proxy, _table_peers=None)

    def buckets(self, layout: int, successor: int) -> int:
        return Agent._buckets_for_successor(self.agent, layout, successor)  # type: ignore[arg-type]

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
        if self.agent._table_peers is not None:
            self.agent._table_peers.close()
        if self.table_fd >= 0:
            os.close(self.table_fd)


async def _nothing() -> None:
    return None


class NewAgent:
    """The successor, built on the table it got as ``Agent.prepare`` builds it: with workers,
    each worker maps the descriptor (``Workers`` passes ``table.fd``); a single-process one
    takes from the table until the old agent has exited (``share_until_exit``)."""

    def __init__(self, table: BucketTable, handed: handover.HandedBuckets, mode: str) -> None:
        self.core = SimpleNamespace(limiter=None)
        self.peers: TablePeers | None = None
        if mode == "shared":
            self.core.limiter = SharedRateLimiter(BucketTable(table.fd))
        else:
            self.peers = share_until_exit(self.core, table, handed)  # type: ignore[arg-type]

    @property
    def limiter(self) -> Limiter:
        return self.core.limiter  # type: ignore[return-value]

    def close(self) -> None:
        if self.peers is not None:
            self.peers.close()


def _hand_over(old: OldAgent) -> tuple[BucketTable, int] | None:
    async def scenario() -> tuple[BucketTable, int] | None:
        name = _name()
        server = await old.serve(name)
        try:
            return await asyncio.to_thread(continued_buckets, name)
        finally:
            await server.stop()

    return asyncio.run(asyncio.wait_for(scenario(), 10))


def _successor(old: OldAgent, mode: str) -> NewAgent:
    continued = _hand_over(old)
    assert continued is not None
    return NewAgent(*continued, mode)


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
        new = _successor(old, new_mode)
        # Same instant: no fresh burst for the pod, nor for the identity.
        assert _admitted(new.limiter, LIMIT, NOW, 3) == 0
        assert _admitted(new.limiter, PER_IDENTITY, NOW, 3, "spiffe://a") == 0
        assert _admitted(new.limiter, PER_IDENTITY, NOW, 2, "spiffe://b") == 2  # untouched
        # And the refill goes on from the predecessor's stamp: 1 rps, one second later.
        assert _admitted(new.limiter, LIMIT, NOW + 1.0, 3) == 1
        new.close()
    finally:
        old.close()


@pytest.mark.parametrize("new_mode", ["in-process", "shared"])
@pytest.mark.parametrize("old_mode", ["in-process", "shared"])
def test_while_both_agents_serve_every_take_of_either_comes_out_of_the_same_buckets(
    old_mode: str, new_mode: str
) -> None:
    """The predecessor's established connections still bring requests while it drains, and
    the successor's new ones too: with a single-process agent on either side (or both), a token
    one agent takes from a bucket the other already uses is gone for the other."""
    old = OldAgent(old_mode)
    try:
        assert _admitted(old.limiter, LIMIT, NOW, 1) == 1  # 2 of the burst of 3 left
        assert _admitted(old.limiter, PER_IDENTITY, NOW, 1, "spiffe://a") == 1  # 1 of 2 left
        new = _successor(old, new_mode)
        # The successor creates its buckets, then the old agent takes what is left of them.
        assert _admitted(new.limiter, LIMIT, NOW, 1) == 1
        assert _admitted(new.limiter, PER_IDENTITY, NOW, 1, "spiffe://a") == 1
        assert _admitted(old.limiter, LIMIT, NOW, 3) == 1
        assert _admitted(old.limiter, PER_IDENTITY, NOW, 2, "spiffe://a") == 0
        assert _admitted(new.limiter, LIMIT, NOW, 2) == 0  # gone for the successor
        assert _admitted(new.limiter, PER_IDENTITY, NOW, 2, "spiffe://a") == 0
        # The other way round, two seconds (two tokens of each) later.
        later = NOW + 2.0
        assert _admitted(new.limiter, LIMIT, later, 1) == 1
        assert _admitted(new.limiter, PER_IDENTITY, later, 1, "spiffe://a") == 1
        assert _admitted(old.limiter, LIMIT, later, 3) == 1
        assert _admitted(old.limiter, PER_IDENTITY, later, 2, "spiffe://a") == 1
        assert _admitted(new.limiter, LIMIT, later, 2) == 0  # gone for the successor
        assert _admitted(new.limiter, PER_IDENTITY, later, 2, "spiffe://a") == 0
        new.close()
    finally:
        old.close()


def test_a_bucket_the_middle_agent_never_touched_keeps_its_level_for_the_next_one() -> None:
    """Two upgrades in a row, single-process agents: the first exits before the second hands
    over, so the second is on in-process buckets again; it hands on the levels it continued and
    never used with its own buckets written in."""
    first = OldAgent("in-process")
    try:
        assert _admitted(first.limiter, LIMIT, NOW, 4) == 3
        continued = _hand_over(first)
        assert continued is not None
        second = OldAgent("in-process", SharedRateLimiter(continued[0]))
        leave_table(second.core, "the first")  # type: ignore[arg-type]  # it exited
        assert isinstance(second.limiter, RateLimiter)
        assert _admitted(second.limiter, PER_IDENTITY, NOW, 3, "spiffe://a") == 2  # its own
        third = _successor(second, "in-process")
        assert _admitted(third.limiter, LIMIT, NOW, 2) == 0  # the first agent's level
        assert _admitted(third.limiter, PER_IDENTITY, NOW, 2, "spiffe://a") == 0  # the second's
        third.close()
    finally:
        first.close()


def _sleeper() -> tuple[subprocess.Popen[bytes], int]:
    """An agent stand-in process and a pidfd of it."""
    proc = subprocess.Popen(["sleep", "60"])
    return proc, os.pidfd_open(proc.pid)


def test_an_agent_leaves_the_table_only_once_every_agent_on_it_has_exited() -> None:
    """A single-process agent still sharing its predecessor's table hands that table on to its
    own successor: the predecessor's exit leaves it on the table, the successor takes from it
    too; once that one has exited as well, it is back on in-process buckets."""
    table = _emptied_table()
    (before, before_fd), (after, after_fd) = _sleeper(), _sleeper()
    core = SimpleNamespace(limiter=None)
    peers = share_until_exit(core, table, handover.HandedBuckets(table.fd, 1, before_fd))  # type: ignore[arg-type]
    agent = SimpleNamespace(workers=None, proxy=SimpleNamespace(proxy=SimpleNamespace(core=core)))
    agent._table_peers = peers

    async def scenario() -> list[str]:
        seen = []
        peers.start()
        os.close(Agent._buckets_for_successor(agent, LAYOUT, after_fd))  # type: ignore[arg-type]
        for proc in (before, after):
            pidfd = os.pidfd_open(proc.pid)
            proc.kill()
            await _ended(pidfd)
            seen.append(type(core.limiter).__name__)
            proc.wait()
        return seen

    try:
        assert asyncio.run(asyncio.wait_for(scenario(), 10)) == [
            "SharedRateLimiter",
            "RateLimiter",
        ]
        assert table.fd == -1
        assert _admitted(core.limiter, LIMIT, NOW, 2) == 0  # the level goes on
    finally:
        peers.close()
        for proc in (before, after):
            proc.kill()
            proc.wait()


async def _ended(pidfd: int) -> None:
    """Wait until the process of ``pidfd`` has ended and the loop has run what watched it (a
    pidfd of our own: the poll that finds it ready finds every other pidfd of that process
    ready too, and their callbacks run in that same turn of the loop); closes ``pidfd``. The
    caller opens it before it ends the process: asyncio's child watcher reaps a process it
    started as soon as it exits, after which its pid no longer opens (``ProcessLookupError``)."""
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    loop.add_reader(pidfd, ended.set_result, None)
    await ended
    loop.remove_reader(pidfd)
    os.close(pidfd)
    await asyncio.sleep(0)


def test_an_old_agent_whose_successor_exited_is_back_on_its_own_buckets() -> None:
    """A successor that got the buckets and died (before taking over, say): the old
    single-process agent, which moved to the table it handed over, leaves it again, at its
    levels, rather than paying the table's price per limited request for the rest of its life."""
    old = OldAgent("in-process")
    fetch = (
        "import sys; from agent.app import continued_buckets; "
        "print(continued_buckets(bytes.fromhex(sys.argv[1])) is not None, flush=True); "
        "sys.stdin.readline()"
    )

    async def scenario() -> list[str]:
        name = _name()
        server = await old.serve(name)
        assert _admitted(old.limiter, LIMIT, NOW, 4) == 3
        new = await asyncio.create_subprocess_exec(
            sys.executable, "-c", fetch, name.hex(), cwd=Path(__file__).resolve().parents[3],
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert new.stdout is not None and await new.stdout.readline() == b"True\n"
        seen = [type(old.limiter).__name__]
        pidfd = os.pidfd_open(new.pid)
        new.kill()
        await _ended(pidfd)
        await new.wait()
        seen.append(type(old.limiter).__name__)
        await server.stop()
        return seen

    try:
        assert asyncio.run(asyncio.wait_for(scenario(), 20)) == [
            "SharedRateLimiter",
            "RateLimiter",
        ]
        assert _admitted(old.limiter, LIMIT, NOW, 2) == 0  # the level goes on
        assert _admitted(old.limiter, LIMIT, NOW + 1.0, 2) == 1
    finally:
        old.close()


# -- the predecessor's end: a process of its own ----------------------------------------------


def old_agent_process(name: str, mode: str) -> None:
    """A predecessor agent as a process (``python -c``): serves the handover on ``name`` (hex),
    says ``ready``, then per stdin line ``<now> <tries>`` prints how many its limiter admitted
    on ``LIMIT``; exits at the end of stdin."""
    old = OldAgent(mode)

    async def main() -> None:
        server = await old.serve(bytes.fromhex(name))
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            now, tries = line.split()
            print(_admitted(old.limiter, LIMIT, float(now), int(tries)), flush=True)
        await server.stop()

    asyncio.run(main())


class OldAgentProcess:
    """``old_agent_process`` run by ``python -c`` (this file's folder on its path)."""

    def __init__(self, name: bytes, mode: str) -> None:
        here = Path(__file__).resolve()
        code = (
            f"import sys; sys.path.insert(0, {str(here.parent)!r}); from {here.stem} import "
            f"old_agent_process; old_agent_process({name.hex()!r}, {mode!r})"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=here.parents[3],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"

    def admitted(self, now: float, tries: int) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{now} {tries}\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())


def _mapped(inode: int) -> bool:
    with open("/proc/self/maps") as maps:
        return any(line.split()[4] == str(inode) for line in maps)


def _fds_of(inode: int) -> list[int]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            if os.stat(f"/proc/self/fd/{fd}").st_ino == inode:
                out.append(int(fd))
    return out


@pytest.mark.parametrize("end", ["exits", "killed"])
@pytest.mark.parametrize("old_mode", ["in-process", "shared"])
def test_once_the_predecessor_is_gone_the_successor_is_back_on_its_own_buckets_at_their_levels(
    old_mode: str, end: str
) -> None:
    """A single-process successor leaves the table when the predecessor's process ends, on a
    clean exit or SIGKILL: its takes touch the table no more (descriptor and mapping released),
    and its buckets continue the levels, the ones it took from and the ones only the old agent
    did."""
    name = _name()
    old = OldAgentProcess(name, old_mode)
    try:
        assert old.admitted(NOW, 4) == 3  # the old agent empties the pod's bucket
        continued = continued_buckets(name)
        assert continued is not None
        table, handed = continued
        assert handed.pid == old.proc.pid and handed.exit_fd >= 0
        new = NewAgent(table, handed, "in-process")
        inode = os.fstat(table.fd).st_ino
        look = os.dup(table.fd)  # the test's own look at the table, never mapped
        assert _admitted(new.limiter, PER_IDENTITY, NOW, 3, "spiffe://a") == 2
        assert old.admitted(NOW + 1.0, 2) == 1  # the pod's bucket: only the old agent's
        if end == "killed":
            old.proc.kill()
        else:
            assert old.proc.stdin is not None
            old.proc.stdin.close()
        assert old.proc.wait(10) == (-9 if end == "killed" else 0)

        async def leaves() -> None:
            assert new.peers is not None
            new.peers.start()
            while not isinstance(new.limiter, RateLimiter):
                await asyncio.sleep(0.01)

        assert isinstance(new.limiter, SharedRateLimiter)
        asyncio.run(asyncio.wait_for(leaves(), 10))
        assert table.fd == -1 and not _mapped(inode)
        assert _fds_of(inode) == [look]  # the test's look is all that is left of the table
        content = os.pread(look, os.fstat(look).st_size, 0)
        # The levels go on, of a bucket only the old agent used and of one the new agent took
        # from in the table: no fresh burst, one token a second.
        assert _admitted(new.limiter, LIMIT, NOW + 1.0, 2) == 0
        assert _admitted(new.limiter, PER_IDENTITY, NOW, 2, "spiffe://a") == 0
        assert _admitted(new.limiter, LIMIT, NOW + 2.0, 2) == 1
        assert _admitted(new.limiter, PER_IDENTITY, NOW + 1.0, 2, "spiffe://a") == 1
        assert os.pread(look, len(content), 0) == content  # takes that left the table alone
        os.close(look)
    finally:
        if old.proc.poll() is None:
            old.proc.kill()
            old.proc.wait()


def _emptied_table() -> BucketTable:
    """A predecessor's table holding ``LIMIT``'s bucket of ``POD`` emptied at ``NOW``."""
    table = BucketTable(sharedbuckets.create_table(sets=64))
    assert _admitted(SharedRateLimiter(table), LIMIT, NOW, 4) == 3
    return table


def test_without_a_pidfd_of_the_predecessor_the_successor_stays_on_the_table_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    table = _emptied_table()
    handed = handover.HandedBuckets(table.fd, 4242, -1, "another PID namespace")
    core = SimpleNamespace(limiter=None)
    with caplog.at_level(logging.INFO):
        share_until_exit(core, table, handed)  # type: ignore[arg-type]
    assert isinstance(core.limiter, SharedRateLimiter) and core.limiter.table is table
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "another PID namespace" in lines[0], lines
    assert "stay on the shared bucket table" in lines[0]
    assert _admitted(core.limiter, LIMIT, NOW, 2) == 0
    table.release()


class _PeerWithoutPidfd:
    """A socket on a kernel before 6.5 (no ``SO_PEERPIDFD``) whose peer the kernel sees as
    pid ``seen`` (0: a process of another PID namespace)."""

    def __init__(self, seen: int) -> None:
        self.seen = seen

    def getsockopt(self, level: int, option: int, size: int = 0) -> int | bytes:
        if option == handover.SO_PEERPIDFD:
            raise OSError(92, "Protocol not available")
        assert option == socket.SO_PEERCRED
        return struct.pack("3i", self.seen, os.getuid(), os.getgid())


def test_before_linux_6_5_the_pid_is_watched_only_when_the_kernel_sees_the_same_pid() -> None:
    """The answer's pid is the old agent's in its own PID namespace: a DaemonSet's old and new
    pods have one each, where that pid names another process or none."""
    with pytest.raises(OSError, match="another PID namespace"):
        handover._peer_pidfd(_PeerWithoutPidfd(0), 4242)  # type: ignore[arg-type]
    pidfd = handover._peer_pidfd(_PeerWithoutPidfd(os.getpid()), os.getpid())  # type: ignore[arg-type]
    try:
        assert f"Pid:\t{os.getpid()}\n" in Path(f"/proc/self/fdinfo/{pidfd}").read_text()
    finally:
        os.close(pidfd)


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
    def broken(layout: int, successor: int) -> int:
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
