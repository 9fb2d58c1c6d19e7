"""The worker supervisor with real worker processes on loopback listeners (no root, no lab):
readiness while a killed worker is down, its restart on the same sockets, the drain; the
identity manager's renewals and drops reaching every worker, and a restarted one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.base.constants import Listener
from agent.config import AgentConfig, CaSettings
from agent.datapath.listeners import ListenerPorts
from agent.identity.certs import WorkloadCertificate
from agent.identity.manager import CertificateObserver, IdentityUnavailable
from agent.state import StateStore
from agent.workers import supervisor
from agent.workers.supervisor import RESTARTS, Workers
from tests.unit.workers.workers_helpers import certificate


def groups(members: int) -> dict[Listener, list[socket.socket]]:
    out: dict[Listener, list[socket.socket]] = {}
    for slot in Listener:
        group: list[socket.socket] = []
        for _ in range(members):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", group[0].getsockname()[1] if group else 0))
            s.listen(16)
            s.setblocking(False)
            group.append(s)
        out[slot] = group
    return out


FLOWS = 16


class Manager:
    """The identity manager as the supervisor sees it: ``renew``/``drop`` tell the observers."""

    def __init__(self) -> None:
        self.certs: dict[str, WorkloadCertificate] = {}
        self.observers: list[CertificateObserver] = []

    async def certificate(self, spiffe_id: str) -> WorkloadCertificate:
        if spiffe_id not in self.certs:
            raise IdentityUnavailable(f"no certificate for {spiffe_id} in this test")
        return self.certs[spiffe_id]

    def held(self, spiffe_id: str) -> WorkloadCertificate | None:
        return self.certs.get(spiffe_id)

    def held_all(self) -> list[WorkloadCertificate]:
        return list(self.certs.values())

    def renew(self, cert: WorkloadCertificate) -> None:
        self.certs[str(cert.identity)] = cert
        for observer in self.observers:
            observer(str(cert.identity), cert)

    def drop(self, spiffe_id: str) -> None:
        del self.certs[spiffe_id]
        for observer in self.observers:
            observer(spiffe_id, None)


async def until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def agent_config(listeners: dict[Listener, list[socket.socket]]) -> AgentConfig:
    ports = {slot: group[0].getsockname()[1] for slot, group in listeners.items()}
    return AgentConfig(
        node="node1",
        pin_dir=Path("/nonexistent"),
        ca=CaSettings("127.0.0.1:1", Path("/nonexistent"), Path("/nonexistent")),
        drain_seconds=1.0,
        workers=2,
        # the proxy's loop protection refuses these as destinations: a connection to the
        # inbound listener is accepted by a worker and closed
        listeners=ListenerPorts(
            ports[Listener.OUTBOUND], ports[Listener.INBOUND], ports[Listener.HBONE]
        ),
    )


def restarts(worker: str) -> float:
    return RESTARTS.labels(worker=worker).get()


def test_a_killed_worker_is_reported_down_then_restarted_on_the_same_sockets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervisor, "BACKOFF_FIRST", 1.0)  # long enough to see it down
    listeners = groups(2)
    port = listeners[Listener.INBOUND][0].getsockname()[1]
    config = agent_config(listeners)

    async def run() -> None:
        workers = Workers(config, StateStore(), listeners, Manager())
        await workers.start()
        try:
            await until(lambda: not workers.not_ready())
            before = restarts("0")
            victim = workers.describe()[0]["pid"]
            assert isinstance(victim, int)
            os.kill(victim, signal.SIGKILL)
            await until(lambda: workers.not_ready() == ["workers: worker 0 down"])
            # Connections made while worker 0 is down: the kernel still spreads them over both
            # sockets of the group (the main process holds worker 0's), and those on worker
            # 0's wait there for its successor instead of being reset. Each is accepted once,
            # then refused by the proxy's loop protection (closed or reset; a reset may even
            # come before create_connection's check of the handshake).
            made: list[socket.socket] = []
            for _ in range(FLOWS):
                with contextlib.suppress(ConnectionResetError):
                    made.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            await until(lambda: not workers.not_ready())
            row = workers.describe()[0]
            assert row["restarts"] == 1 and row["pid"] != victim
            assert restarts("0") == before + 1
            for s in made:
                with s, contextlib.suppress(ConnectionResetError):
                    assert await asyncio.to_thread(s.recv, 1) == b""
            status = await workers.gather("status")
            accepted = {i: a["accepted"].get("INBOUND", 0) for i, a in status.items()}  # type: ignore[index]
            assert sum(accepted.values()) == FLOWS
            assert accepted[0] > 0, accepted  # the successor took what waited on its socket
        finally:
            workers.begin_drain()
            await workers.stop()
        assert all(not row["up"] for row in workers.describe())
        for row in workers.describe():
            assert not os.path.exists(f"/proc/{row['pid']}") or _zombie(int(str(row["pid"])))

    try:
        asyncio.run(run())
    finally:
        for group in listeners.values():
            for s in group:
                s.close()


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return f.read().split(")")[-1].split()[0] == "Z"


def test_renewals_and_drops_reach_every_worker_and_a_restarted_one_starts_current(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What each worker reports holding (``status``) follows the manager's observer calls: a
    certificate issued, renewed, dropped; a worker started after them gets the current set."""
    monkeypatch.setattr(supervisor, "BACKOFF_FIRST", 0.1)
    listeners = groups(2)
    manager = Manager()
    other = "spiffe://cluster.local/ns/default/sa/server"

    def serials(*certs: WorkloadCertificate) -> list[tuple[str, str]]:
        return sorted((str(c.identity), format(c.leaf.serial_number, "x")) for c in certs)

    async def held(workers: Workers) -> dict[int, list[tuple[str, str]]]:
        status = await workers.gather("status")
        return {
            i: [(c["identity"], c["serial"]) for c in answer["certificates"]]  # type: ignore[index]
            for i, answer in status.items()
        }

    async def run() -> None:
        first = certificate()
        manager.renew(first)  # held before the workers start: sent after their setup
        workers = Workers(agent_config(listeners), StateStore(), listeners, manager)
        await workers.start()
        try:
            await until(lambda: not workers.not_ready())
            assert await held(workers) == {0: serials(first), 1: serials(first)}
            renewed, theirs = certificate(), certificate(identity=other)
            manager.renew(renewed)
            manager.renew(theirs)
            assert await held(workers) == {0: serials(renewed, theirs), 1: serials(renewed, theirs)}
            manager.drop(other)
            assert await held(workers) == {0: serials(renewed), 1: serials(renewed)}
            victim = workers.describe()[1]["pid"]
            assert isinstance(victim, int)
            os.kill(victim, signal.SIGKILL)
            await until(lambda: workers.not_ready() == ["workers: worker 1 down"])
            latest = certificate()
            manager.renew(latest)  # while worker 1 is down
            await until(lambda: not workers.not_ready())
            assert workers.describe()[1]["pid"] != victim
            assert await held(workers) == {0: serials(latest), 1: serials(latest)}
        finally:
            workers.begin_drain()
            await workers.stop()
        assert manager.observers == []

    try:
        asyncio.run(run())
    finally:
        for group in listeners.values():
            for s in group:
                s.close()
