"""What a new cross-node connection asks of the event loop, counted (never timed), with both
proxies of the loopback mesh on a loop that records its reader and writer registrations."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections import Counter, defaultdict
from typing import Any

import pytest
import uvloop

from agent.policy.authz import Request
from agent.proxy import inbound, outbound, sockets
from agent.proxy.core import Core
from agent.proxy.inbound import InboundHbone
from agent.proxy.pool import PoolKey
from agent.proxy.resolve import Resolver
from agent.state import Snapshot, Workload
from agent.telemetry.records import INBOUND, ConnectionRecord
from tests.integration.proxy.mesh import CLIENT, LOCAL, OUTSIDER, SERVER, Mesh
from tests.integration.proxy.test_proxy_loopback import echo_peer, request_response, roundtrip
from tests.workloads import workload

pytestmark = pytest.mark.root


class _RecordingLoop(uvloop.Loop):
    """uvloop's loop, counting per descriptor how often its registrations went from none to
    some: uvloop makes a poll handle each time (and closes it when the last one goes)."""

    def __init__(self) -> None:
        super().__init__()
        self.active: dict[int, set[str]] = defaultdict(set)
        self.handles: dict[int, int] = defaultdict(int)

    def _on(self, fd: Any, kind: str) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        if not self.active[fd]:
            self.handles[fd] += 1
        self.active[fd].add(kind)

    def _off(self, fd: Any, kind: str) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        self.active[fd].discard(kind)

    def add_reader(self, fd: Any, callback: Any, *args: Any) -> None:
        self._on(fd, "r")
        super().add_reader(fd, callback, *args)

    def add_writer(self, fd: Any, callback: Any, *args: Any) -> None:
        self._on(fd, "w")
        super().add_writer(fd, callback, *args)

    def remove_reader(self, fd: Any) -> bool:
        self._off(fd, "r")
        return bool(super().remove_reader(fd))

    def remove_writer(self, fd: Any) -> bool:
        self._off(fd, "w")
        return bool(super().remove_writer(fd))


@pytest.mark.parametrize(
    ("client", "pod"),
    [(CLIENT, SERVER), (CLIENT, LOCAL), (OUTSIDER, SERVER)],
    ids=["cross-node", "same-node", "plaintext"],
)
def test_the_pod_socket_gets_one_poll_handle_from_connect_to_close(
    monkeypatch: pytest.MonkeyPatch, client: str, pod: str
) -> None:
    """The pod socket (the destination's, the source's for a same-node connection, or the
    plaintext inbound's) is registered once: the connect's writer becomes the relay's reader
    without the descriptor ever being left with no registration (uvloop made and closed a poll
    handle for each: an ``ioctl`` and about seven ``epoll_ctl``)."""
    if os.geteuid() != 0:
        pytest.skip("SO_MARK and IP_TRANSPARENT need root")
    pod_sockets: list[int] = []
    made = sockets.upstream_socket

    def recording(mark: int, source_ip: str | None = None) -> socket.socket:
        sock = made(mark, source_ip)
        if source_ip is not None:  # connecting as the client pod: the destination's pod socket
            pod_sockets.append(sock.fileno())
        return sock

    monkeypatch.setattr(sockets, "upstream_socket", recording)
    loop = _RecordingLoop()

    async def main() -> None:
        mesh = Mesh()
        await mesh.start()
        try:
            port = mesh.app(pod, echo_peer)
            # Not meshed: captured at node2's uplink into the plaintext inbound (15006).
            plain = {"via": "inbound", "proxy": mesh.node2} if client == OUTSIDER else {}
            reply = await roundtrip(mesh, client, (pod, port), **plain)
            assert reply == f"peer={client}\nmarker-1234\n".encode()
            for _ in range(50):  # the relays' ends
                if not (mesh.node1.core.registry or mesh.node2.core.registry):
                    break
                await asyncio.sleep(0.01)
        finally:
            await mesh.close()

    try:
        loop.run_until_complete(asyncio.wait_for(main(), 60))
    finally:
        loop.close()
    assert len(pod_sockets) == 1
    assert loop.handles[pod_sockets[0]] == 1
    assert not loop.active[pod_sockets[0]]


class _CountingLoop(uvloop.Loop):
    """uvloop's loop, counting the reader and writer registration calls made on it (each one
    checks the descriptor against uvloop's transports, a ``KeyError`` raised and caught: about
    0.6 µs) and the timers the proxies arm (by the module that arms them)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.timers: list[str] = []

    def add_reader(self, fd: Any, callback: Any, *args: Any) -> None:
        self.calls["add_reader"] += 1
        super().add_reader(fd, callback, *args)

    def add_writer(self, fd: Any, callback: Any, *args: Any) -> None:
        self.calls["add_writer"] += 1
        super().add_writer(fd, callback, *args)

    def remove_reader(self, fd: Any) -> bool:
        self.calls["remove_reader"] += 1
        return bool(super().remove_reader(fd))

    def remove_writer(self, fd: Any) -> bool:
        self.calls["remove_writer"] += 1
        return bool(super().remove_writer(fd))

    def call_later(  # type: ignore[override]
        self, delay: float, callback: Any, *args: Any, context: Any = None
    ) -> asyncio.TimerHandle:
        armed_by = str(sys._getframe(1).f_globals["__name__"])
        if armed_by.startswith("agent.proxy"):
            self.timers.append(armed_by)
        return super().call_later(delay, callback, *args, context=context)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("client", "pod", "timers"),
    [(CLIENT, SERVER, ["agent.proxy.outbound"]), (CLIENT, LOCAL, []), (OUTSIDER, SERVER, [])],
    ids=["cross-node", "same-node", "plaintext"],
)
def test_a_connection_registers_each_proxied_socket_once_and_arms_no_connect_timer(
    client: str, pod: str, timers: list[str]
) -> None:
    """One connection over a pooled HBONE connection, to a pod on the same node, or from
    outside the mesh over the plaintext inbound, asks the loop for two readers and their two
    removals, the client socket's and the pod socket's: the pod connect finishes within its
    ``connect`` call (the kernel ran the handshake there: no writer, no timer, no placeholder
    reader) and a socket relay's stop removes only what is still registered. The only timer
    left is the tunnel open's deadline. On main: 7 calls and two timers (the pod connect's)
    cross-node, 11 calls and one timer same-node; until session 17 the plaintext inbound
    removed the pod socket's reader once more after its relay (``sockets.release``). (Up to
    three connections are tried: the kernel runs the handshake inside ``connect`` unless it
    left its softirq work to ``ksoftirqd``, which a loaded machine does now and then; the pod
    connect then waits as on main.)"""
    if os.geteuid() != 0:
        pytest.skip("SO_MARK and IP_TRANSPARENT need root")
    loop = _CountingLoop()

    async def main() -> tuple[Counter[str], list[str]]:
        mesh = Mesh()
        await mesh.start()
        try:
            port = mesh.app(pod, echo_peer)
            # Not meshed: captured at node2's uplink into the plaintext inbound (15006).
            where = {"via": "inbound", "proxy": mesh.node2} if client == OUTSIDER else {}
            assert await roundtrip(mesh, client, (pod, port), **where)  # cross-node: dials HBONE
            await _relays_ended(mesh)
            for _ in range(3):
                loop.calls.clear()
                loop.timers.clear()
                reply = await roundtrip(mesh, client, (pod, port), **where)
                assert reply == f"peer={client}\nmarker-1234\n".encode()
                await _relays_ended(mesh)
                if loop.calls == {"add_reader": 2, "remove_reader": 2}:
                    break
            return loop.calls.copy(), loop.timers[:]
        finally:
            await mesh.close()

    try:
        calls, armed = loop.run_until_complete(asyncio.wait_for(main(), 60))
    finally:
        loop.close()
    assert calls == {"add_reader": 2, "remove_reader": 2}
    assert armed == timers


def test_a_failure_between_the_connect_and_the_relay_drops_the_held_reader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever fails after the pod connect and before the relay takes the socket over, the
    placeholder reader goes and the socket is closed at once (not left registered with the loop
    on a descriptor the garbage collector closes, which the loop would keep polling)."""
    if os.geteuid() != 0:
        pytest.skip("SO_MARK and IP_TRANSPARENT need root")
    pod_sockets: list[socket.socket] = []
    made = sockets.upstream_socket

    def recording(mark: int, source_ip: str | None = None) -> socket.socket:
        sock = made(mark, source_ip)
        if source_ip is not None:
            pod_sockets.append(sock)
        return sock

    def broken(*args: object) -> bool:
        raise RuntimeError("a bug between the connect and the relay")

    monkeypatch.setattr(sockets, "upstream_socket", recording)
    monkeypatch.setattr(InboundHbone, "_still_allowed", broken)
    loop = _RecordingLoop()

    async def main() -> None:
        mesh = Mesh()
        await mesh.start()
        try:
            port = mesh.app(SERVER, request_response)  # says nothing until the client's EOF
            reader, writer = await mesh.connect(CLIENT, (SERVER, port))
            with contextlib.suppress(ConnectionResetError):  # refused: reset, or closed
                assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            await asyncio.sleep(0.05)
            assert len(pod_sockets) == 1
            fd = pod_sockets[0]
            assert fd.fileno() == -1  # closed by the proxy, not left to the garbage collector
        finally:
            await mesh.close()

    try:
        loop.run_until_complete(asyncio.wait_for(main(), 60))
    finally:
        loop.close()
    assert not any(loop.active.values())


def test_only_a_tunnel_open_is_bounded_and_by_a_timer_not_asyncio_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A same-node connect awaits nothing but ``sockets.connect``, whose own timer has the
    same limit: no deadline around it. A cross-node open (dial, TLS, the CONNECT's answer)
    keeps one: a timer of the connect timeout (``outbound._Expired``), not the
    ``asyncio.timeout`` context manager (about 2 µs more per connection)."""
    if os.geteuid() != 0:
        pytest.skip("SO_MARK and IP_TRANSPARENT need root")
    managers: list[float | None] = []
    deadlines: list[str] = []
    timeout, made = asyncio.timeout, outbound._Expired

    def counting(delay: float | None) -> asyncio.Timeout:
        if sys._getframe(1).f_globals["__name__"] == "agent.proxy.outbound":
            managers.append(delay)
        return timeout(delay)

    class Counted(made):  # type: ignore[valid-type,misc]
        def __init__(self, task: asyncio.Task[object]) -> None:
            super().__init__(task)
            deadlines.append(task.get_name())

    monkeypatch.setattr(asyncio, "timeout", counting)
    monkeypatch.setattr(outbound, "_Expired", Counted)

    async def main() -> None:
        mesh = Mesh()
        await mesh.start()
        try:
            for pod in (LOCAL, SERVER):
                port = mesh.app(pod, echo_peer)
                reply = await roundtrip(mesh, CLIENT, (pod, port))
                assert reply == f"peer={CLIENT}\nmarker-1234\n".encode()
                assert len(deadlines) == (pod == SERVER)
        finally:
            await mesh.close()

    uvloop.run(asyncio.wait_for(main(), 60))
    assert managers == []
    assert len(deadlines) == 1


def test_a_connection_looks_the_running_loop_up_in_none_of_the_proxies_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On Python 3.11 every look-up of the running loop is a ``getpid`` system call:
    ``asyncio.get_running_loop``, and ``asyncio.current_task`` and ``asyncio.create_task``
    without a loop. A cross-node connection over a pooled HBONE connection makes none in the
    proxies' code: the source handler's task is found in the loop ``Outbound`` kept from the
    connection before (``_loop_now``; one look-up before, ``cancel_current_task``'s), the
    destination's stream task, pod connect and registration take the HBONE connection's loop.
    Nor does a same-node connection: its socket relay takes the loop the handler kept (main
    looked it up there; before, its registration and its pod connect made one each too)."""
    if os.geteuid() != 0:
        pytest.skip("SO_MARK and IP_TRANSPARENT need root")
    looked_up: list[str] = []
    running, current, create = asyncio.get_running_loop, asyncio.current_task, asyncio.create_task

    def caller() -> str | None:
        name = str(sys._getframe(2).f_globals["__name__"])
        return name if name.startswith(("agent.proxy", "agent.acceptor")) else None

    def counting_running() -> asyncio.AbstractEventLoop:
        if (name := caller()) is not None:
            looked_up.append(f"get_running_loop in {name}")
        return running()

    def counting_current(loop: asyncio.AbstractEventLoop | None = None) -> Any:
        if loop is None and (name := caller()) is not None:
            looked_up.append(f"current_task in {name}")
        return current(loop)

    def counting_create(coro: Any, **kwargs: Any) -> Any:
        if (name := caller()) is not None:
            looked_up.append(f"create_task in {name}")
        return create(coro, **kwargs)

    async def main() -> dict[str, list[str]]:
        mesh = Mesh()
        await mesh.start()
        counted: dict[str, list[str]] = {}
        try:
            for pod in (SERVER, LOCAL):
                port = mesh.app(pod, echo_peer)
                # The first dials the HBONE connection (a look-up per dial, not counted) and
                # lets the source keep its loop.
                assert await roundtrip(mesh, CLIENT, (pod, port))
                await _relays_ended(mesh)
                monkeypatch.setattr(asyncio, "get_running_loop", counting_running)
                monkeypatch.setattr(asyncio, "current_task", counting_current)
                monkeypatch.setattr(asyncio, "create_task", counting_create)
                try:
                    reply = await roundtrip(mesh, CLIENT, (pod, port))
                    await _relays_ended(mesh)
                finally:
                    monkeypatch.setattr(asyncio, "get_running_loop", running)
                    monkeypatch.setattr(asyncio, "current_task", current)
                    monkeypatch.setattr(asyncio, "create_task", create)
                assert reply == f"peer={CLIENT}\nmarker-1234\n".encode()
                counted[pod] = looked_up[:]
                looked_up.clear()
        finally:
            await mesh.close()
        return counted

    counted = uvloop.run(asyncio.wait_for(main(), 60))
    assert counted == {SERVER: [], LOCAL: []}


async def _relays_ended(mesh: Mesh) -> None:
    for _ in range(100):
        if not (mesh.node1.core.registry or mesh.node2.core.registry):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the relays did not end")


def test_the_destination_looks_a_streams_pod_up_once_per_state_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """For every CONNECT the destination looked up in the state what only the state and the
    CONNECT decide: the local workload, the claimed client's owner and identity, the
    destination identity, the dialled Service, the port's protocol. Streams of the same
    client to the same pod port in one state version now find them kept (one look-up for
    four streams, four before; the HBONE connection's own look-up at its accept is not
    counted); a state change (here the server's service account) makes the next stream look
    them up again, and its record carries the new identity."""
    if os.geteuid() != 0:
        pytest.skip("SO_MARK and IP_TRANSPARENT need root")
    looked_up: list[str] = []
    local_workload = Core.local_workload

    def counting(self: Core, snap: Snapshot, ip: str) -> Workload | None:
        caller = sys._getframe(1)  # not the connection's own, at its accept (``handle``)
        if (
            caller.f_globals["__name__"] == "agent.proxy.inbound"
            and caller.f_code.co_name != "handle"
        ):
            looked_up.append(ip)
        return local_workload(self, snap, ip)

    class Opened:
        def __init__(self) -> None:
            self.identities: list[str] = []

        def opened(self, record: ConnectionRecord) -> None:
            if record.direction == INBOUND:
                self.identities.append(record.destination_identity)

        def closed(self, record: ConnectionRecord) -> None:
            pass

    async def main() -> None:
        mesh = Mesh()
        await mesh.start()
        opened = Opened()
        mesh.node2.core.registry.observers.append(opened)
        try:
            port = mesh.app(SERVER, echo_peer)
            monkeypatch.setattr(Core, "local_workload", counting)
            for _ in range(4):  # the first dials the HBONE connection
                reply = await roundtrip(mesh, CLIENT, (SERVER, port))
                assert reply == f"peer={CLIENT}\nmarker-1234\n".encode()
                await _relays_ended(mesh)
            assert looked_up == [SERVER]
            with mesh.store.update() as txn:
                txn.put_workload(workload("server", "node2", SERVER, app="server", sa="other"))
            reply = await roundtrip(mesh, CLIENT, (SERVER, port))
            assert reply == f"peer={CLIENT}\nmarker-1234\n".encode()
            await _relays_ended(mesh)
            assert looked_up == [SERVER, SERVER]
            assert opened.identities[-1].endswith("/sa/other")
            assert opened.identities[1:-1] == [opened.identities[0]] * 3
            assert not opened.identities[0].endswith("/sa/other")
        finally:
            await mesh.close()

    uvloop.run(asyncio.wait_for(main(), 60))


def test_policy_sees_a_request_kept_per_state_version_and_decides_every_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ``Request`` that policy evaluates was made for every connection, on the
    destination for each stream and on the source for each same-node connection, from fields
    the kept look-ups are keyed by. It is kept with them now (immutable): four connections to
    each pod, one ``Request`` each (four on main), and policy still decides all four, with
    the client, the pod's address and port and the client's identity."""
    if os.geteuid() != 0:
        pytest.skip("SO_MARK and IP_TRANSPARENT need root")
    seen: dict[str, list[Request]] = defaultdict(list)
    authorize = Core.authorize

    def counting(self: Core, request: Request, *args: Any, **kwargs: Any) -> bool:
        caller = str(sys._getframe(1).f_globals["__name__"])
        if caller in ("agent.proxy.inbound", "agent.proxy.outbound"):
            seen[request.destination_ip].append(request)
        return authorize(self, request, *args, **kwargs)

    monkeypatch.setattr(Core, "authorize", counting)

    async def main() -> dict[str, int]:
        mesh = Mesh()
        await mesh.start()
        try:
            ports = {pod: mesh.app(pod, echo_peer) for pod in (SERVER, LOCAL)}
            for _ in range(4):
                for pod, port in ports.items():
                    reply = await roundtrip(mesh, CLIENT, (pod, port))
                    assert reply == f"peer={CLIENT}\nmarker-1234\n".encode()
                    await _relays_ended(mesh)
        finally:
            await mesh.close()
        return ports

    ports = uvloop.run(asyncio.wait_for(main(), 60))
    for pod, port in ports.items():
        assert len(seen[pod]) == 4
        first = seen[pod][0]
        assert (first.source_ip, first.destination_ip, first.destination_port) == (
            CLIENT,
            pod,
            port,
        )
        assert first.principal is not None and first.principal.endswith("/sa/client")
        assert {id(r) for r in seen[pod]} == {id(first)}


def test_the_source_resolves_a_pod_destination_once_per_state_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """For every captured connection the source resolved its client and destination in the
    state (the client workload, Service VIP or not, the route, both identities). For a pod
    IP, what it found is now kept per client, destination and port until the state changes:
    four connections to each of a pod on another node and one on this node resolve once each
    (eight times before); a state change (the far pod's service account) makes the next
    connection resolve again, and its record carries the new identity. What the connections
    to a far pod built each time from the route is kept with it too: the tunnel's pool key is
    made once per state version (four times before) and names the new identity after the
    change; every record's destination and upstream are the pod's address."""
    if os.geteuid() != 0:
        pytest.skip("SO_MARK and IP_TRANSPARENT need root")
    resolved: list[str] = []
    keys: list[PoolKey] = []
    route = Resolver.route

    def counting_key(*args: Any) -> PoolKey:
        keys.append(PoolKey(*args))
        return keys[-1]

    def counting(self: Resolver, snap: Snapshot, source: Any, ip: str, port: int) -> Any:
        if sys._getframe(1).f_globals["__name__"] == "agent.proxy.outbound":
            resolved.append(ip)
        return route(self, snap, source, ip, port)

    class Opened:
        def __init__(self) -> None:
            self.identities: list[tuple[str | None, str | None, str]] = []

        def opened(self, record: ConnectionRecord) -> None:
            self.identities.append(
                (record.source_identity, record.destination_identity, record.path)
            )
            assert record.upstream == record.destination
            assert record.destination in {f"{p}:{n}" for p, n in ports.items()}

        def closed(self, record: ConnectionRecord) -> None:
            pass

    monkeypatch.setattr(Resolver, "route", counting)
    monkeypatch.setattr(outbound, "PoolKey", counting_key)
    ports: dict[str, int] = {}

    async def main() -> None:
        mesh = Mesh()
        await mesh.start()
        opened = Opened()
        mesh.node1.core.registry.observers.append(opened)
        try:
            ports.update({pod: mesh.app(pod, echo_peer) for pod in (SERVER, LOCAL)})
            for _ in range(4):
                for pod, port in ports.items():
                    reply = await roundtrip(mesh, CLIENT, (pod, port))
                    assert reply == f"peer={CLIENT}\nmarker-1234\n".encode()
                    await _relays_ended(mesh)
            assert resolved == [SERVER, LOCAL]
            assert len(set(opened.identities)) == 2
            assert len(keys) == 1
            with mesh.store.update() as txn:
                txn.put_workload(workload("server", "node2", SERVER, app="server", sa="other"))
            reply = await roundtrip(mesh, CLIENT, (SERVER, ports[SERVER]))
            assert reply == f"peer={CLIENT}\nmarker-1234\n".encode()
            await _relays_ended(mesh)
            assert resolved == [SERVER, LOCAL, SERVER]
            source, destination, path = opened.identities[-1]
            assert path == "hbone" and destination is not None
            assert destination.endswith("/sa/other") and source == opened.identities[0][0]
            assert len(keys) == 2 and keys[-1].destination_id == destination
        finally:
            await mesh.close()

    uvloop.run(asyncio.wait_for(main(), 60))


def test_what_the_proxies_keep_per_state_version_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The source's kept routes and the destination's kept CONNECT facts are bounded: at the
    bound they are dropped and filled again (here a bound of 2, three pod ports), and every
    connection is still served as the state says."""
    if os.geteuid() != 0:
        pytest.skip("SO_MARK and IP_TRANSPARENT need root")
    monkeypatch.setattr(outbound, "_KEPT_ROUTES", 2)
    monkeypatch.setattr(inbound, "_KEPT_FACTS", 2)

    async def main() -> None:
        mesh = Mesh()
        await mesh.start()
        try:
            ports = [mesh.app(SERVER, echo_peer) for _ in range(3)]
            for _ in range(2):
                for port in ports:
                    reply = await roundtrip(mesh, CLIENT, (SERVER, port))
                    assert reply == f"peer={CLIENT}\nmarker-1234\n".encode()
                    assert len(mesh.node1.outbound._routes) <= 2
                    assert len(mesh.node2.inbound._facts) <= 2
            await _relays_ended(mesh)
        finally:
            await mesh.close()

    uvloop.run(asyncio.wait_for(main(), 60))
