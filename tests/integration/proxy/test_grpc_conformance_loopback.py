"""A gRPC user's audit of the mesh: grpcio clients and servers through both nodes, three paths.

Each test runs its checks over the three paths of ``grpcmesh`` (a Service VIP to a pod on the
other node: both agents' HTTP/2 layers; the pod's declared port dialled directly: the
destination's alone; a Service VIP to a pod on the client's node: the source's alone), one
mesh per test, grpcio on both ends as a user would run it.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator

import grpc
import pytest

from tests.integration.proxy.grpcmesh import Path, method, three_paths
from tests.integration.proxy.mesh import Mesh, mesh_test

pytestmark = pytest.mark.root


def _held_stream(channel: grpc.Channel) -> tuple[queue.Queue[bytes | None], Iterator[bytes]]:
    """A bidirectional call kept open: put messages in the queue (None ends it), read answers."""
    outgoing: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        while (message := outgoing.get(timeout=30)) is not None:
            yield message

    return outgoing, method(channel, "Chat")(requests(), timeout=60)


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
        outgoing.put(None)
        assert list(held) == []
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
