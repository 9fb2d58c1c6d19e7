"""What the agent leaves in its sockets' kernel send queues toward a reader that stopped, over
the real relays and real sockets on loopback (``mesh.Mesh``: both proxies in this process).

For each socket the proxy writes to: node2's socket to the server pod (cross-node) and node1's
to a pod of its own node (same node), node1's accepted socket of the client pod (the responses),
and both ends' HBONE connection sockets (TLS), the reader first reads fast (so the kernel grows
the agent's send buffer toward ``tcp_wmem``'s maximum), then stops, while the sender keeps
writing. Once everything up to the sender is backed up, the agent's socket may hold at most
``UNSENT_LOWAT`` plus the segment being filled unsent (``TCP_INFO``'s ``tcpi_notsent_bytes``),
though its send buffer grew to far more; before ``limit_unsent`` it held megabytes. Once the
reader reads again every byte arrives, complete and in order.

The reader's receive buffer is fixed small (``SO_RCVBUF`` before the connection exists, or on
the connected socket) so that its own kernel queue does not absorb what the test is about: on
loopback autotuning would let it take up to ``tcp_rmem``'s maximum (32 MiB here) first. An HBONE
reader is "stopped" by pausing its transport (``pause_reading``): the peer agent does not read
its socket. No timing in the assertions: the waits wait for states (with a cap for a broken run).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import select
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from agent.proxy.h2wire import KIB, MIB
from agent.proxy.sockets import UNSENT_LOWAT
from tests.integration.proxy.mesh import CLIENT, LOCAL, SERVER, Mesh, listener, mesh_test
from tests.integration.proxy.test_hbone_queue_stalled_pods_loopback import until

pytestmark = pytest.mark.root

# The segment being filled when the kernel stops taking more: at most loopback's GSO size, 64 KiB
# unless BIG TCP raised it (``ip -d link show lo``: gso_max_size).
SEGMENT = 64 * KIB
BOUND = UNSENT_LOWAT + SEGMENT
READER_RCVBUF = 64 * KIB  # asked of the reader's socket (the kernel doubles it)
FAST = 16 * MIB  # read at full speed before the reader stops
CHUNK = 256 * KIB

Result = TypeVar("Result")

_TCP_INFO_LEN = 232
_OFF_NOTSENT = 144  # struct tcp_info.tcpi_notsent_bytes (u32), Linux >= 4.6


def unsent(sock: socket.socket) -> int:
    """Bytes written into ``sock`` that TCP has not sent yet."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    return int(struct.unpack_from("=I", raw, _OFF_NOTSENT)[0])


def writable(sock: socket.socket) -> bool:
    poll = select.poll()
    poll.register(sock.fileno(), select.POLLOUT)
    return bool(poll.poll(0))


def duplicate(fd: int) -> socket.socket:
    """A socket object on a duplicate of ``fd`` that leaves its flags alone (``socket.dup``
    would make the shared descriptor blocking under the event loop that owns it)."""
    return socket.socket(fileno=os.dup(fd))


def socket_to(peer: tuple[str, int]) -> socket.socket:
    """A duplicate of this process's one TCP socket connected to ``peer`` (the proxies own
    the original; the duplicate reads the same kernel socket). The caller closes it."""
    found: dict[int, socket.socket] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(name))
            if not stat.S_ISSOCK(st.st_mode) or st.st_ino in found:
                continue
            dup = duplicate(int(name))
        except OSError:  # the listing's own descriptor, or one closed meanwhile
            continue
        try:
            if dup.type == socket.SOCK_STREAM and dup.getpeername() == peer:
                found[st.st_ino] = dup
                continue
        except OSError:  # not connected (a listener)
            pass
        dup.close()
    assert len(found) == 1, f"one socket to {peer}, found {len(found)}"
    return next(iter(found.values()))


def chunk_of(index: int) -> bytes:
    head = index.to_bytes(8)
    return head * (CHUNK // len(head))


@dataclass
class Pusher:
    """Writes chunks as fast as the path takes them until ``stop``, then half-closes."""

    writer: asyncio.StreamWriter
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def blocked(self) -> bool:
        """The kernel refused some of our bytes: everything after us is backed up."""
        return self.writer.transport.get_write_buffer_size() > 0

    async def run(self) -> tuple[int, str]:
        digest, n, index = hashlib.sha256(), 0, 0
        while not self.stop.is_set():
            chunk = chunk_of(index)
            self.writer.write(chunk)
            digest.update(chunk)
            n, index = n + len(chunk), index + 1
            await self.writer.drain()
        self.writer.write_eof()
        return n, digest.hexdigest()


class Reader:
    """Reads ``FAST`` bytes, then nothing until ``resume``, then everything to the end."""

    def __init__(self) -> None:
        self.got = 0
        self.resume = asyncio.Event()

    async def run(self, read: Callable[[], Awaitable[bytes]]) -> tuple[int, str]:
        digest = hashlib.sha256()
        while data := await read():
            digest.update(data)
            self.got += len(data)
            if self.got >= FAST:
                await self.resume.wait()
        return self.got, digest.hexdigest()


class Pod:
    """A pod's server on ``ip`` with a small fixed receive buffer: reads its one connection
    with ``reader`` (raw socket reads: nothing reads ahead in user space), or pushes to it.
    The mesh closes its listener and cancels its task."""

    def __init__(self, mesh: Mesh, ip: str, reader: Reader | None = None) -> None:
        self.sock = listener(ip)
        mesh._sockets.append(self.sock)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, READER_RCVBUF)
        self.port = int(self.sock.getsockname()[1])
        self.reader = reader
        self.pusher: Pusher | None = None
        self.done: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        mesh._tasks.append(asyncio.create_task(self._serve_one()))

    async def _serve_one(self) -> None:
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(self.sock)
        conn.setblocking(False)
        if self.reader is None:
            _, writer = await asyncio.open_connection(sock=conn)
            self.pusher = Pusher(writer)
            try:
                self.done.set_result(await self.pusher.run())
            finally:
                writer.close()
            return
        with conn:
            self.done.set_result(await self.reader.run(lambda: loop.sock_recv(conn, MIB)))


@dataclass
class Run:
    """One path's scenario: who pushes, who reads, which agent socket is watched."""

    pusher: Callable[[], Pusher | None]
    sent: Callable[[], Awaitable[tuple[int, str]]]
    received: Callable[[], Awaitable[tuple[int, str]]]
    stop_reading: Callable[[], None]
    resume_reading: Callable[[], None]
    agent_socket: Callable[[], socket.socket]
    reading_fast: Callable[[], bool]
    client: asyncio.StreamWriter  # the client pod's end, closed after the run


def task(mesh: Mesh, coro: Coroutine[Any, Any, Result]) -> asyncio.Task[Result]:
    """A task the mesh cancels when it closes (also when the test failed)."""
    made = asyncio.create_task(coro)
    mesh._tasks.append(made)  # type: ignore[arg-type]  # awaited only to be cancelled
    return made


async def to_pod(mesh: Mesh, ip: str, *, reader: Reader) -> tuple[Pod, Pusher]:
    pod = Pod(mesh, ip, reader)
    _, writer = await mesh.connect(CLIENT, (ip, pod.port))
    return pod, Pusher(writer)


async def pod_stops(mesh: Mesh, ip: str) -> Run:
    """The client pushes, the pod (on ``ip``) stops reading: the agent's socket to the pod."""
    reader = Reader()
    pod, pusher = await to_pod(mesh, ip, reader=reader)
    sending = task(mesh, pusher.run())
    return Run(
        pusher=lambda: pusher,
        sent=lambda: _stop(pusher, sending),
        received=lambda: pod.done,
        stop_reading=lambda: None,
        resume_reading=reader.resume.set,
        agent_socket=lambda: socket_to((ip, pod.port)),
        reading_fast=lambda: reader.got >= FAST,
        client=pusher.writer,
    )


async def _stop(pusher: Pusher, sending: asyncio.Task[tuple[int, str]]) -> tuple[int, str]:
    pusher.stop.set()
    return await sending


async def client_stops(mesh: Mesh) -> Run:
    """The server pod pushes, the client stops reading: node1's accepted socket of the client."""
    pod = Pod(mesh, SERVER)
    reader_stream, writer = await mesh.connect(CLIENT, (SERVER, pod.port))
    client = writer.get_extra_info("socket")
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, READER_RCVBUF)
    reader = Reader()
    receiving = task(mesh, reader.run(lambda: reader_stream.read(MIB)))
    await until(lambda: pod.pusher is not None, "the pod pushes")

    async def sent() -> tuple[int, str]:
        assert pod.pusher is not None
        pod.pusher.stop.set()
        return await pod.done

    return Run(
        pusher=lambda: pod.pusher,
        sent=sent,
        received=lambda: receiving,
        stop_reading=lambda: None,
        resume_reading=reader.resume.set,
        agent_socket=lambda: socket_to(client.getsockname()),
        reading_fast=lambda: reader.got >= FAST,
        client=writer,
    )


async def hbone_peer_stops(mesh: Mesh, *, node1_stops: bool) -> Run:
    """Bytes through one HBONE connection whose receiving agent stops reading its socket: the
    client pushes and node2 stops (node1's HBONE socket is watched), or the server pod pushes
    and node1 stops (node2's). The pod and the client read throughout."""
    mesh.hbone.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, READER_RCVBUF)  # node2's end
    run = await (client_stops(mesh) if node1_stops else pod_stops(mesh, SERVER))
    run.resume_reading()
    await until(
        lambda: len(mesh.node1.pool.connections()) == len(mesh.node2.inbound.connections) == 1,
        "the HBONE connection is up at both ends",
    )
    node1_sock = socket_to((SERVER, mesh.hbone_port))
    mesh._sockets.append(node1_sock)  # a duplicate: closing it leaves the connection be
    node1_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, READER_RCVBUF)
    (node1_end,) = mesh.node1.pool.connections()
    (node2_end,) = mesh.node2.inbound.connections
    stopping = node1_end if node1_stops else node2_end
    assert stopping.transport is not None
    transport = stopping.transport

    def watched() -> socket.socket:
        if node1_stops:  # node2's end of the connection
            return socket_to(node1_sock.getsockname())
        return duplicate(node1_sock.fileno())

    return dataclasses.replace(
        run,
        stop_reading=transport.pause_reading,
        resume_reading=transport.resume_reading,
        agent_socket=watched,
    )


async def hold_and_release(run: Run, path: str) -> None:
    try:
        await _hold_and_release(run, path)
    finally:
        run.client.close()


async def _hold_and_release(run: Run, path: str) -> None:
    await until(run.reading_fast, "the reader read fast first")
    run.stop_reading()
    agent = run.agent_socket()
    with agent:

        def backed_up() -> bool:
            pusher = run.pusher()
            return pusher is not None and pusher.blocked() and not writable(agent)

        await until(
            lambda: unsent(agent) > BOUND or backed_up(),
            "the path backed up to the sender",
        )
        held = unsent(agent)
        sndbuf = agent.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        print(f"{path}: {held} bytes unsent, send buffer {sndbuf}")
        assert held <= BOUND, f"{path}: {held} bytes unsent, more than {BOUND}"
        assert sndbuf > 2 * BOUND  # autotuning grew it: what bounds the queue is the option
    run.resume_reading()
    sent = await asyncio.wait_for(run.sent(), 100)
    received = await asyncio.wait_for(run.received(), 100)
    assert received == sent  # every byte, complete and in order
    assert sent[0] > FAST


PATHS: dict[str, Callable[[Mesh], Awaitable[Run]]] = {
    "node2 to the server pod": lambda mesh: pod_stops(mesh, SERVER),
    "node1 to a pod of its node": lambda mesh: pod_stops(mesh, LOCAL),
    "node1 to the client pod": client_stops,
    "node1's HBONE socket": lambda mesh: hbone_peer_stops(mesh, node1_stops=False),
    "node2's HBONE socket": lambda mesh: hbone_peer_stops(mesh, node1_stops=True),
}


def _path_test(path: str) -> Callable[[], None]:
    async def scenario(mesh: Mesh) -> None:
        await hold_and_release(await PATHS[path](mesh), path)

    scenario.__name__ = "test_" + path.replace(" ", "_").replace("'", "")
    return mesh_test(scenario)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_stopped_reader_finds_at_most_the_bound_unsent_and_gets_every_byte(path: str) -> None:
    _path_test(path)()
