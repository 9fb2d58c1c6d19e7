"""The socket-to-socket relay's splice path (``relay._Direction``, ``splicepipe``): bulk moves
without user-space copies, small messages stay on the copy path, byte order and counts survive
partial writes, half-closes and resets, the shared pipe is empty after every callback, and
without splice (no pipe, a socket that refuses it) the relay copies as before."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import random
import socket
import struct
import termios
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from agent.base.accepted import accepting
from agent.proxy import relay, sockets, splicepipe
from agent.proxy.relay import relay_sockets
from agent.telemetry.records import ConnectionRecord
from tests.unit.proxy.recvs import recv_exactly, recv_to_eof


class Counting(socket.socket):
    """A socket that counts the bytes the relay reads from it into user space."""

    copied_in = 0
    reads = 0

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        n = super().recv_into(buffer, nbytes, flags)
        self.reads += 1
        self.copied_in += n
        return n


def tcp_pair(listener: socket.socket) -> tuple[socket.socket, Counting]:
    """(outside end, relay's end), both non-blocking; the relay's end counts its reads."""
    outside = socket.create_connection(listener.getsockname())
    inside, _ = listener.accept()
    ours = Counting(fileno=inside.detach())
    for s in (outside, ours):
        s.setblocking(False)
    return outside, ours


@pytest.fixture
def pairs() -> Iterator[tuple[socket.socket, Counting, Counting, socket.socket]]:
    """(client, relay's client side, relay's upstream side, upstream): two TCP connections."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client, near = tcp_pair(listener)
        upstream, far = tcp_pair(listener)
    try:
        yield client, near, far, upstream
    finally:
        for s in (client, near, far, upstream):
            s.close()


@pytest.fixture(autouse=True)
def fresh_pipe() -> Iterator[None]:
    splicepipe.forget()
    yield
    splicepipe.forget()


class Splices:
    """``os.splice`` as the relay calls it, counted; ``fail`` decides an error per call."""

    def __init__(self, real: Callable[..., int]) -> None:
        self.real = real
        self.calls: list[tuple[int, int]] = []  # (src fd, dst fd)
        self.fail: Callable[[int, int], OSError | None] = lambda src, dst: None

    def __call__(self, src: int, dst: int, count: int, *args: Any) -> int:
        self.calls.append((src, dst))
        if (error := self.fail(src, dst)) is not None:
            raise error
        return self.real(src, dst, count, *args)

    def reads_from(self, fd: int) -> int:
        return sum(1 for src, _ in self.calls if src == fd)


@pytest.fixture
def splices(monkeypatch: pytest.MonkeyPatch) -> Splices:
    assert splicepipe.splice is not None, "these tests need os.splice (Linux, Python >= 3.10)"
    spy = Splices(splicepipe.splice)
    monkeypatch.setattr(splicepipe, "splice", spy)
    return spy


def record() -> ConnectionRecord:
    return ConnectionRecord(direction="outbound", source="10.0.0.1:1000", destination="10.0.0.2:80")


def pipe_holds() -> int:
    """Bytes in the process's splice pipe (0 when there is none)."""
    pipe = splicepipe._pipe
    if pipe is None:
        return 0
    raw = fcntl.ioctl(pipe.r, termios.FIONREAD, b"\0" * 4)
    held: int = struct.unpack("i", raw)[0]
    return held


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def test_bulk_after_one_large_read_is_spliced_not_copied(
    pairs: tuple[socket.socket, Counting, Counting, socket.socket],
    splices: Splices,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once a read filled ``SPLICE_AFTER`` (here any read), the relay reads its source only by
    splicing: one ``recv_into`` in 8 MiB, and every byte arrives in order."""
    client, near, far, upstream = pairs
    monkeypatch.setattr(relay, "SPLICE_AFTER", 1)
    data = payload(8 << 20, 1)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        rec = record()
        task = asyncio.create_task(relay_sockets(near, far, rec))
        writer = asyncio.create_task(loop.sock_sendall(client, data))
        assert await recv_exactly(upstream, len(data)) == data
        await writer
        client.shutdown(socket.SHUT_WR)
        upstream.shutdown(socket.SHUT_WR)
        assert await recv_to_eof(client) == b""
        await asyncio.wait_for(task, 10)
        assert (rec.bytes_sent, rec.bytes_received) == (len(data), 0)

    asyncio.run(main())
    assert near.reads == 1  # the first read; then splices only
    assert splices.reads_from(near.fileno()) > 1
    assert pipe_holds() == 0


def test_small_messages_stay_on_the_copy_path(
    pairs: tuple[socket.socket, Counting, Counting, socket.socket], splices: Splices
) -> None:
    """1 KB round trips never splice: a read below ``SPLICE_AFTER`` keeps ``recv_into``."""
    client, near, far, upstream = pairs

    async def main() -> None:
        task = asyncio.create_task(relay_sockets(near, far, record()))
        for i in range(20):
            msg = bytes([i]) * 1024
            client.send(msg)
            assert await recv_exactly(upstream, 1024) == msg
            upstream.send(msg)
            assert await recv_exactly(client, 1024) == msg
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert (near.reads, far.reads) == (20, 20)
    assert splices.calls == []


def test_a_read_below_the_threshold_goes_back_to_copying(
    pairs: tuple[socket.socket, Counting, Counting, socket.socket],
    splices: Splices,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, near, far, upstream = pairs
    monkeypatch.setattr(relay, "SPLICE_AFTER", 1000)

    async def step(size: int) -> tuple[int, int]:
        msg = os.urandom(size)
        client.send(msg)  # one loopback segment: one read
        assert await recv_exactly(upstream, size) == msg
        return near.reads, splices.reads_from(near.fileno())

    async def main() -> None:
        task = asyncio.create_task(relay_sockets(near, far, record()))
        assert await step(2000) == (1, 0)  # copied; large: the next read splices
        assert await step(2000) == (1, 1)
        assert await step(10) == (1, 2)  # spliced; small: back to copying
        assert await step(10) == (2, 2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


@pytest.mark.parametrize("threshold", [1, relay.SPLICE_AFTER])
def test_partial_writes_and_half_closes_keep_every_byte_in_order(
    pairs: tuple[socket.socket, Counting, Counting, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
    threshold: int,
) -> None:
    """Both ways at once, random write sizes, a slow reader behind small buffers (so the
    destination takes part of a splice and the rest waits in ``pending``), then half-closes:
    exact bytes, exact counts, an empty pipe."""
    client, near, far, upstream = pairs
    monkeypatch.setattr(relay, "SPLICE_AFTER", threshold)
    far.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    up, down = payload(6 << 20, 2), payload(3 << 20, 3)
    held: list[int] = []
    take = splicepipe.Pipe.take

    def counting_take(self: splicepipe.Pipe, n: int) -> bytes:
        held.append(n)
        return take(self, n)

    monkeypatch.setattr(splicepipe.Pipe, "take", counting_take)
    rng = random.Random(4)

    async def write(sock: socket.socket, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        at = 0
        while at < len(data):
            size = rng.randrange(1, 300 * 1024)
            await loop.sock_sendall(sock, data[at : at + size])
            at += size
        sock.shutdown(socket.SHUT_WR)

    async def slow_read(sock: socket.socket) -> bytes:
        loop = asyncio.get_running_loop()
        out = bytearray()
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, rng.randrange(1, 16384)), 10):
            out += chunk
            if rng.random() < 0.01:
                await asyncio.sleep(0.001)
        return bytes(out)

    async def main() -> None:
        rec = record()
        task = asyncio.create_task(relay_sockets(near, far, rec))
        results = await asyncio.gather(
            write(client, up), write(upstream, down), slow_read(upstream), recv_to_eof(client)
        )
        assert results[2] == up
        assert results[3] == down
        await asyncio.wait_for(task, 10)
        assert (rec.bytes_sent, rec.bytes_received) == (len(up), len(down))

    asyncio.run(main())
    assert held, "the destination never took less than a splice moved: nothing tested"
    assert pipe_holds() == 0


def test_a_failed_send_between_splices_leaves_nothing_for_the_next_connection(
    pairs: tuple[socket.socket, Counting, Counting, socket.socket],
    splices: Splices,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bytes in the shared pipe when the destination fails are that connection's: the
    relay fails, and the next relay delivers exactly its own bytes."""
    client, near, far, upstream = pairs
    monkeypatch.setattr(relay, "SPLICE_AFTER", 1)
    splices.fail = lambda src, dst: (
        ConnectionResetError(errno.ECONNRESET, "reset (test)") if dst == far.fileno() else None
    )

    async def first() -> None:
        task = asyncio.create_task(relay_sockets(near, far, record()))
        client.send(b"a" * 5000)
        assert await recv_exactly(upstream, 5000) == b"a" * 5000  # copied: the first read
        client.send(b"b" * 5000)  # spliced into the pipe, then the send fails
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(task, 10)

    async def second() -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            c2, n2 = tcp_pair(listener)
            u2, f2 = tcp_pair(listener)
        try:
            task = asyncio.create_task(relay_sockets(n2, f2, record()))
            for msg in (b"c" * 3000, b"d" * 3000):  # the second one is spliced
                c2.send(msg)
                assert await recv_exactly(u2, 3000) == msg
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        finally:
            for s in (c2, n2, u2, f2):
                s.close()

    asyncio.run(first())
    splices.fail = lambda src, dst: None
    asyncio.run(second())
    assert pipe_holds() == 0


def test_a_reset_destination_fails_the_relay_and_the_pipe_stays_empty(
    pairs: tuple[socket.socket, Counting, Counting, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, near, far, upstream = pairs
    monkeypatch.setattr(relay, "SPLICE_AFTER", 1)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(relay_sockets(near, far, record()))
        client.send(b"x" * 4096)
        await recv_exactly(upstream, 4096)
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        upstream.close()  # a reset: the relay's next splice to it fails
        writer = asyncio.create_task(loop.sock_sendall(client, b"y" * (1 << 20)))
        with pytest.raises(OSError):
            await asyncio.wait_for(task, 10)
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)

    asyncio.run(main())
    assert pipe_holds() == 0


def test_without_a_pipe_the_relay_copies_and_says_so_once(
    pairs: tuple[socket.socket, Counting, Counting, socket.socket],
    splices: Splices,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, near, far, upstream = pairs
    monkeypatch.setattr(relay, "SPLICE_AFTER", 1)

    def no_pipe(self: splicepipe.Pipe, size: int) -> None:
        raise OSError(errno.EMFILE, "Too many open files (test)")

    monkeypatch.setattr(splicepipe.Pipe, "__init__", no_pipe)
    data = payload(1 << 20, 5)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(relay_sockets(near, far, record()))
        writer = asyncio.create_task(loop.sock_sendall(client, data))
        reader = asyncio.create_task(loop.sock_sendall(upstream, data))
        assert await recv_exactly(upstream, len(data)) == data
        assert await recv_exactly(client, len(data)) == data
        await asyncio.gather(writer, reader)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.WARNING, logger=splicepipe.__name__):
        asyncio.run(main())
    assert near.copied_in == len(data) and far.copied_in == len(data)
    assert splices.calls == []
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "Too many open files" in said[0], said


@pytest.mark.parametrize("side", ["source", "destination"])
def test_a_socket_that_refuses_splice_is_copied_from_then_on(
    pairs: tuple[socket.socket, Counting, Counting, socket.socket],
    splices: Splices,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    side: str,
) -> None:
    """EINVAL from a splice (a kernel that cannot splice these sockets): the relay copies from
    then on, no byte lost, and says so once. Refused by the destination, the bytes already in
    the pipe go out through ``pending``."""
    client, near, far, upstream = pairs
    monkeypatch.setattr(relay, "SPLICE_AFTER", 1)
    pipe = splicepipe.get(relay.MAX_CHUNK)
    assert pipe is not None
    refused = (near.fileno(), pipe.w) if side == "source" else (pipe.r, far.fileno())
    splices.fail = lambda src, dst: (
        OSError(errno.EINVAL, "Invalid argument (test)") if (src, dst) == refused else None
    )
    data = payload(2 << 20, 6)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(relay_sockets(near, far, record()))
        writer = asyncio.create_task(loop.sock_sendall(client, data))
        assert await recv_exactly(upstream, len(data)) == data
        await writer
        client.send(b"more")
        assert await recv_exactly(upstream, 4) == b"more"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.WARNING, logger=splicepipe.__name__):
        asyncio.run(main())
    first = [(near.fileno(), pipe.w)] + ([] if side == "source" else [(pipe.r, far.fileno())])
    assert splices.calls == first  # refused once, copied from then on
    assert near.reads > 2  # copied before and after
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "Invalid argument" in said[0], said
    assert splicepipe.get(relay.MAX_CHUNK) is None  # and the process splices no more
    assert pipe_holds() == 0


def test_unix_sockets_are_never_spliced(splices: Splices, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay, "SPLICE_AFTER", 1)
    client, near = socket.socketpair()
    far, upstream = socket.socketpair()
    for s in (client, near, far, upstream):
        s.setblocking(False)

    async def main() -> None:
        task = asyncio.create_task(relay_sockets(near, far, record()))
        for _ in range(3):
            client.send(b"z" * 100_000)
            assert await recv_exactly(upstream, 100_000) == b"z" * 100_000
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    try:
        asyncio.run(main())
    finally:
        for s in (client, near, far, upstream):
            s.close()
    assert splices.calls == []


def test_a_forked_child_never_shares_the_parents_pipe() -> None:
    parent = splicepipe.get(relay.MAX_CHUNK)
    assert parent is not None
    pid = os.fork()
    if pid == 0:  # the child: ``forget`` ran at the fork
        os._exit(0 if splicepipe._pipe is None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert splicepipe._pipe is parent


def test_check_probe_splices_over_loopback() -> None:
    assert splicepipe.probe().startswith("available")


def test_the_proxys_own_sockets_may_be_spliced_others_not() -> None:
    """What the relay gets on the same-node path: ``sockets.upstream_socket`` (non-blocking
    from birth) and an accepted client socket once the acceptor made it non-blocking."""
    upstream = sockets.upstream_socket(0)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted = accepting(listener)()
    a, b = socket.socketpair()
    try:
        assert splicepipe.spliceable(upstream)
        assert not splicepipe.spliceable(accepted)  # blocking: a splice could wait
        accepted.setblocking(False)  # as ``acceptor`` does
        assert splicepipe.spliceable(accepted)
        a.setblocking(False)
        assert not splicepipe.spliceable(a)  # not TCP
    finally:
        for s in (upstream, client, accepted, a, b):
            s.close()
