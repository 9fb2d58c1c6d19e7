"""A gRPC user's audit of the mesh: grpcio clients and servers through both nodes, three paths.

Each test runs its checks over the three paths of ``grpcmesh`` (a Service VIP to a pod on the
other node: both agents' HTTP/2 layers; the pod's declared port dialled directly: the
destination's alone; a Service VIP to a pod on the client's node: the source's alone), one
mesh per test, grpcio on both ends as a user would run it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator

import grpc
import pytest

from agent.proxy.server import NodeProxy
from agent.state import RouteObject
from tests.integration.proxy.grpcmesh import BYE, Path, method, three_paths
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
    async with three_paths(mesh) as paths:
        for path in paths:
            await asyncio.to_thread(_cancel_after_first_answers, path)


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
    async with three_paths(mesh) as paths:
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
    paths, new = await _upgrade_with_streams_open(mesh, "node1", {"vip", "near"})
    assert [p.capture.accepted for p in paths] == [2, 2]
    assert new.core.registry.total == 2  # the two new connections


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
    async with three_paths(mesh) as paths:
        _timeouts(mesh, "300ms")
        for path in paths:
            own = 0.5 if path.name == "pod" else 60.0
            got = await asyncio.to_thread(_stalled_after_an_answer, path, own)
            assert got == ("one", "DEADLINE_EXCEEDED", "chat"), path.name
