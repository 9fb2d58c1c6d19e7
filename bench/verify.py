"""Is each path what it claims? Checked before any of its numbers are trusted.

For every path a marker client sends a random plaintext marker through it and holds the
connection open while the harness looks from two sides:

- the wire: ``tcpdump`` on the lab's bridge (the node-to-node link) during the exchange, judged
  by ``bench.wire``: a direct path must show the marker in clear text; the mesh's cross-node path
  and stunnel must show a TLS ServerHello and at least the marker's size of TLS application data,
  and never the marker; the same-node path must not touch the link at all;
- the agent: node1's admin API (``/connections``) must list the held connection with the
  expected mesh path (``hbone`` with ``mutual_tls``, or ``local``) for mesh paths, and must not
  list it for direct and stunnel (which the mesh must not capture).

The verdict, its explanation and the negotiated TLS version and cipher go into the results; a
path that fails is reported with its numbers marked untrusted.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.base.constants import ADMIN_PORT, CA_PORT
from agent.lab import netns
from bench import wire
from bench.testbed import BenchPath, Testbed, stop


@dataclass
class Verdict:
    ok: bool
    checks: list[str] = field(default_factory=list)
    tls_version: str = ""
    cipher: str = ""
    speed_cipher: str = ""

    def fail(self, reason: str) -> None:
        self.ok = False
        self.checks.append("FAILED: " + reason)


def verify(bed: Testbed, path: BenchPath, *, size: int) -> Verdict:
    lab = bed.the_lab
    marker = f"NODEMESH-PLAINTEXT-MARKER-{secrets.token_hex(8)}"
    with tempfile.TemporaryDirectory(prefix="nodemesh-bench-") as tmp:
        pcap = Path(tmp) / "link.pcap"
        dump = lab.popen(
            "switch", "tcpdump", "-i", "br0", "-n", "-s", "0", "--immediate-mode", "-U",
            "-w", str(pcap),
            f"tcp and not port {CA_PORT}",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _wait_for(pcap, dump)
            verdict = _exchange_and_ask_agent(bed, path, marker, size)
        finally:
            time.sleep(0.5)  # the last segments reach the capture
            stop(dump)
        report = wire.inspect(pcap.read_bytes(), marker.encode())
    _judge_wire(verdict, path, report, size)
    return verdict


def _wait_for(pcap: Path, dump: subprocess.Popen[bytes]) -> None:
    """tcpdump writes the pcap header once it is capturing."""
    deadline = time.monotonic() + 10
    while not (pcap.exists() and pcap.stat().st_size >= 24):
        if dump.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("tcpdump did not start on the lab bridge (is tcpdump installed?)")
        time.sleep(0.05)
    time.sleep(0.2)


def _exchange_and_ask_agent(bed: Testbed, path: BenchPath, marker: str, size: int) -> Verdict:
    client = bed.popen(
        path.client, sys.executable, "-m", "bench.programs.marker_client",
        "--host", path.host, "--port", str(path.echo_port), "--marker", marker,
        "--size", str(size), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    verdict = Verdict(ok=True)
    try:
        assert client.stdout is not None and client.stdin is not None
        line = client.stdout.readline()
        if not line:
            assert client.stderr is not None
            why = client.stderr.read().decode(errors="replace").strip().splitlines()[-1:]
            verdict.fail(f"no marker came back through {path.host}:{path.echo_port}: {why}")
            return verdict
        verdict.checks.append(f"marker echoed end to end ({json.loads(line)['echoed']} bytes)")
        _judge_agent(verdict, path, _agent_connections(bed), bed.the_lab.pod(path.client)["ip"])
        client.stdin.close()
        client.wait(timeout=10)
    finally:
        stop(client)
    return verdict


def _agent_connections(bed: Testbed) -> list[dict[str, Any]]:
    status, body = netns.http_get(
        bed.the_lab.netns("node1"), "127.0.0.1", ADMIN_PORT, "/connections", timeout=5.0
    )
    if status != 200:
        raise RuntimeError(f"node1's admin API answered {status} on /connections: {body[:200]}")
    connections: list[dict[str, Any]] = json.loads(body)["connections"]
    return connections


def _judge_agent(
    verdict: Verdict, path: BenchPath, connections: list[dict[str, Any]], client_ip: str
) -> None:
    target = f"{path.host}:{path.echo_port}"
    mine = [
        c
        for c in connections
        if str(c.get("source_address", "")).startswith(client_ip + ":")
        and c.get("destination_address") == target
    ]
    if path.agent_path is None:
        if mine:
            verdict.fail(
                f"node1's agent proxied {target} (path {mine[0].get('path')}): not a mesh-free path"
            )
        else:
            verdict.checks.append("node1's agent did not see the connection (no capture)")
        return
    found = [c for c in mine if c.get("path") == path.agent_path]
    if not found:
        seen = sorted({str(c.get("path")) for c in mine}) or ["no record"]
        verdict.fail(f"node1's agent did not carry it as {path.agent_path} (saw {', '.join(seen)})")
        return
    security = found[0].get("security")
    if path.wire == "tls" and security != "mutual_tls":
        verdict.fail(f"node1's agent reports security {security!r}, not mutual_tls")
        return
    verdict.checks.append(f"node1's agent carried it as {path.agent_path}, security {security}")


def _judge_wire(verdict: Verdict, path: BenchPath, report: wire.WireReport, size: int) -> None:
    if path.wire == "local":
        if report.marker_seen or report.tls_application_bytes >= size:
            verdict.fail("same-node traffic crossed the node-to-node link")
        else:
            verdict.checks.append("nothing of it on the node-to-node link (stays on node1)")
        return
    ok, detail = wire.judge(report, expect_tls=path.wire == "tls", sent=size)
    if not ok:
        verdict.fail(detail)
        return
    verdict.checks.append(detail)
    hello = report.negotiated
    if path.wire == "tls" and hello is not None:
        verdict.tls_version, verdict.cipher = hello.version, hello.cipher
        verdict.speed_cipher = hello.speed_cipher
