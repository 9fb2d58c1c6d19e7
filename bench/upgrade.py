"""Upgrading agents under load: what happens to live and new connections (``make bench``'s
"upgrade" section, and the pass/fail lab test ``tests/integration/lab/test_lab_upgrade.py``).

One lab (the default topology), agents started with a long ``--drain-seconds`` so that no
connection is cut by a deadline. Echo servers in ``server-0`` (node2) and ``neighbor`` (node1);
``bench.programs.upgrade_client`` in three pods holds the long-lived streams and opens new
connections at a steady rate over every kind of path, so that upgrading node1 and then node2
exercises every role of both agents:

    client   -> server-0   HBONE      (node1 outbound, node2 inbound HBONE)
    client   -> neighbor   local      (node1, same node, no TLS)
    outsider -> server-0   plaintext  (unmeshed client: node2's inbound plaintext listener)
    server-1 -> neighbor   HBONE      (node2 outbound, node1 inbound HBONE)

Then ``nodemesh lab upgrade node1``, a pause, ``nodemesh lab upgrade node2``, a pause, and the
clients stop. Counted:

- resets: long-lived connections that broke; failed new connections;
- escapes from capture, three ways: the marker the meshed clients put in every chunk seen in
  clear text on the node link (``tcpdump`` on the lab bridge, read by ``bench.wire``); segments
  on the link between a meshed client and a server's port (a connection that bypassed HBONE);
  and the datapath's own count of segments of meshed flows that had no proxy socket and passed
  uncaptured (``passed`` + ``failed_open`` of ``nm_counters``, before and after);
- the longest stall of a live stream (send to echo) and the slowest new connection;
- probes of the upgraded node's readiness (``:15021/healthz/ready``), metrics (``:15020``)
  and admin API (``127.0.0.1:15000/status``) every 0.1 s through the phase: any answer other
  than 200, or no answer, is a probe that saw the node down;
- whether each old agent exited once its connections had closed (not at its drain deadline).

A baseline phase with the same load and no upgrade comes first: its stall and counts are what
the upgrade phases compare with.
"""

from __future__ import annotations

import http.client
import json
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.lab import components, netns
from agent.lab.handle import Lab
from bench import wire

ECHO_PORT = 7000
ADMIN_PORT = 15000
DRAIN_SECONDS = 3600.0  # the agents' --drain-seconds: long drains work; nothing waits for it
SERVERS = ("server-0", "neighbor")
# client pod, target pod, path, share of the long-lived connections, meshed client?
FLOWS = (
    ("client", "server-0", "hbone", 0.3, True),
    ("client", "neighbor", "local", 0.2, True),
    ("outsider", "server-0", "plaintext", 0.2, False),
    ("server-1", "neighbor", "hbone", 0.3, True),
)


@dataclass(frozen=True)
class UpgradeSettings:
    long_lived: int = 100  # over all flows
    new_per_second: float = 4.0  # per flow
    settle_seconds: float = 4.0  # before and after the upgrade, in each phase
    exit_timeout: float = 60.0  # for the old agent to finish draining


def section(s: UpgradeSettings) -> dict[str, Any]:
    """``make bench``'s upgrade section: its own lab (long drains), removed afterwards."""
    lab = Lab.up("bu" + secrets.token_hex(3), timeout=120, drain_seconds=DRAIN_SECONDS)
    try:
        return run(lab, s)
    finally:
        lab.down()


def run(
    lab: Lab, s: UpgradeSettings, nodes: tuple[str, ...] = ("node1", "node2")
) -> dict[str, Any]:
    """A baseline phase without an upgrade, then one phase per node of ``nodes`` (each with
    fresh clients and its own capture, so every figure belongs to one upgrade)."""
    servers = [_program(lab, pod, "echo_server", "--port", str(ECHO_PORT)) for pod in SERVERS]
    try:
        for pod in SERVERS:
            _wait_listening(lab, pod)
        phases = {"baseline": phase(lab, s, None)}
        for node in nodes:
            phases[node] = phase(lab, s, node)
    finally:
        for proc in servers:
            _stop(proc)
    return {"settings": asdict(s), "phases": phases}


def phase(lab: Lab, s: UpgradeSettings, node: str | None) -> dict[str, Any]:
    """Clients running, then ``nodemesh lab upgrade node`` (or nothing), then the counts."""
    marker = f"NODEMESH-UPGRADE-{secrets.token_hex(6)}"
    procs: list[subprocess.Popen[bytes]] = []
    upgrade: dict[str, Any] | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="nodemesh-upgrade-") as tmp:
            pcap = Path(tmp) / "link.pcap"
            dump = _tcpdump(lab, pcap)
            procs.append(dump)
            before = _counters(lab)
            clients = _start_clients(lab, s, marker)
            procs += clients.values()
            prober = Prober(lab, node or "node1")
            prober.start()
            time.sleep(s.settle_seconds)
            if node is not None:
                started = time.monotonic()
                result = lab.upgrade(node, timeout=120.0)
                upgrade = asdict(result) | {
                    "takeover_seconds": round(time.monotonic() - started, 2)
                }
                time.sleep(s.settle_seconds)
            probes = prober.report()
            reports = _stop_clients(clients)
            after = _counters(lab)
            time.sleep(0.5)  # the last segments reach the capture
            _stop(dump)
            capture = pcap.read_bytes()
        if upgrade is not None:
            upgrade["old_agent_exited"] = _waited(upgrade["old_pid"], s.exit_timeout)
    finally:
        for proc in procs:
            _stop(proc)
    return _summary(lab, reports, upgrade, before, after, capture, marker) | {"probes": probes}


class Prober(threading.Thread):
    """Probes a node's readiness, metrics and admin ports from inside its namespace until
    stopped; counts the answers that were not a 200."""

    INTERVAL = 0.1

    def __init__(self, lab: Lab, node: str) -> None:
        super().__init__(name=f"probe-{node}", daemon=True)
        self.netns = lab.netns(node)
        ip = lab.node(node)["ip"]
        self.targets = {
            "readiness": (ip, 15021, "/healthz/ready"),
            "metrics": (ip, 15020, "/metrics"),
            "admin": ("127.0.0.1", ADMIN_PORT, "/status"),
        }
        self.ok: Counter[str] = Counter()
        self.down: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.halt = threading.Event()

    def run(self) -> None:
        netns.enter(self.netns)
        while not self.halt.wait(self.INTERVAL):
            for name, (host, port, path) in self.targets.items():
                conn = http.client.HTTPConnection(host, port, timeout=2.0)
                try:
                    conn.request("GET", path)
                    response = conn.getresponse()
                    response.read()
                    status = response.status
                except (OSError, http.client.HTTPException) as e:
                    status, why = 0, type(e).__name__
                finally:
                    conn.close()
                if status == 200:
                    self.ok[name] += 1
                else:
                    self.down[name] += 1
                    self.reasons[f"{name}: {status or why}"] += 1

    def report(self) -> dict[str, Any]:
        self.halt.set()
        self.join()
        return {"ok": dict(self.ok), "down": dict(self.down), "reasons": dict(self.reasons)}


def _program(lab: Lab, pod: str, name: str, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
    repo = str(Path(__file__).resolve().parent.parent)
    return lab.popen(pod, sys.executable, "-m", f"bench.programs.{name}", *args, cwd=repo, **kw)


def _wait_listening(lab: Lab, pod: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            netns.connect(lab.netns(pod), "127.0.0.1", ECHO_PORT, timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _tcpdump(lab: Lab, pcap: Path) -> subprocess.Popen[bytes]:
    dump = lab.popen(
        "switch", "tcpdump", "-i", "br0", "-n", "-s", "0", "--immediate-mode", "-U",
        "-w", str(pcap), "tcp and not port 15012",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not (pcap.exists() and pcap.stat().st_size >= 24):
        if dump.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("tcpdump did not start on the lab bridge (is tcpdump installed?)")
        time.sleep(0.05)
    time.sleep(0.2)
    return dump


def _counters(lab: Lab) -> dict[str, dict[str, Any]]:
    """``nm_counters`` and the generation of each node, through its agent's admin API (the
    pinned map outlives agents of the same generation, so before and after compare)."""
    found = {}
    for node in ("node1", "node2"):
        status, body = netns.http_get(
            lab.netns(node), "127.0.0.1", ADMIN_PORT, "/datapath", timeout=5.0
        )
        if status != 200:
            raise RuntimeError(f"{node}'s admin API answered {status} on /datapath: {body[:200]}")
        datapath = json.loads(body)["datapath"]
        found[node] = {"generation": datapath["generation"], "counters": datapath["counters"]}
    return found


def _start_clients(lab: Lab, s: UpgradeSettings, marker: str) -> dict[str, subprocess.Popen[bytes]]:
    targets: dict[str, list[str]] = {}
    meshed: dict[str, bool] = {}
    for client, server, _path, share, is_meshed in FLOWS:
        long = max(1, round(s.long_lived * share))
        ip = lab.pod(server)["ip"]
        targets.setdefault(client, []).append(f"{ip}:{ECHO_PORT}:{long}:{s.new_per_second:g}")
        meshed[client] = is_meshed
    clients = {}
    for client, spec in targets.items():
        args = [a for t in spec for a in ("--target", t)]
        # An unmeshed client's bytes cross the link in clear by design: another marker.
        mark = marker if meshed[client] else f"NODEMESH-PLAINTEXT-{secrets.token_hex(6)}"
        clients[client] = _program(
            lab, client, "upgrade_client", *args, "--marker", mark,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
    for client, proc in clients.items():
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the upgrade client in {client} exited before it was ready")
    return clients


def _stop_clients(clients: dict[str, subprocess.Popen[bytes]]) -> list[dict[str, Any]]:
    reports = []
    for proc in clients.values():
        assert proc.stdin is not None
        proc.stdin.close()
    for client, proc in clients.items():
        assert proc.stdout is not None
        out = proc.stdout.read()
        if proc.wait(timeout=60) != 0:
            raise RuntimeError(f"the upgrade client in {client} failed ({proc.returncode})")
        for line in out.decode().splitlines():
            reports.append({"client": client, **json.loads(line)})
    return reports


def _waited(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while components.alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _escapes_on_link(lab: Lab, capture: bytes, marker: str) -> dict[str, Any]:
    meshed_clients = {lab.pod(c)["ip"] for c, *_rest, meshed in FLOWS if meshed}
    bypass = 0
    for seg in wire.read_pcap(capture):
        src_ip, src_port = seg.src.rsplit(":", 1)
        dst_ip, dst_port = seg.dst.rsplit(":", 1)
        if (dst_port == str(ECHO_PORT) and src_ip in meshed_clients) or (
            src_port == str(ECHO_PORT) and dst_ip in meshed_clients
        ):
            bypass += 1
    report = wire.inspect(capture, marker.encode())
    return {
        "marker_in_clear": report.marker_seen,
        "bypass_segments": bypass,
        "tls_application_bytes": report.tls_application_bytes,
    }


def _uncaptured(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """Segments of meshed flows passed uncaptured during the phase, per node (an upgrade to a
    new generation starts fresh counters: then everything the new maps counted)."""
    found = {}
    for node, now in after.items():
        same = now["generation"] == before[node]["generation"]
        found[node] = sum(
            counts[key] - (before[node]["counters"][program][key] if same else 0)
            for program, counts in now["counters"].items()
            for key in ("passed", "failed_open")
        )
    return found


def _summary(
    lab: Lab,
    reports: list[dict[str, Any]],
    upgrade: dict[str, Any] | None,
    before: dict[str, Any],
    after: dict[str, Any],
    capture: bytes,
    marker: str,
) -> dict[str, Any]:
    paths = {(client, lab.pod(server)["ip"]): path for client, server, path, *_ in FLOWS}
    for r in reports:
        r["path"] = paths[(r["client"], r["target"].rsplit(":", 1)[0])]
    link = _escapes_on_link(lab, capture, marker)
    uncaptured = _uncaptured(before, after)
    escapes = int(link["marker_in_clear"]) + link["bypass_segments"] + sum(uncaptured.values())
    return {
        "upgrade": upgrade,
        "flows": reports,
        "long_lived": sum(r["long"] for r in reports),
        "resets": sum(r["resets"] for r in reports),
        "new_ok": sum(r["new_ok"] for r in reports),
        "new_failed": sum(r["new_failed"] for r in reports),
        "longest_stall_ms": max((r["longest_stall_ms"] for r in reports), default=0.0),
        "slowest_new_ms": max((r["slowest_new_ms"] for r in reports), default=0.0),
        "link": link,
        "uncaptured_segments": uncaptured,
        "escapes": escapes,
    }


def headline(phase: dict[str, Any]) -> str:
    down = sum(phase["probes"]["down"].values())
    return (
        f"{phase['resets']} resets, {phase['new_failed']} failed of "
        f"{phase['new_ok'] + phase['new_failed']} new, {phase['escapes']} escapes, "
        f"{down} probes down, longest stall {phase['longest_stall_ms']:.0f} ms"
    )
