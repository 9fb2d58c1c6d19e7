"""The HBONE windows over real TLS sockets on loopback, at the smallest window ``--hbone-window``
allows and at the default: a pod that stops reading makes the destination proxy hold at most its
stream's window (and at least three quarters of it: WINDOW_UPDATEs go out per quarter), never
more than the connection bound, while another tunnel on the same HBONE connection keeps
flowing."""

from __future__ import annotations

import asyncio
import dataclasses
import os

import pytest
import uvloop

from agent.proxy.h2wire import HboneSettings
from agent.proxy.hbone_limits import MIN_STREAM_WINDOW, connection_memory_bound, with_stream_window
from tests.integration.proxy.mesh import CLIENT, SERVER, Mesh
from tests.integration.proxy.test_proxy_loopback import echo_peer

pytestmark = pytest.mark.root


async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.Event().wait()  # the pod accepted and stopped reading (until the test ends)


def kernel_can_take() -> int:
    """The most the kernel may buffer between node2 and a pod that stops reading: the pod's
    receive buffer and node2's send buffer, each autotuned up to its ``tcp_rmem``/``tcp_wmem``
    maximum (32 MiB receive on this machine, so a fixed few MiB is not enough)."""
    with open("/proc/sys/net/ipv4/tcp_rmem") as rmem, open("/proc/sys/net/ipv4/tcp_wmem") as wmem:
        return int(rmem.read().split()[2]) + int(wmem.read().split()[2])


async def settled_hold(mesh: Mesh) -> int:
    """What node2's inbound HBONE connection holds once that stopped growing."""
    last, steady = -1, 0
    for _ in range(400):
        await asyncio.sleep(0.05)
        held = sum(proto.held_bytes() for proto in mesh.node2.inbound.connections)
        steady = steady + 1 if held == last else 0
        last = held
        if steady >= 10 and held > 0:
            break
    return last


async def scenario(mesh: Mesh, settings: HboneSettings) -> None:
    window = settings.stream_window
    stalled = mesh.app(SERVER, never_reads)
    _, writer = await mesh.connect(CLIENT, (SERVER, stalled))
    writer.write(b"s" * (4 * window + kernel_can_take() + 1024 * 1024))
    held = await settled_hold(mesh)
    assert 3 * window // 4 <= held <= window
    assert held <= connection_memory_bound(settings)
    echo = mesh.app(SERVER, echo_peer)
    reader, other = await mesh.connect(CLIENT, (SERVER, echo))
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"peer=")
    other.write(b"still flowing\n")
    assert await asyncio.wait_for(reader.readline(), 10) == b"still flowing\n"
    assert len(mesh.node2.inbound.connections) == 1  # both tunnels on one HBONE connection
    writer.transport.abort()
    other.close()


@pytest.mark.parametrize("window", [MIN_STREAM_WINDOW, HboneSettings().stream_window])
def test_a_pod_that_stops_reading_holds_one_stream_window(window: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("SO_MARK and IP_TRANSPARENT need root")
    settings = with_stream_window(window)

    async def main() -> None:
        mesh = Mesh()
        for node in (mesh.node1, mesh.node2):
            node.core.settings = dataclasses.replace(node.core.settings, hbone=settings)
        await mesh.start()
        try:
            await asyncio.wait_for(scenario(mesh, settings), 60)
        finally:
            await mesh.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
