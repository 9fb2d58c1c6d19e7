"""A gRPC user's audit of the mesh: grpcio clients and servers through both nodes, every path.

Each test runs its checks over the paths of ``grpcmesh`` (a Service VIP to a pod on the other
node: both agents' HTTP/2 layers; the pod's declared port dialled directly: the destination's
alone; a Service VIP to a pod on the client's node: the source's alone; that pod's declared
port: the client's node as its destination), one mesh per test, grpcio on both ends as a user
would run it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from agent.proxy.server import NodeProxy
from agent.state import RouteObject
from tests.integration.proxy.grpcmesh import BYE, MIB, Path, every_path, method
from tests.integration.proxy.mesh import Mesh, mesh_test

pytestmark = pytest.mark.root


def _held_stream(
    channel: grpc.Channel, timeout: float = 60.0
) -> tuple[queue.Queue[bytes | None], Iterator[bytes]]:
    """A bidirectional call kept open: put messages in the queue (``BYE`` ends the call OK,
    None the requests alone), read answers."""
    outgoing: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        while (message := outgoing.get(timeout=30)) is not None:
            yield message
            if message == BYE:
                return

    return outgoing, method(channel, "Chat")(requests(), timeout=timeout)


CANCELLED_CALLS = 120  # over H2Limits.max_premature_resets (100) and half the streams


def _cancel_after_first_answers(path: Path) -> None:
    with grpc.insecure_channel(path.capture.target) as channel:
        outgoing, held = _held_stream(channel)
        outgoing.put(b"before")
        assert next(held) == b"before"
        for _ in range(CANCELLED_CALLS):
            call = method(channel, "Flood")(b"10", timeout=10)
            assert next(call) == b"f" * 10
            call.cancel()
            assert path.pod.cancelled.get(timeout=5) == "flood", path.name
        outgoing.put(b"after")
        assert next(held) == b"after", path.name  # the connection still serves its streams
        outgoing.put(BYE)
        assert list(held) == [], path.name
    assert path.capture.accepted == 1, f"{path.name}: the channel had to reconnect"


@mesh_test
async def test_streams_cancelled_after_their_answer_began_leave_the_connection_open(
    mesh: Mesh,
) -> None:
    """A client that cancels server-streaming calls once it read what it wanted (a watch, a
    search it stops early) resets each stream after its response began: not a rapid reset
    (Envoy counts a reset as premature only before the response and within 1 s of the
    stream's start). Before, the 101st such call closed the connection at the destination
    (GOAWAY ENHANCE_YOUR_CALM to the client, or the source's upstream reset: INTERNAL), and
    every other call on it failed."""
    async with every_path(mesh) as paths:
        for path in paths:
            await asyncio.to_thread(_cancel_after_first_answers, path)
    # Nothing stays held: no live connection left at either node (``/connections``).
    for _ in range(100):
        if not [*mesh.node1.core.registry.snapshot(), *mesh.node2.core.registry.snapshot()]:
            break
        await asyncio.sleep(0.05)
    assert mesh.node1.core.registry.snapshot() == mesh.node2.core.registry.snapshot() == []


def _long_stream_then_a_new_call(path: Path, drained: threading.Event) -> list[str]:
    """A bidirectional stream opened before the drain answers after it too and ends OK; a call
    made after the drain succeeds. Returns what happened, in order."""
    seen = []
    with grpc.insecure_channel(path.capture.target) as channel:
        outgoing, held = _held_stream(channel)
        outgoing.put(b"before")
        seen.append(next(held).decode())
        drained.wait(10)
        outgoing.put(b"during")
        seen.append(next(held).decode())
        seen.append(method(channel, "Collect")(iter([b"new"]), timeout=10).decode())
        outgoing.put(BYE)
        seen.append(str(len(list(held))))
    return seen


async def _upgrade_with_streams_open(
    mesh: Mesh, node: str, names: set[str]
) -> tuple[list[Path], NodeProxy]:
    """The paths ``names``, each with a stream open while ``node`` is upgraded (a successor
    takes what comes next, the old agent drains) and a new call after; the successor."""
    async with every_path(mesh) as paths:
        drained = threading.Event()
        chosen = [p for p in paths if p.name in names]
        calls = [asyncio.to_thread(_long_stream_then_a_new_call, p, drained) for p in chosen]
        running = asyncio.gather(*calls)
        await asyncio.sleep(0.5)  # each stream's first answer
        old: NodeProxy = getattr(mesh, node)
        new = mesh.successor(old)
        setattr(mesh, node, new)
        old.begin_drain()
        drained.set()
        try:
            assert await running == [["before", "during", "1:3", "0"]] * len(chosen)
        finally:
            old.close()
        return chosen, new


@mesh_test
async def test_a_source_agents_drain_sends_its_grpc_clients_goaway(mesh: Mesh) -> None:
    """The source agent drains (an upgrade, SIGTERM): its HTTP/2 clients get GOAWAY, so their
    next calls open a new connection, which the new agent takes, while the streams open on the
    old one go on until they end (or the drain's end), as Envoy drains HTTP/2 listeners.
    Before, nothing told them: every call kept going to the draining agent until its
    ``--drain-seconds`` cut them all."""
    paths, new = await _upgrade_with_streams_open(mesh, "node1", {"vip", "near", "near-pod"})
    assert [p.capture.accepted for p in paths] == [2, 2, 2]
    assert new.core.registry.total == 3  # the new connections


@mesh_test
async def test_a_destination_agents_drain_moves_new_calls_to_a_new_connection(
    mesh: Mesh,
) -> None:
    """The destination agent drains: its HTTP/2 clients (the source node's session, or the
    client itself on a declared pod port) get GOAWAY inside the HBONE stream, so new calls go
    on a new tunnel, over a new HBONE connection (the old one got node2's HBONE GOAWAY), which
    the new agent takes; the open streams go on. Before, the calls kept using the old tunnel
    until the drain's end cut it."""
    paths, new = await _upgrade_with_streams_open(mesh, "node2", {"vip", "pod"})
    assert [p.capture.accepted for p in paths] == [1, 2]  # the source agent's client stays
    assert new.core.registry.total == 2  # a tunnel for each new call
    assert mesh.node1.pool.dials == 2  # on a new HBONE connection


def _timeouts(mesh: Mesh, timeout: str) -> None:
    """An HTTPRoute with ``timeouts.request`` on ``front`` and on ``near``."""
    with mesh.store.update() as tx:
        for name in ("front", "near"):
            rule = {"backendRefs": [{"name": name, "port": 50051}],
                    "timeouts": {"request": timeout}}  # fmt: skip
            parent = {"group": "", "kind": "Service", "name": name, "port": 50051}
            spec = {"parentRefs": [parent], "rules": [rule]}
            tx.put_route(RouteObject("HTTPRoute", "default", name, spec, 1, name))


def _stalled_after_an_answer(path: Path, timeout: float) -> tuple[str, str, str]:
    """A bidirectional call whose server answered once and then waits for the client, which
    waits for the server: what the client reads, how the call ends, what the server saw."""
    with grpc.insecure_channel(path.capture.target) as channel:
        outgoing, held = _held_stream(channel, timeout)
        outgoing.put(b"one")
        first = next(held).decode()
        with pytest.raises(grpc.RpcError) as failed:
            next(held)
        outgoing.put(None)
        code = failed.value.code().name  # type: ignore[attr-defined]
        try:
            return first, code, path.pod.cancelled.get(timeout=5)
        except queue.Empty:
            raise AssertionError(path.name) from None


@mesh_test
async def test_a_route_timeout_after_the_answer_began_is_deadline_exceeded(mesh: Mesh) -> None:
    """A route's ``timeouts.request`` (300 ms) shorter than the call's own deadline (60 s)
    expires after the server's first message: the source ends the call with trailers
    ``grpc-status: 4`` (what the client read ended on a whole message), so grpcio reports
    DEADLINE_EXCEEDED, and the server sees its call cancelled (RST_STREAM CANCEL through both
    agents). Before, the client's stream was reset CANCEL: grpcio reported CANCELLED, as if the
    caller had cancelled it. The declared pod port has no route: the client's own deadline ends
    it there, DEADLINE_EXCEEDED too."""
    async with every_path(mesh) as paths:
        _timeouts(mesh, "300ms")
        for path in paths:
            own = 0.5 if path.name.endswith("pod") else 60.0
            got = await asyncio.to_thread(_stalled_after_an_answer, path, own)
            assert got == ("one", "DEADLINE_EXCEEDED", "chat"), path.name


LARGE = 4 * MIB  # above every HTTP/2 window on the way (65,535 default, 256 KiB, 1 MiB)
BIG = [("grpc.max_receive_message_length", 16 * MIB), ("grpc.max_send_message_length", 16 * MIB)]


def _interleaved(channel: grpc.Channel, count: int) -> int:
    """A bidirectional call where each message waits for the answer to the one before."""
    outgoing, held = _held_stream(channel)
    for i in range(count):
        outgoing.put(b"%d" % i)
        assert next(held) == b"%d" % i
    outgoing.put(BYE)
    assert list(held) == []
    return count


def _metadata(channel: grpc.Channel) -> tuple[object, ...]:
    sent = [(f"x-h{i}", "v" * 50) for i in range(60)] + [("x-raw-bin", bytes(range(256)))]
    answer, call = method(channel, "Meta").with_call(b"hi", metadata=sent, timeout=10)
    head, trailers = dict(call.initial_metadata()), dict(call.trailing_metadata())
    with pytest.raises(grpc.RpcError) as failed:  # a trailers-only error with its details
        method(channel, "Meta")(b"fail", timeout=10)
    error = failed.value
    details = dict(error.trailing_metadata())["grpc-status-details-bin"]  # type: ignore[attr-defined]
    return (answer, head["x-late"], head["x-late-bin"], dict(sent).items() <= trailers.items(),
            error.code().name, error.details(), details)  # type: ignore[attr-defined]  # fmt: skip


def _shapes(path: Path) -> None:
    """Every RPC shape and what gRPC puts in headers and trailers, on one channel."""
    # No BDP probing: the client's window stays 65,535 bytes, so the proxies hold data for it.
    with grpc.insecure_channel(
        path.capture.target, options=[*BIG, ("grpc.http2.bdp_probe", 0)]
    ) as ch:
        collect, chat, name = method(ch, "Collect"), method(ch, "Chat"), path.name
        assert collect(iter([b"x" * 100] * 300), timeout=10) == b"300:30000", name
        assert _interleaved(ch, 200) == 200, name
        calls = [chat(iter([b"m%d" % i] * 10 + [BYE]), timeout=10) for i in range(40)]
        assert [len(list(c)) for c in calls] == [10] * 40, name  # 40 at once on one connection
        assert collect(iter([b"u" * LARGE, b"u" * LARGE]), timeout=20) == b"2:%d" % (2 * LARGE)
        assert [len(m) for m in chat(iter([b"big:%d" % LARGE, BYE]), timeout=20)] == [LARGE]
        # The whole answer, then OK while the client has not ended (grpcio then resets
        # NO_ERROR): it all reaches the client, though part waits in the proxies for its window.
        outgoing, held = _held_stream(ch)
        outgoing.put(b"last:%d" % LARGE)
        assert [len(m) for m in held] == [LARGE], name
        outgoing.put(None)
        greet = method(ch, "Greet")
        assert list(greet(iter([b"then"]), timeout=10)) == [b"hello", b"then"], name
        with pytest.raises(grpc.RpcError) as stopped:  # answered while the client streams
            collect(iter([b"a", b"stop", *[b"more"] * 100]), timeout=10)
        assert stopped.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        assert _metadata(ch) == (b"hi", "yes", b"\0\xff", True, "NOT_FOUND", "asked to fail",
                                 b"\x08\x05details"), name  # fmt: skip
        outgoing, held = _held_stream(ch, timeout=0.3)  # the client's own deadline
        with pytest.raises(grpc.RpcError) as late:
            next(held)
        outgoing.put(None)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert path.pod.cancelled.get(timeout=5) == "chat", name
    assert path.capture.accepted == 1, name


@mesh_test
async def test_every_rpc_shape_and_its_metadata_pass_every_path(mesh: Mesh) -> None:
    """grpcio through each path: client-streaming (300 messages), interleaved bidirectional
    (200), 40 streams at once on one channel, 4 MiB messages both ways, an answer that ends
    before the client did, the server speaking first, an error while the client streams,
    60 headers and ``-bin`` metadata, headers sent late, trailers-only errors with
    ``grpc-status-details-bin``, a client deadline the server sees as a cancel; one connection
    each. The answer that ends first failed (INTERNAL) before session 20 when part of it
    still waited in a proxy (``test_h2proxy.py::test_a_whole_response_then_a_reset_...``)."""
    async with every_path(mesh) as paths:
        for path in paths:
            await asyncio.to_thread(_shapes, path)


KEEPALIVE = [
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def _keepalive(path: Path) -> None:
    """grpcio's aggressive keepalive (a PING every second, idle or not, no limit without
    data) is answered by the proxies, never refused as a flood: the idle channel's calls go on
    its one connection."""
    with grpc.insecure_channel(path.capture.target, options=KEEPALIVE) as channel:
        assert method(channel, "Meta")(b"a", timeout=10) == b"a"
        time.sleep(2.5)  # idle, pinging
        assert method(channel, "Meta")(b"b", timeout=10) == b"b"
    assert path.capture.accepted == 1, path.name


def _slow_reader(path: Path) -> int:
    """A client that reads two 1 MiB messages of an endless server stream, then nothing for a
    second: how many the server could hand to grpcio meanwhile (flow control holds it back
    within the windows on the way; a proxy that buffered without bound would let it run)."""
    with grpc.insecure_channel(path.capture.target, options=BIG) as channel:
        call = method(channel, "Flood")(b"%d" % MIB, timeout=10)
        next(call)
        next(call)
        time.sleep(1.0)
        produced = path.pod.produced
        call.cancel()
    return produced


@mesh_test
async def test_keepalive_pings_and_a_slow_reader_on_every_path(mesh: Mesh) -> None:
    """What ARCHITECTURE.md's PING limit (replies not taken by the shell) means for a stock
    grpcio client: nothing, even at a PING a second (Envoy and Linkerd answer them too; only
    a gRPC server enforces ``min_time_between_pings``). And a slow reader holds the server
    back through both agents (the windows bound what each holds)."""
    async with every_path(mesh) as paths:
        await asyncio.gather(*(asyncio.to_thread(_keepalive, p) for p in paths))
        for path in paths:  # one at a time: two paths share a pod
            path.pod.produced = 0
            produced = await asyncio.to_thread(_slow_reader, path)
            # The windows of grpcio (both ends, BDP-grown), the proxies and the sockets: a
            # few MiB; measured 9 on each path.
            assert produced <= 32, (path.name, produced)


def _cut(path: Path, cut: threading.Event) -> tuple[str, str]:
    with grpc.insecure_channel(path.capture.target) as channel:
        outgoing, held = _held_stream(channel)
        outgoing.put(b"one")
        first = next(held).decode()
        cut.set()
        with pytest.raises(grpc.RpcError) as failed:
            next(held)
        outgoing.put(None)
        return first, failed.value.code().name  # type: ignore[attr-defined]


@mesh_test
async def test_a_stream_cut_by_the_far_agents_end_is_unavailable(mesh: Mesh) -> None:
    """The destination agent's drain ends (``--drain-seconds``) or it dies with a stream open
    whose answer began: the source ends the call with trailers ``grpc-status: 14``, as grpcio
    connected to the pod itself would report the connection's loss (``UNAVAILABLE``, which
    clients and retry policies take as transient). Before, the stream was reset INTERNAL_ERROR:
    grpcio reported ``INTERNAL``, which reads as the server's bug."""
    async with every_path(mesh) as paths:
        vip = next(p for p in paths if p.name == "vip")
        cut = threading.Event()
        running = asyncio.to_thread(_cut, vip, cut)
        task = asyncio.ensure_future(running)
        await asyncio.to_thread(cut.wait, 10)
        await asyncio.sleep(0.2)
        mesh.node2.close()  # what ``--drain-seconds`` does to what is left
        assert await task == ("one", "UNAVAILABLE")
