"""The same-node splice end to end on loopback: the kernel moves a same-node connection's bytes.

The capture programs' generation (with the splice program) is compiled once into a scratch pin
directory under /sys/fs/bpf, removed afterwards; node1's proxy gets its splice maps, as the agent
does with ``--splice``. A recording ``Splicer`` tells whether a connection was spliced and lets
the tests read the kernel's counts. Root is needed for BPF, SO_MARK and IP_TRANSPARENT.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import uvloop

from agent.acceptor import drain
from agent.base.metrics import REGISTRY
from agent.datapath import bpfsys, programs
from agent.datapath.splice import KernelSplice, KernelSplicing
from agent.proxy import splice
from agent.state import PolicyObject
from agent.telemetry.tcp import TcpMetrics
from tests.integration.proxy.mesh import CLIENT, LOCAL, Mesh, listener, set_policies

pytestmark = pytest.mark.root


class Cookie(ctypes.Structure):
    """The splice maps' key, as a structure (what ``Map.keys`` iterates with)."""

    _fields_ = [("value", ctypes.c_uint64)]


class RecordingSplicer:
    """The kernel's splice, remembering every pair it started."""

    def __init__(self, kernel: KernelSplice) -> None:
        self.kernel = kernel
        self.started: list[KernelSplicing] = []
        self.delay = 0.0  # seconds to block before starting (bytes queue up meanwhile)

    def start(self, a: socket.socket, b: socket.socket, window: int) -> KernelSplicing:
        time.sleep(self.delay)
        splicing = self.kernel.start(a, b, window)
        self.started.append(splicing)
        return splicing

    def linked_sockets(self) -> int:
        return len(list(self.kernel.links.keys(Cookie)))


@pytest.fixture(scope="module")
def loaded() -> Iterator[programs.Loaded]:
    if os.geteuid() != 0:
        pytest.skip("BPF, SO_MARK and IP_TRANSPARENT need root")
    pin_dir = Path("/sys/fs/bpf") / f"nodemesh-test-splice-{uuid.uuid4().hex[:8]}"
    result = programs.load(pin_dir, programs.Marks())
    try:
        yield result
    finally:
        result.close()
        programs.remove_all(pin_dir)


@pytest.fixture
def splicer(loaded: programs.Loaded) -> RecordingSplicer:
    assert loaded.splice_unavailable is None, loaded.splice_unavailable
    m = loaded.maps
    return RecordingSplicer(
        KernelSplice(
            m["nm_splice_links"],
            m["nm_splice_credits"],
            m["nm_splice_targets"],
            m["nm_splice_sources"],
        )
    )


def run(scenario: Callable[[Mesh], Awaitable[None]], splicer: RecordingSplicer | None) -> None:
    async def main() -> None:
        mesh = Mesh()
        mesh.node1.core.splicer = splicer
        await mesh.start()
        try:
            await asyncio.wait_for(scenario(mesh), 60)
        finally:
            await mesh.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


async def request_response(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads the whole request (until the client half-closes), then answers and closes."""
    body = await reader.read()
    writer.write(b"got %d bytes, sha=%s" % (len(body), hashlib.sha256(body).hexdigest().encode()))
    await writer.drain()
    writer.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


BODY = os.urandom(8 * 1024 * 1024)
ANSWER = b"got %d bytes, sha=%s" % (len(BODY), hashlib.sha256(BODY).hexdigest().encode())


def test_kernel_moves_bytes_both_ways_and_half_close_reaches_the_server(
    splicer: RecordingSplicer,
) -> None:
    async def scenario(mesh: Mesh) -> None:
        metrics = TcpMetrics(mesh.store, access_log=False)
        mesh.node1.core.registry.observers.append(metrics)
        port = mesh.app(LOCAL, request_response)
        reader, writer = await mesh.connect(CLIENT, (LOCAL, port))
        writer.write(BODY)
        await writer.drain()
        writer.write_eof()  # the server answers only after it saw the client's FIN
        assert await asyncio.wait_for(reader.read(), 20) == ANSWER
        writer.close()
        await asyncio.sleep(0.1)
        assert len(splicer.started) == 1
        assert splicer.started[0].moved() == (len(BODY), len(ANSWER))
        assert splicer.linked_sockets() == 0  # taken out of the maps at the end
        sent = _metric(metrics, "istio_tcp_sent_bytes")
        received = _metric(metrics, "istio_tcp_received_bytes")
        assert (sent, received) == (len(BODY), len(ANSWER))

    run(scenario, splicer)


def test_live_counts_are_read_from_the_kernel_and_server_half_close_reaches_the_client(
    splicer: RecordingSplicer,
) -> None:
    async def scenario(mesh: Mesh) -> None:
        metrics = TcpMetrics(mesh.store, access_log=False)
        mesh.node1.core.registry.observers.append(metrics)
        port = mesh.app(LOCAL, echo)
        reader, writer = await mesh.connect(CLIENT, (LOCAL, port))
        writer.write(b"x" * 100_000)
        assert await asyncio.wait_for(reader.readexactly(100_000), 10) == b"x" * 100_000
        # Live: /connections and a scrape see the kernel's counts while the connection is open.
        [live] = metrics.live()
        assert (live["bytes_sent"], live["bytes_received"]) == (100_000, 100_000)
        assert _metric(metrics, "istio_tcp_sent_bytes") == 100_000
        [described] = mesh.node1.core.registry.snapshot()
        assert described["bytes_received"] == 100_000 and "sync" not in described
        writer.write_eof()  # echo ends, then closes: its FIN must reach the client
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()

    run(scenario, splicer)


def test_bytes_queued_before_the_splice_starts_are_not_stranded(
    splicer: RecordingSplicer,
) -> None:
    """A server that speaks first, and whose greeting waits in the upstream socket when the
    splice starts: the verdict runs when a segment arrives, and none will (the client waits for
    the greeting). The splice makes the kernel look at once (SO_RCVLOWAT); on 6.18 the
    watcher's first read does too, so this test holds the behaviour, not one mechanism."""
    server = socket.create_server((LOCAL, 0))
    port = server.getsockname()[1]

    def greet_then_echo() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"hello\n")
            while data := conn.recv(65536):
                conn.sendall(data)

    thread = threading.Thread(target=greet_then_echo, daemon=True)
    thread.start()
    splicer.delay = 0.3  # blocks the loop: the greeting arrives before the splice starts

    async def scenario(mesh: Mesh) -> None:
        reader, writer = await mesh.connect(CLIENT, (LOCAL, port))
        assert await asyncio.wait_for(reader.readline(), 5) == b"hello\n"
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        assert splicer.started[0].moved() == (4, 10)  # the kernel moved the greeting too
        writer.close()

    try:
        run(scenario, splicer)
    finally:
        server.close()
        thread.join(5)


def test_policy_change_closes_a_spliced_connection(splicer: RecordingSplicer) -> None:
    async def scenario(mesh: Mesh) -> None:
        port = mesh.app(LOCAL, echo)
        reader, writer = await mesh.connect(CLIENT, (LOCAL, port))
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        assert len(splicer.started) == 1
        deny_all = {"action": "DENY", "rules": [{}]}
        deny = PolicyObject("AuthorizationPolicy", "default", "p", deny_all)
        set_policies(mesh.store, deny)
        with pytest.raises(ConnectionResetError):
            while await asyncio.wait_for(reader.read(65536), 10):
                pass
        assert len(mesh.node1.core.registry) == 0
        assert splicer.linked_sockets() == 0
        writer.close()

    run(scenario, splicer)


def test_a_drain_closes_a_spliced_connection(splicer: RecordingSplicer) -> None:
    """The agent's drain cancels what the handler returned (``acceptor.drain``): for a spliced
    connection that is the splice's future, which ends it as a relay's would."""

    async def scenario(mesh: Mesh) -> None:
        port = mesh.app(LOCAL, echo)
        lst = listener("127.0.0.1")
        try:
            opening = asyncio.open_connection(*lst.getsockname(), local_addr=(CLIENT, 0))
            (reader, writer), (conn, _) = await asyncio.gather(
                opening, asyncio.get_running_loop().sock_accept(lst)
            )
        finally:
            lst.close()
        conn.setblocking(False)
        rest = await mesh.node1.outbound.handle(conn, original_dst=(LOCAL, port))
        assert rest is not None
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        assert len(splicer.started) == 1 and splicer.linked_sockets() == 2
        assert await drain({rest}, 0.2) == 1  # still open when the drain time is up
        with pytest.raises(ConnectionResetError):
            while await asyncio.wait_for(reader.read(65536), 10):
                pass
        assert len(mesh.node1.core.registry) == 0
        assert splicer.linked_sockets() == 0
        writer.close()

    run(scenario, splicer)


def test_a_receiver_that_does_not_read_holds_the_sender_back(splicer: RecordingSplicer) -> None:
    """The kernel's redirect alone would queue everything the client sends (measured: 2 GB);
    with the credit the client is held back, and every byte still arrives, in order."""
    body = os.urandom(128 * 1024 * 1024)
    answer = b"got %d bytes, sha=%s" % (len(body), hashlib.sha256(body).hexdigest().encode())

    async def scenario(mesh: Mesh) -> None:
        reading = asyncio.Event()

        async def late_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reading.wait()
            await request_response(reader, writer)

        port = mesh.app(LOCAL, late_reader)
        reader, writer = await mesh.connect(CLIENT, (LOCAL, port))
        writer.write(body)
        await asyncio.sleep(1.0)
        accepted = len(body) - writer.transport.get_write_buffer_size()
        assert accepted < 64 * 1024 * 1024, f"the node took {accepted} bytes for a reader at rest"
        assert splicer.started[0].kept(0) > 0  # the kernel kept bytes once the credit ran out
        reading.set()
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 30) == answer
        writer.close()

    run(scenario, splicer)


def test_bytes_the_kernel_keeps_are_forwarded_in_order(
    splicer: RecordingSplicer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tiny credit makes the kernel keep bytes again and again, both ways, so the proxy
    forwards kept bytes between the kernel's redirects."""
    monkeypatch.setattr(splice, "WINDOW", 64 * 1024)
    monkeypatch.setattr(splice, "REFRESH_FAST", 1.0)

    async def scenario(mesh: Mesh) -> None:
        port = mesh.app(LOCAL, echo)
        reader, writer = await mesh.connect(CLIENT, (LOCAL, port))
        received = bytearray()

        async def read_all() -> None:
            while data := await reader.read(1 << 20):
                received.extend(data)

        reading = asyncio.create_task(read_all())
        writer.write(BODY)
        writer.write_eof()
        await asyncio.wait_for(reading, 30)
        assert hashlib.sha256(received).digest() == hashlib.sha256(BODY).digest()
        pair = splicer.started[0]
        assert pair.kept(0) > 0 and pair.kept(1) > 0
        assert pair.moved()[0] > 0 and pair.moved()[1] > 0  # the kernel's share
        writer.close()

    run(scenario, splicer)


def test_without_a_splicer_same_node_bytes_are_relayed_in_user_space(
    splicer: RecordingSplicer,
) -> None:
    async def scenario(mesh: Mesh) -> None:
        port = mesh.app(LOCAL, request_response)
        reader, writer = await mesh.connect(CLIENT, (LOCAL, port))
        writer.write(BODY)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 20) == ANSWER
        writer.close()

    run(scenario, None)  # the agent without --splice
    assert splicer.started == []


def test_a_worker_splices_with_the_map_descriptors_it_inherited(
    loaded: programs.Loaded,
) -> None:
    """A worker process (``--workers N``) never opens the pins: it gets the main process's map
    descriptors (``--splice-fds``) and builds its splicer on them (``KernelSplice.from_fds``)."""
    m = loaded.maps
    main_process = KernelSplice(
        m["nm_splice_links"], m["nm_splice_credits"], m["nm_splice_targets"], m["nm_splice_sources"]
    )
    inherited = [os.dup(fd) for fd in main_process.fds()]  # what exec hands the worker
    try:
        worker = RecordingSplicer(KernelSplice.from_fds(inherited))

        async def scenario(mesh: Mesh) -> None:
            port = mesh.app(LOCAL, request_response)
            reader, writer = await mesh.connect(CLIENT, (LOCAL, port))
            writer.write(BODY)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 20) == ANSWER
            writer.close()

        run(scenario, worker)
        assert [pair.stop() for pair in worker.started] == [(len(BODY), len(ANSWER))]
    finally:
        for fd in inherited:
            os.close(fd)
    with pytest.raises(ValueError, match="4 map descriptors"):
        KernelSplice.from_fds(inherited[:3])


def _metric(metrics: TcpMetrics, name: str) -> float:
    total = 0.0
    for family in metrics.collect():
        for sample in family.samples:
            if sample.name == f"{name}_total":
                total += sample.value
    return total


def test_a_restarted_agent_adopts_the_splice_and_a_generation_without_it_says_why(
    loaded: programs.Loaded,
) -> None:
    pin_dir = loaded.directory.parent
    again = programs.load(pin_dir, programs.Marks())
    try:
        assert again.adopted and again.splice_unavailable is None
    finally:
        again.close()
    # A generation pinned by an agent whose kernel refused the program has no prog_splice.
    without = pin_dir.with_name(pin_dir.name + "-nosplice")
    try:
        (without / loaded.generation).mkdir(parents=True)
        for entry in (loaded.directory).iterdir():
            if entry.name != programs.SPLICE_PIN:  # bpffs cannot copy: pin the objects again
                fd = bpfsys.open_pinned(str(entry))
                bpfsys.pin(fd, str(without / loaded.generation / entry.name))
                os.close(fd)
        adopted = programs.load(without, programs.Marks())
        try:
            assert adopted.adopted and adopted.splice_program is None
            assert "the kernel refused the splice program" in (adopted.splice_unavailable or "")
        finally:
            adopted.close()
    finally:
        programs.remove_all(without)


# TCP_REPAIR (linux/tcp.h): rewind a client's send sequence to replay bytes the proxy already
# received, as a retransmission does.
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS = 19, 20, 21, 22
TCP_TIMESTAMP, TCP_REPAIR_WINDOW = 24, 29
TCP_RECV_QUEUE, TCP_SEND_QUEUE = 1, 2
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8


def _replaying(sock: socket.socket, rewind: int) -> socket.socket:
    """A new socket that continues ``sock``'s connection with its send sequence ``rewind``
    bytes back (``sock`` is closed silently): what it sends next starts ``rewind`` bytes before
    what the peer already received, as a retransmission that spans old and new bytes does.
    ``sock``'s sent bytes must all be acknowledged."""
    tcp = socket.IPPROTO_TCP
    sock.setsockopt(tcp, TCP_REPAIR, 1)
    sock.setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    snd = sock.getsockopt(tcp, TCP_QUEUE_SEQ, 4)
    sock.setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
    rcv = sock.getsockopt(tcp, TCP_QUEUE_SEQ, 4)
    window = sock.getsockopt(tcp, TCP_REPAIR_WINDOW, 20)
    stamp = sock.getsockopt(tcp, TCP_TIMESTAMP)
    info = sock.getsockopt(tcp, socket.TCP_INFO, 24)
    snd_wscale, rcv_wscale = info[6] & 0x0F, info[6] >> 4
    mss = int.from_bytes(info[16:20], "little")
    local, peer = sock.getsockname(), sock.getpeername()
    sock.close()  # in repair mode: no FIN, no RST
    new = socket.socket()
    new.setsockopt(tcp, TCP_REPAIR, 1)
    new.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    new.setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    seq = (int.from_bytes(snd, "little") - rewind) & 0xFFFFFFFF
    new.setsockopt(tcp, TCP_QUEUE_SEQ, seq.to_bytes(4, "little"))
    new.setsockopt(tcp, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
    new.setsockopt(tcp, TCP_QUEUE_SEQ, rcv)
    new.bind(local)
    new.connect(peer)
    options = b"".join(
        code.to_bytes(4, "little") + value.to_bytes(4, "little")
        for code, value in (
            (TCPOPT_MAXSEG, mss),
            (TCPOPT_WINDOW, snd_wscale | rcv_wscale << 16),
            (TCPOPT_SACK_PERM, 0),
            (TCPOPT_TIMESTAMP, 0),
        )
    )
    new.setsockopt(tcp, TCP_REPAIR_OPTIONS, options)
    new.setsockopt(tcp, TCP_TIMESTAMP, stamp)
    new.setsockopt(tcp, TCP_REPAIR_WINDOW, window)
    new.setsockopt(tcp, TCP_REPAIR, 0)
    return new


@pytest.mark.parametrize("credit", ["redirected", "kept"])
def test_a_retransmission_that_overlaps_delivered_bytes_is_not_delivered_twice(
    splicer: RecordingSplicer, monkeypatch: pytest.MonkeyPatch, credit: str
) -> None:
    """A retransmitted segment that starts before what the proxy's socket already received and
    ends after it is queued whole by TCP (``tcp_data_queue``: "partial packet"); a reader skips
    the old part by sequence number, but the kernel hands the verdict whole skbs
    (``tcp_read_skb``). The splice must pass on only the new bytes, whether the kernel
    redirects the segment or (credit used up) keeps it for the proxy. Driven exactly: the
    client rewinds its send sequence (TCP_REPAIR) and sends old and new bytes in one segment."""
    if credit == "kept":
        monkeypatch.setattr(splice, "WINDOW", 1)  # every segment is kept for the proxy
        monkeypatch.setattr(splice, "REFRESH_FAST", 1.0)
    first, rewind = 64 * 1024, 4000
    body = BODY[: first + rewind]
    trimmed_before = _trimmed_total()

    async def scenario(mesh: Mesh) -> None:
        loop = asyncio.get_running_loop()
        got = bytearray()
        arrived = asyncio.Event()

        async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                got.extend(data)
                if len(got) >= first:
                    arrived.set()
            writer.close()

        port = mesh.app(LOCAL, record)
        lst = listener("127.0.0.1")
        client = socket.socket()
        client.bind((CLIENT, 0))
        client.setblocking(False)
        try:
            connecting = loop.sock_connect(client, lst.getsockname())
            _, (conn, _) = await asyncio.gather(connecting, loop.sock_accept(lst))
        finally:
            lst.close()
        conn.setblocking(False)
        rest = await mesh.node1.outbound.handle(conn, original_dst=(LOCAL, port))
        assert rest is not None and len(splicer.started) == 1
        await loop.sock_sendall(client, body[:first])
        await asyncio.wait_for(arrived.wait(), 10)
        while _unacked(client):  # every byte acknowledged before the connection is moved
            await asyncio.sleep(0.001)
        replay = _replaying(client, rewind)
        try:
            replay.sendall(body[first - rewind :])
            replay.shutdown(socket.SHUT_WR)
            await asyncio.wait_for(rest, 10)
        finally:
            replay.close()
        assert len(got) == len(body), f"{len(got) - len(body)} bytes delivered twice"
        assert bytes(got) == body
        pair = splicer.started[0]
        assert (pair.kept(0) > 0) == (credit == "kept")
        # What was cut off is counted, for the node's operators (and only here: the other
        # direction carried nothing).
        assert 0 < pair.trimmed() < rewind
        assert _trimmed_total() - trimmed_before == pair.trimmed()

    run(scenario, splicer)


def _trimmed_total() -> float:
    value = REGISTRY.get_sample_value("nodemesh_splice_trimmed_bytes_total")
    return value or 0.0


def _unacked(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    return int.from_bytes(info[24:28], "little")  # tcpi_unacked
