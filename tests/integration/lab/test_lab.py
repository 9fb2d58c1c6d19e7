"""The lab on the real kernel: build, connectivity, status against the kernel, clean removal."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.lab import build, control
from agent.lab.handle import Lab, LabFactory
from agent.lab.netns import call_in
from agent.lab.record import LabDir
from agent.lab.topology import DEFAULT_TOPOLOGY, PIN_ROOT, LabError

pytestmark = [pytest.mark.root, pytest.mark.lab]

ECHO_SERVER = textwrap.dedent(
    """
    import socket
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 8080))
    srv.listen()
    while True:
        conn, peer = srv.accept()
        conn.sendall(conn.recv(1024) + b" seen from " + peer[0].encode())
        conn.close()
    """
)


def _serve(lab: Lab, pod: str) -> None:
    """Start the echo server in ``pod`` and wait until it listens (checked over the pod's own
    loopback, which no capture touches: through a proxy a refused connection looks accepted)."""
    lab.popen(pod, sys.executable, "-c", ECHO_SERVER)

    def probe() -> None:
        socket.create_connection(("127.0.0.1", 8080), timeout=5).close()

    deadline = time.monotonic() + 20
    while True:
        try:
            return call_in(lab.netns(pod), probe)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _ask(lab: Lab, client: str, ip: str, payload: bytes) -> bytes:
    """One request from ``client``'s namespace to ``ip:8080``."""

    def once() -> bytes:
        with socket.create_connection((ip, 8080), timeout=5) as s:
            s.sendall(payload)
            return s.recv(1024)

    return call_in(lab.netns(client), once)


def _ip_json(netns: str, *args: str) -> list[dict[str, object]]:
    out = subprocess.run(
        ["ip", "-4", "-j", "-n", netns, *args], capture_output=True, text=True, check=True
    )
    result: list[dict[str, object]] = json.loads(out.stdout)
    return result


def _host_links() -> set[str]:
    return {
        str(link["ifname"]) for link in json.loads(subprocess.check_output(["ip", "-j", "link"]))
    }


def _leftovers(name: str) -> list[str]:
    found = [f"netns {n}" for n in build.lab_netns(name)]
    found += [f"pin dir {p}" for p in Path(PIN_ROOT).glob(f"{name}-*")]
    if Path("/run/nodemesh/lab", name).exists():
        found.append("state dir")
    return found


def test_cross_node_and_same_node_tcp(lab_factory: LabFactory) -> None:
    lab = lab_factory(components=False)
    _serve(lab, "server-0")
    _serve(lab, "client")
    server_ip, client_ip = lab.pod("server-0")["ip"], lab.pod("client")["ip"]
    neighbor_ip = lab.pod("neighbor")["ip"]
    # Across nodes, the server sees the client's own pod IP (no NAT anywhere in the lab).
    assert _ask(lab, "client", server_ip, b"hello") == f"hello seen from {client_ip}".encode()
    assert _ask(lab, "neighbor", client_ip, b"hi") == f"hi seen from {neighbor_ip}".encode()


def test_status_matches_the_kernel(lab_factory: LabFactory) -> None:
    lab = lab_factory(components=False)
    st = lab.status()
    existing = set(os.listdir("/run/netns"))
    assert {n["name"] for n in st["nodes"]} == {"node1", "node2"}
    assert {p["name"]: p["meshed"] for p in st["pods"]} == {
        "client": True, "neighbor": True, "outsider": False, "server-0": True, "server-1": True,
    }  # fmt: skip
    for node in st["nodes"]:
        assert node["netns"] in existing
        (uplink,) = _ip_json(node["netns"], "addr", "show", "dev", node["uplink"])
        assert {(a["local"], a["prefixlen"]) for a in uplink["addr_info"]} == {(node["ip"], 24)}  # type: ignore[index, union-attr]
    for pod in st["pods"]:
        assert pod["netns"] in existing
        (eth0,) = _ip_json(pod["netns"], "addr", "show", "dev", "eth0")
        assert {(a["local"], a["prefixlen"]) for a in eth0["addr_info"]} == {(pod["ip"], 32)}  # type: ignore[index, union-attr]
        node = next(n for n in st["nodes"] if n["name"] == pod["node"])
        (route,) = _ip_json(node["netns"], "route", "get", pod["ip"])
        assert route["dev"] == pod["hostVeth"]
        (default,) = _ip_json(pod["netns"], "route", "show", "default")
        assert default["gateway"] == "169.254.1.1"


def test_cli_status_json_has_the_documented_shape(lab_factory: LabFactory) -> None:
    lab = lab_factory(components=False)
    out = subprocess.run(
        [sys.executable, "-m", "agent", "lab", "status", "--json", "--name", lab.name],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    st = json.loads(out.stdout)
    assert set(st["nodes"][0]) >= {"name", "netns", "ip", "uplink", "podCIDR", "agent"}
    assert set(st["pods"][0]) >= {"name", "namespace", "netns", "ip", "node", "serviceAccount"}
    assert all(isinstance(p["meshed"], bool) for p in st["pods"])


def test_exec_passes_stdio_and_exit_code(lab_factory: LabFactory) -> None:
    lab = lab_factory(components=False)
    cmd = "import sys; sys.stdout.write(sys.stdin.read().upper()); sys.exit(3)"
    out = subprocess.run(
        [sys.executable, "-m", "agent", "lab", "exec", "--name", lab.name, "server-1", "--",
         sys.executable, "-c", cmd],
        input="ping", capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert (out.returncode, out.stdout) == (3, "PING")


def test_down_leaves_nothing_and_is_idempotent() -> None:
    name = "t" + os.urandom(3).hex()
    links_before = _host_links()
    lab = Lab.up(name, components=False)
    try:
        server = lab.popen("server-0", sys.executable, "-c", ECHO_SERVER)
        Path(PIN_ROOT, f"{name}-node1").mkdir(parents=True)  # as an agent would pin
    finally:
        lab.down()
    assert server.wait(timeout=10) is not None
    assert _leftovers(name) == []
    assert _host_links() == links_before
    lab.down()  # a second down is a no-op


def test_failed_up_rolls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "t" + os.urandom(3).hex()
    real_add_pod = build._add_pod
    calls = []

    def failing_add_pod(plan, pod):  # type: ignore[no-untyped-def]
        calls.append(pod.name)
        if len(calls) == 3:
            raise OSError(28, "injected failure after two pods")
        real_add_pod(plan, pod)

    monkeypatch.setattr(build, "_add_pod", failing_add_pod)
    try:
        with pytest.raises(LabError, match="injected failure"):
            control.up(name, DEFAULT_TOPOLOGY, source="test")
        assert len(calls) == 3
        assert _leftovers(name) == []
    finally:
        control.down(name)


def test_bad_topology_file_builds_nothing(tmp_path: Path) -> None:
    name = "t" + os.urandom(3).hex()
    bad = tmp_path / "topo.yaml"
    bad.write_text("nodes:\n  - name: node1\n    pods: [{name: a, serviceAcount: a}]\n")
    out = subprocess.run(
        [sys.executable, "-m", "agent", "lab", "up", "--name", name, "-f", str(bad)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    try:
        assert out.returncode == 1
        assert f"{bad}: nodes[0].pods[0].serviceAcount: unknown key" in out.stderr
        assert _leftovers(name) == []
    finally:
        control.down(name)


def test_default_lab_with_components(lab: Lab) -> None:
    """The ``lab`` fixture: default topology, the CA and both agents, all ready."""
    st = lab.status()
    assert [n["agent"] for n in st["nodes"]] == ["ready"] * 2
    assert st["ca"]["state"] == "running"
    _serve(lab, "server-1")
    reply = _ask(lab, "client", lab.pod("server-1")["ip"], b"through the mesh")
    assert reply.startswith(b"through the mesh seen from ")


def test_down_stops_component_processes() -> None:
    name = "t" + os.urandom(3).hex()
    lab = Lab.up(name)
    try:
        pids = list(LabDir(name).pids().values())
    finally:
        lab.down()
    assert [pid for pid in pids if os.path.exists(f"/proc/{pid}")] == []
    assert _leftovers(name) == []


def test_demo_tour_passes_and_cleans_up(capsys: pytest.CaptureFixture[str]) -> None:
    from agent.lab import demo

    name = "t" + os.urandom(3).hex()
    try:
        assert demo.main(["--name", name]) == 0
    finally:
        control.down(name)
    out = capsys.readouterr().out
    assert "summary: every step passed" in out
    # The HTTP step: an L7 denial on a connection that then serves the next request.
    assert "POST /admin/users -> 403 'RBAC: access denied' (same connection)" in out
    assert "GET  /admin/users -> 200" in out
    assert _leftovers(name) == []


def test_down_after_a_crashed_up_finds_everything_by_prefix() -> None:
    """A ``lab up`` killed before it wrote its plan still leaves only prefixed objects behind."""
    from pyroute2 import netns as pr_netns

    name = "t" + os.urandom(3).hex()
    try:
        for suffix in ("node1", "client"):
            pr_netns.create(f"{name}-{suffix}")
        Path(PIN_ROOT, f"{name}-node1").mkdir(parents=True)
        Path("/run/nodemesh/lab", name, "logs").mkdir(parents=True)
        assert len(_leftovers(name)) == 4
        control.down(name)
        assert _leftovers(name) == []
    finally:
        control.down(name)
