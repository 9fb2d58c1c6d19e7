"""The worker supervisor with real worker processes on loopback listeners (no root, no lab):
readiness while a killed worker is down, its restart on the same sockets, the drain."""

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
from agent.state import StateStore
from agent.workers import supervisor
from agent.workers.supervisor import RESTARTS, Workers


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


async def no_certificate(spiffe: str) -> WorkloadCertificate:
    raise LookupError(f"no certificate for {spiffe} in this test")


async def until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def restarts(worker: str) -> float:
    return RESTARTS.labels(worker=worker)._value.get()


def test_a_killed_worker_is_reported_down_then_restarted_on_the_same_sockets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervisor, "BACKOFF_FIRST", 1.0)  # long enough to see it down
    listeners = groups(2)
    port = listeners[Listener.INBOUND][0].getsockname()[1]
    ports = {slot: group[0].getsockname()[1] for slot, group in listeners.items()}
    config = AgentConfig(
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

    async def run() -> None:
        workers = Workers(config, StateStore(), listeners, no_certificate)
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
