"""The same-node splice in a lab: node1's agent restarted with ``--splice --workers 2``.

A same-node connection between two meshed pods is spliced by whichever worker accepted it (the
workers inherit the splice maps from the main process), its bytes reach ``/connections`` from
the kernel's counters while it is open, and ``lab down`` leaves nothing behind: no namespace, no
pin directory (the splice maps are pinned with the capture programs' generation).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.datapath import bpfsys
from agent.lab import build, components, control, netns
from agent.lab.handle import Lab
from agent.lab.topology import PIN_ROOT
from tests.labtools import mesh_lab

pytestmark = [pytest.mark.root, pytest.mark.lab]

PORT = 8080
ECHO = textwrap.dedent(
    f"""
    import socket, threading
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", {PORT}))
    srv.listen()
    def echo(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
    while True:
        threading.Thread(target=echo, args=(srv.accept()[0],), daemon=True).start()
    """
)
SIZE = 200_000


class Cookie(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64)]


def _restart_agent(lab: Lab, node: str, *extra: str) -> None:
    """Replace ``node``'s agent by one with the same command line plus ``extra``."""
    labdir, plan = control.load(lab.name)
    node_plan = next(n for n in plan.nodes if n.name == node)
    name = f"agent-{node}"
    pid = labdir.pids()[name]
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = tuple(arg.decode() for arg in f.read().split(b"\0") if arg)
    os.kill(pid, signal.SIGTERM)
    os.waitpid(pid, 0)  # the lab started it from this process
    component = components.Component(
        name, node_plan.netns, (*argv, *extra), lambda: components.agent_ready(node_plan)
    )
    proc = components.start(component, labdir)
    components.wait_ready(component, proc, labdir, timeout=90)


def _spliced_sockets(lab: Lab, node: str) -> int:
    """Entries in ``node``'s pinned ``nm_splice_links``: two per spliced connection."""
    _, plan = control.load(lab.name)
    pin_dir = Path(next(n for n in plan.nodes if n.name == node).pin_dir)
    [generation] = [d for d in pin_dir.iterdir() if d.is_dir()]
    links = bpfsys.Map(bpfsys.open_pinned(str(generation / "map_nm_splice_links")), "links")
    try:
        return len(list(links.keys(Cookie)))
    finally:
        links.close()


def _connections(lab: Lab, node: str) -> list[dict[str, object]]:
    status, body = netns.http_get(lab.netns(node), "127.0.0.1", 15000, "/connections", timeout=5)
    assert status == 200, body
    rows: list[dict[str, object]] = json.loads(body)["connections"]
    return rows


def _wait_listening(lab: Lab, pod: str) -> None:
    def probe() -> None:
        socket.create_connection(("127.0.0.1", PORT), timeout=5).close()

    deadline = time.monotonic() + 20
    while True:
        try:
            return netns.call_in(lab.netns(pod), probe)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_workers_splice_same_node_bytes_with_telemetry_and_lab_down_leaves_nothing() -> None:
    with mesh_lab("sp") as lab:
        name = lab.name
        _restart_agent(lab, "node1", "--splice", "--workers", "2")
        log = Path(lab.state_dir, "logs", "agent-node1.log").read_text(errors="replace")
        assert "same-node splice on" in log
        lab.popen("neighbor", sys.executable, "-c", ECHO)
        _wait_listening(lab, "neighbor")
        neighbor = str(lab.pod("neighbor")["ip"])
        body = os.urandom(SIZE)

        def exchange() -> socket.socket:
            s = socket.create_connection((neighbor, PORT), timeout=10)
            s.sendall(body)
            got = bytearray()
            while len(got) < SIZE:
                chunk = s.recv(65536)
                assert chunk, "the connection ended early"
                got += chunk
            assert bytes(got) == body
            return s

        held = netns.call_in(lab.netns("client"), exchange)
        try:
            assert _spliced_sockets(lab, "node1") == 2
            [row] = [
                r
                for r in _connections(lab, "node1")
                if r["destination_address"] == f"{neighbor}:{PORT}"
            ]
            assert (row["bytes_sent"], row["bytes_received"]) == (SIZE, SIZE)
        finally:
            held.close()
        deadline = time.monotonic() + 10
        while _spliced_sockets(lab, "node1") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _spliced_sockets(lab, "node1") == 0  # the maps are emptied at the end
    leftovers = [f"netns {n}" for n in build.lab_netns(name)]
    leftovers += [f"pin dir {p}" for p in Path(PIN_ROOT).glob(f"{name}-*")]
    assert leftovers == []
