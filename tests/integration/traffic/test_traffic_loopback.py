"""Traffic control in the real proxy on loopback: Service VIP connections with real sockets.

Uses the proxy tests' two-node ``Mesh`` (``tests.integration.proxy.mesh``): node1's proxy serves
``client``; a Service ``web`` (VIP 10.96.7.1:80, which only the proxy sees: the original
destination is passed explicitly) has endpoints that are unmeshed pods on node2 at 127.0.3.x
(passthrough) or the meshed ``server`` pod (HBONE). Root is needed for SO_MARK.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from agent.policy.traffic.outlier import EJECTED
from agent.state import Endpoint, Service, ServicePort, Workload
from tests.integration.proxy.mesh import CLIENT, SERVER, Mesh, free_port, mesh_test
from tests.unit.traffic.traffic_helpers import traffic_policy

pytestmark = pytest.mark.root

VIP = "10.96.7.1"
E1, E2 = "127.0.3.1", "127.0.3.2"


def backend(name: str, ip: str, version: str) -> Workload:
    labels = {"app": "web", "version": version}
    return Workload(f"default/{name}", name, "default", "web", "node2", (ip,), labels, "disabled")


def add_service(mesh: Mesh, port: int, *ips: str) -> None:
    with mesh.store.update() as tx:
        for i, ip in enumerate(ips):
            if ip != SERVER:
                tx.put_workload(backend(f"web-{i}", ip, f"v{i + 1}"))
        endpoints = tuple(Endpoint(ip, f"default/web-{i}") for i, ip in enumerate(ips))
        tx.put_service(
            Service("web", "default", (VIP,), (ServicePort(80, port),), {"app": "web"}, endpoints)
        )


def apply(mesh: Mesh, spec: dict[str, object], generation: int = 1) -> None:
    policy = traffic_policy(
        {**spec, "targetRef": {"kind": "Service", "name": "web"}}, generation=generation
    )
    with mesh.store.update() as tx:
        tx.put_policy(policy)


async def answer_own_address(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(writer.get_extra_info("sockname")[0].encode())
    await writer.drain()
    with contextlib.suppress(OSError):
        await reader.read()  # hold the connection until the client closes
    writer.close()


@contextlib.asynccontextmanager
async def servers(port: int, *ips: str) -> AsyncIterator[None]:
    started = [await asyncio.start_server(answer_own_address, ip, port) for ip in ips]
    try:
        yield
    finally:
        for server in started:
            server.close()


async def ask(mesh: Mesh) -> str:
    """One connection to the VIP: the endpoint address that answered, or '' if it failed."""
    reader, writer = await mesh.connect(CLIENT, (VIP, 80))
    try:
        return (await asyncio.wait_for(reader.read(64), 10)).decode()
    except ConnectionResetError:
        return ""
    finally:
        writer.close()


def web(mesh: Mesh):  # type: ignore[no-untyped-def]
    snap = mesh.store.snapshot()
    return mesh.node1.outbound.balanced.traffic.service(snap, snap.services[("default", "web")])


@mesh_test
async def test_refusing_endpoint_is_ejected_and_retries_hide_it(mesh: Mesh) -> None:
    port = free_port(E1)
    add_service(mesh, port, E1, E2)
    # Round robin, so that the refusing endpoint keeps being chosen until it is ejected (peak-EWMA
    # would avoid it after its first failure anyway).
    spec = {"loadBalancer": {"type": "ROUND_ROBIN"}, "outlierDetection": {"consecutiveFailures": 2}}
    apply(mesh, spec)
    async with servers(port, E1):  # E2 refuses
        answers = [await ask(mesh) for _ in range(30)]
    assert answers == [E1] * 30
    traffic = web(mesh)
    assert traffic.outlier.health[E2].state == EJECTED
    assert traffic.counters["failed_refused"] == 2 and traffic.counters["retries"] == 2
    assert "upstream_unreachable" not in mesh.node1.core.registry.rejections


@mesh_test
async def test_hbone_503_is_retried_on_another_endpoint(mesh: Mesh) -> None:
    port = free_port(E1)
    add_service(mesh, port, SERVER, E1)  # nothing listens on SERVER:port: node2 answers 503
    async with servers(port, E1):
        answers = [await ask(mesh) for _ in range(10)]
    assert answers == [E1] * 10
    assert web(mesh).counters["failed_refused"] >= 1
    assert mesh.node2.core.registry.rejections["upstream_unreachable"] >= 1


@mesh_test
async def test_over_limit_connections_are_rejected_with_the_counted_reason(mesh: Mesh) -> None:
    port = free_port(E1)
    add_service(mesh, port, E1)
    apply(mesh, {"connectionPool": {"maxConnections": 2}})
    async with servers(port, E1):
        held = [await mesh.connect(CLIENT, (VIP, 80)) for _ in range(2)]
        for reader, _ in held:
            assert await asyncio.wait_for(reader.read(64), 10) == E1.encode()
        assert await ask(mesh) == ""
        assert mesh.node1.core.registry.rejections["max_connections"] == 1
        held[0][1].close()
        await asyncio.wait_for(_until(lambda: web(mesh).active < 2), 10)
        assert await ask(mesh) == E1
        held[1][1].close()


async def _until(condition) -> None:  # type: ignore[no-untyped-def]
    while not condition():
        await asyncio.sleep(0.01)


@mesh_test
async def test_injected_abort_and_delay(mesh: Mesh) -> None:
    port = free_port(E1)
    add_service(mesh, port, E1)
    async with servers(port, E1):
        apply(mesh, {"faultInjection": {"abort": {"percent": 100}}})
        assert await ask(mesh) == ""
        apply(mesh, {"faultInjection": {"delay": {"percent": 100, "fixedDelay": "50ms"}}}, 2)
        assert await ask(mesh) == E1
    counters = web(mesh).counters
    assert counters["fault_abort_reset"] == 1 and counters["fault_delay"] == 1
    assert mesh.node1.core.registry.rejections["fault_abort"] == 1


@mesh_test
async def test_idle_connection_is_closed(mesh: Mesh) -> None:
    port = free_port(E1)
    add_service(mesh, port, E1)
    apply(mesh, {"connectionPool": {"idleTimeout": "200ms"}})
    async with servers(port, E1):
        reader, writer = await mesh.connect(CLIENT, (VIP, 80))
        assert await asyncio.wait_for(reader.read(64), 10) == E1.encode()
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(64), 10) == b""
        writer.close()
    assert mesh.node1.core.registry.rejections["idle_timeout"] == 1


@mesh_test
async def test_split_moves_traffic_live(mesh: Mesh) -> None:
    port = free_port(E1)
    add_service(mesh, port, E1, E2)
    subsets = [
        {"name": "v1", "labels": {"version": "v1"}},
        {"name": "v2", "labels": {"version": "v2"}},
    ]
    async with servers(port, E1, E2):
        apply(
            mesh,
            {"split": {"subsets": [{**subsets[0], "weight": 100}, {**subsets[1], "weight": 0}]}},
        )
        first = Counter([await ask(mesh) for _ in range(10)])
        apply(
            mesh,
            {"split": {"subsets": [{**subsets[0], "weight": 0}, {**subsets[1], "weight": 100}]}},
            2,
        )
        second = Counter([await ask(mesh) for _ in range(10)])
    assert first == {E1: 10} and second == {E2: 10}
    assert web(mesh).describe()["split_decisions"] == {"v1": 10, "v2": 10}
