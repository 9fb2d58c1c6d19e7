"""A pod-IP connection whose relay fails to start after its upstream was opened
(``Outbound._start``): on each path that opens one (a same-node pod's socket, with and without
the same-node splice; an unmeshed destination's socket; a pooled HBONE stream to another node),
the upstream is closed (the stream reset), the client reset, the registry left empty, and the
next connection is served, over the same pooled HBONE connection for a tunnel. Likewise a
Service's connection (``balanced``), whose relay runs in its task."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest

from agent.policy.traffic.attempts import Attempts
from agent.proxy import outbound as outbound_module
from agent.proxy import sockets
from agent.proxy.tunnel import TunnelStream
from agent.state import Endpoint, Service, ServicePort
from tests.integration.proxy.mesh import CLIENT, LOCAL, PLAIN, SERVER, Mesh, mesh_test
from tests.integration.proxy.test_connection_caps_loopback import echo

pytestmark = pytest.mark.root


async def _echoes(mesh: Mesh, destination: tuple[str, int]) -> bool:
    reader, writer = await mesh.connect(CLIENT, destination)
    writer.write(b"served on")
    try:
        return await asyncio.wait_for(reader.readexactly(9), 10) == b"served on"
    finally:
        writer.close()


def _half_made(name: str, failures: list[str]) -> Callable[..., None]:
    """A ``start_*`` that polls both ends, as a relay does first, then raises."""

    def start(client: socket.socket, upstream: socket.socket | TunnelStream, *_a: object,
              **_kw: object) -> None:  # fmt: skip
        loop = asyncio.get_running_loop()
        loop.add_reader(client.fileno(), lambda: None)
        if isinstance(upstream, TunnelStream):
            upstream.deliver_directly(client)
        else:
            loop.add_reader(upstream.fileno(), lambda: None)
        failures.append(name)
        raise RuntimeError("injected")

    return start


async def _fails_then_serves(
    mesh: Mesh, destination: tuple[str, int], start: str, dialled: list[socket.socket]
) -> None:
    """A connection to ``destination`` whose relay ``start`` fails: reset and cleaned up;
    then one that is served."""
    failures: list[str] = []
    with mock.patch.object(outbound_module, start, _half_made(start, failures)):
        reader, writer = await mesh.connect(CLIENT, destination)
        with pytest.raises(ConnectionResetError):  # not left hanging, nor a clean end
            await asyncio.wait_for(reader.read(1), 10)
        writer.close()
    assert failures == [start]
    assert len(mesh.node1.core.registry) == 0
    if dialled:
        assert dialled[-1].fileno() == -1  # the upstream socket is closed
    assert await _echoes(mesh, destination)


def _noting_dials(dialled: list[socket.socket]) -> Any:
    dial = sockets.connect

    async def noting(address: tuple[str, int], **kw: Any) -> socket.socket:
        dialled.append(sock := await dial(address, **kw))
        return sock

    return mock.patch.object(sockets, "connect", noting)


@mesh_test
async def test_a_pod_socket_whose_relay_fails_to_start_is_closed_with_the_client(
    mesh: Mesh,
) -> None:
    """A same-node pod, and an unmeshed destination (passthrough): a socket relay."""
    for ip in (LOCAL, PLAIN):
        destination = (ip, mesh.app(ip, echo))
        dialled: list[socket.socket] = []
        with _noting_dials(dialled):
            await _fails_then_serves(mesh, destination, "start_sockets", dialled)
        assert len(dialled) == 2


class _NoSplice:
    """A splicer the kernel refuses (``start_spliced`` then relays in user space)."""

    def start(self, a: socket.socket, b: socket.socket, window: int) -> object:
        raise OSError("no splice in this test")


@mesh_test
async def test_a_same_node_socket_whose_splice_fails_to_start_is_closed_with_the_client(
    mesh: Mesh,
) -> None:
    mesh.node1.core.splicer = _NoSplice()  # type: ignore[assignment]
    destination = (LOCAL, mesh.app(LOCAL, echo))
    dialled: list[socket.socket] = []
    with _noting_dials(dialled):
        await _fails_then_serves(mesh, destination, "start_spliced", dialled)


@mesh_test
async def test_a_tunnel_whose_relay_fails_to_start_is_reset_and_its_connection_serves_on(
    mesh: Mesh,
) -> None:
    destination = (SERVER, mesh.app(SERVER, echo))
    assert await _echoes(mesh, destination)  # the pooled HBONE connection
    (pooled,) = mesh.node1.pool.connections()
    await _fails_then_serves(mesh, destination, "start_tunnel", [])
    assert mesh.node1.pool.connections() == [pooled]
    for _ in range(500):  # the far end saw the reset and let its pod connection go
        if not pooled.streams and len(mesh.node2.core.registry) == 0:
            break
        await asyncio.sleep(0.02)
    assert not pooled.streams
    assert len(mesh.node2.core.registry) == 0


VIP = "10.96.7.1"


def _service(mesh: Mesh, port: int, ip: str) -> tuple[str, int]:
    """Service ``web``, a TCP port (traffic control: ``balanced``) whose one endpoint is ``ip``."""
    with mesh.store.update() as tx:
        ports = (ServicePort(80, port),)
        tx.put_service(Service("web", "default", (VIP,), ports, {"app": "web"}, (Endpoint(ip),)))
    return VIP, 80


@mesh_test
async def test_a_services_tunnel_whose_relay_fails_to_start_is_reset_and_serves_on(
    mesh: Mesh,
) -> None:
    """A Service's connection (``balanced``, in its task) to a far endpoint: the relay fails
    before it owns the stream; the stream is reset, its pooled connection serves on."""
    destination = _service(mesh, mesh.app(SERVER, echo), SERVER)
    assert await _echoes(mesh, destination)
    (pooled,) = mesh.node1.pool.connections()
    await _fails_then_serves(mesh, destination, "relay_tunnel", [])
    assert mesh.node1.pool.connections() == [pooled]
    for _ in range(500):
        if not pooled.streams and len(mesh.node2.core.registry) == 0:
            break
        await asyncio.sleep(0.02)
    assert not pooled.streams
    assert len(mesh.node2.core.registry) == 0


@mesh_test
async def test_a_services_socket_is_closed_whatever_raises_after_its_connect(
    mesh: Mesh,
) -> None:
    """A Service's connection to an unmeshed endpoint: the balancer's note that the endpoint
    connected raises, before any relay: the socket is closed, the client reset."""
    destination = _service(mesh, mesh.app(PLAIN, echo), PLAIN)
    dialled: list[socket.socket] = []
    with _noting_dials(dialled), mock.patch.object(Attempts, "connected", _raises):
        reader, writer = await mesh.connect(CLIENT, destination)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 10)
        writer.close()
    assert len(dialled) == 1 and dialled[0].fileno() == -1
    assert len(mesh.node1.core.registry) == 0
    assert await _echoes(mesh, destination)


def _raises(*_args: object, **_kw: object) -> None:
    raise RuntimeError("injected")
