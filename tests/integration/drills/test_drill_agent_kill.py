"""Drill: node1's agent is SIGKILLed under load, then started again.

Pods on node1 keep opening short connections to server-0 on node2 and stream bytes over
long-lived ones, every payload carrying a plaintext marker, while ``tcpdump`` records the
node-to-node link (the lab bridge, as ``bench.verify`` does). The agent is killed with no
drain and restarted. What must hold, by count: the marker never crosses the link in clear text
and no segment of the application's ports crosses it at all (everything cross-node is HBONE on
15008), node2 never admits a plaintext connection (a bypass would arrive there), SYNs sent
while no agent listened were dropped (``failed_closed``), the pinned programs stayed attached
and were adopted, and new connections work again after the restart. The time from the kill to
the first new connection that worked is printed, never asserted.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.lab.handle import Lab
from bench import wire
from tests.integration.drills.drilltools import (
    PORT,
    SERVER,
    admin,
    agent_log,
    kept_logs,
    load,
    metric,
    summary,
)
from tests.labtools import mesh_lab, pod_servers

pytestmark = [pytest.mark.root, pytest.mark.lab]

ECHO_PORT = 8081
MARKER = b"drill-"  # every payload the pods send starts with it
APP_PORTS = {PORT, ECHO_PORT}

# Port 8081: echo everything (the long-lived streams).
ECHO = f"""
import socket, threading
def echo(conn):
    with conn:
        try:
            while data := conn.recv(1 << 16):
                conn.sendall(data)
        except OSError:  # the client's proxy connection was cut by the kill
            pass
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", {ECHO_PORT}))
srv.listen(128)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""

# argv[3] threads each write a 16 KiB marker chunk to argv[1]:argv[2] every 5 ms without waiting
# for the echo (a second thread drains it), so segments are in flight whenever the agent dies
# and the capture stays around 100 MB; they reconnect
# after any error until the file argv[4] exists; prints "<streams> <errors>".
STREAMS = """
import os, socket, sys, threading, time
host, port, n, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
chunk = (b"drill-stream-" * 1300)[:16384]
counts = {"streams": 0, "errors": 0}
lock = threading.Lock()
def count(key):
    with lock:
        counts[key] += 1
def drain(s):
    try:
        while s.recv(1 << 16):
            pass
    except OSError:
        pass
def run():
    while not os.path.exists(stop):
        try:
            with socket.create_connection((host, port), timeout=10) as s:
                s.settimeout(10)
                count("streams")
                reader = threading.Thread(target=drain, args=(s,), daemon=True)
                reader.start()
                while not os.path.exists(stop):
                    s.sendall(chunk)
                    time.sleep(0.005)
        except OSError:
            count("errors")
            time.sleep(0.05)
threads = [threading.Thread(target=run) for _ in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(counts["streams"], counts["errors"], flush=True)
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with (
        mesh_lab("dx") as lab,
        kept_logs(lab, tmp_path),
        pod_servers(lab, ("server-0",), SERVER, PORT),
        pod_servers(lab, ("server-0",), ECHO, ECHO_PORT),
    ):
        yield lab


def plaintext_inbound(lab: Lab) -> float:
    return metric(
        lab, "node2", "istio_tcp_connections_opened_total",
        reporter="destination", connection_security_policy="none",
    )  # fmt: skip


def failed_closed(lab: Lab) -> float:
    """SYNs node1's pod programs dropped because no listener was registered."""
    return metric(
        lab, "node1", "nodemesh_capture_packets_total",
        program="pod_ingress", outcome="failed_closed",
    )  # fmt: skip


def test_agent_sigkill_under_load_fails_closed(lab: Lab, tmp_path: Path) -> None:
    started = time.monotonic()
    pcap = tmp_path / "link.pcap"
    server_ip = str(lab.pod("server-0")["ip"])
    attached = admin(lab, "node1", "/datapath")["datapath"]
    closed_before = failed_closed(lab)
    plaintext_before = plaintext_inbound(lab)
    dump = lab.popen(
        "switch", "tcpdump", "-i", "br0", "-n", "-s", "0", "--immediate-mode", "-U",
        "-w", str(pcap), "tcp and not port 15012",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    stop_streams = tmp_path / "stop-streams"
    streams = lab.popen(
        "neighbor", sys.executable, "-c", STREAMS, server_ip, str(ECHO_PORT), "4",
        str(stop_streams), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for_capture(pcap, dump)
        with load(lab, "client", "server-0", tmp_path) as short:
            time.sleep(2)
            lab.kill("agent-node1")
            killed_at = time.time()
            lab.start("agent-node1")
            ready_at = time.time()
            time.sleep(3)
            attempts = short.stop()
        stop_streams.touch()
        stream_out, _ = streams.communicate(timeout=60)
    finally:
        stop_streams.touch()
        if streams.poll() is None:
            streams.kill()
            streams.wait()
        time.sleep(0.5)  # the last segments reach the capture
        dump.terminate()
        dump.wait(timeout=10)

    segments = wire.read_pcap(pcap.read_bytes())
    pcap.unlink()  # about 100 MB; pytest keeps the last runs' temporary directories
    flows = wire.reassemble(segments)
    in_clear = [flow for flow, data in flows.items() if MARKER in data]
    app_port = [s for s in segments if {_port(s.src), _port(s.dst)} & APP_PORTS]
    hbone = {s.dst for s in segments if _port(s.dst) == 15008}
    after = admin(lab, "node1", "/datapath")["datapath"]
    closed = failed_closed(lab) - closed_before
    opened, stream_errors = (int(n) for n in stream_out.split())
    # The first connection opened after the kill that worked: when it was answered.
    first_ok = min((a.done for a in attempts if a.ok and a.at > killed_at), default=None)
    failed = [a for a in attempts if not a.ok]

    assert hbone, "no HBONE on the link: the capture saw nothing of the mesh"
    assert in_clear == [], f"plaintext marker crossed the node link in {in_clear[:3]}"
    assert app_port == [], f"application-port segments crossed the link: {app_port[:3]}"
    assert plaintext_inbound(lab) == plaintext_before  # node2 admitted no bypass
    assert closed > 0  # SYNs while no agent listened were dropped, not let through
    assert after["generation"] == attached["generation"]
    assert after["attachments"] == attached["attachments"]
    assert "adopting pinned capture programs" in agent_log(lab, "node1")
    assert first_ok is not None, summary(attempts)
    assert all(a.at < ready_at for a in failed), [a.detail for a in failed if a.at >= ready_at]
    assert opened > 4  # the streams were cut by the kill and reopened after the restart
    print(
        f"\nagent SIGKILL drill: restarted agent ready {ready_at - killed_at:.2f}s after the "
        f"kill; the first connection opened after the kill was answered "
        f"{first_ok - killed_at:.2f}s after it; short connections {summary(attempts)}; "
        f"streams opened {opened}, cut {stream_errors}; SYNs dropped while down "
        f"(failed_closed) {closed:.0f}; link: "
        f"{len(flows)} flows, {sum(len(d) for d in flows.values())} payload bytes, marker in "
        f"clear 0, application-port segments 0; drill {time.monotonic() - started:.1f}s"
    )


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _wait_for_capture(pcap: Path, dump: subprocess.Popen[bytes]) -> None:
    """tcpdump writes the pcap header once it is capturing."""
    deadline = time.monotonic() + 10
    while not (pcap.exists() and pcap.stat().st_size >= 24):
        assert dump.poll() is None and time.monotonic() < deadline, "tcpdump did not start"
        time.sleep(0.05)
    time.sleep(0.2)
