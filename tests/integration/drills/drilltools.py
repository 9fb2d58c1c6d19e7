"""What the drills share: a steady load from pods, reading an agent's admin API and metrics.

A drill breaks one dependency of the mesh (the CA, the Kubernetes API, the agent itself) while
pods keep opening connections, and then judges by counts: how many connections failed while
they had every right to succeed, how many reached their destination some other way. Each load
generator runs in a pod as its own process and writes one line per connection, so the test
reads what the pod saw, not what the mesh claims. Timings are printed for the report, never
asserted.

A connection that stalls is looked at while it stalls: the load says so after ``STALL_AFTER``
seconds (its source port and whether it waits to connect or for the answer), and the test then
records where its 4-tuple is, in the pod and on both nodes (``ss``), the agents' rows for it
(``/connections``) and the source agent's state and capture counters. A failed connection's
summary carries that record, so a flake is diagnosed from one failed run rather than a 10 s
timeout with nothing attached (the kube API drill's was a SYN dropped because the proxy's side
of an earlier connection with the same tuple was in TIME_WAIT).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from agent.lab import netns
from agent.lab.handle import Lab

PORT = 8080
ADMIN_PORT = 15000
METRICS_PORT = 15020
READY_PORT = 15021

# A pod's server on 8080: per connection, read one line and answer "<peer ip> <line>".
SERVER = f"""
import socket, threading
def answer(conn, peer):
    with conn:
        line = conn.makefile("rb").readline().decode().strip()
        conn.sendall(f"{{peer[0]}} {{line}}\\n".encode())
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", {PORT}))
srv.listen(128)
while True:
    conn, peer = srv.accept()
    threading.Thread(target=answer, args=(conn, peer), daemon=True).start()
"""

# Seconds after which the load reports a connection as stalled (it still waits for it up to
# the 10 s timeout): well above a captured connection's few milliseconds, and above one SYN
# retransmission (1 s), below the timeout so the evidence is taken while the stall lasts.
STALL_AFTER = 2.5
# Stalls examined per load (each costs a few commands and admin calls; a drill that kills the
# agent stalls every connection of the outage).
STALLS_EXAMINED = 3

# A pod's load: a new connection every argv[3] seconds to argv[1]:argv[2] until the file
# argv[4] exists; one line per connection: "<wall time> <source port> ok <ms>" when the server
# echoed the line sent, else "<wall time> <source port> ERR <phase>:<reason> <ms>" (phase:
# connect, or read for the answer). A connection still open after argv[5] seconds is reported
# at once with "<wall time> <source port> STALL <phase>".
LOAD = """
import os, socket, sys, threading, time
host, port, pause, stop = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
stall_after = float(sys.argv[5])
out = threading.Lock()
def say(text):
    with out:
        print(text, flush=True)
def source_port(s):
    try:
        return s.getsockname()[1]
    except OSError:
        return 0
n = 0
while not os.path.exists(stop):
    n += 1
    line = f"drill-{os.getpid()}-{n}"
    started = time.time()
    phase = ["connect"]
    s = socket.socket()
    s.settimeout(10)
    watch = threading.Timer(
        stall_after, lambda: say(f"{started:.3f} {source_port(s)} STALL {phase[0]}")
    )
    watch.start()
    try:
        s.connect((host, port))
        phase[0] = "read"
        s.sendall(line.encode() + b"\\n")
        answer = s.makefile("rb").readline().decode().split()
        result = "ok" if answer[1:] == [line] else "ERR answer:" + "_".join(answer)
    except (OSError, IndexError) as e:
        result = f"ERR {phase[0]}:{type(e).__name__}"
    watch.cancel()
    sport = source_port(s)
    s.close()
    say(f"{started:.3f} {sport} {result} {(time.time() - started) * 1000:.1f}")
    time.sleep(pause)
"""


@dataclass(frozen=True)
class Attempt:
    at: float  # wall clock when the connection was started
    ok: bool
    detail: str
    seconds: float  # until it was answered or failed
    source_port: int = 0
    evidence: str = ""  # what was seen while it stalled (``stall_evidence``), if it did

    @property
    def done(self) -> float:
        return self.at + self.seconds


class Load:
    """A connection loop running in a pod (``LOAD``); ``stop()`` returns what it saw.

    A thread reads the loop's lines as they come, so a stall is examined while it lasts
    (``stall_evidence``, for the first ``STALLS_EXAMINED``)."""

    def __init__(
        self,
        lab: Lab,
        pod: str,
        dst: str,
        stop_file: Path,
        pause: float,
        examine: Callable[[int, str], str] | None = None,
    ) -> None:
        self._stop_file = stop_file
        self._seen: list[Attempt] | None = None
        self._lines: list[str] = []
        self._evidence: dict[int, str] = {}
        self._examine = examine
        self._proc = lab.popen(
            pod, sys.executable, "-c", LOAD, str(lab.pod(dst)["ip"]), str(PORT), str(pause),
            str(stop_file), str(STALL_AFTER), stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, name=f"load-{pod}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            _, sport, result, rest = line.split(" ", 3)
            if result != "STALL":
                self._lines.append(line)
            elif self._examine is not None and len(self._evidence) < STALLS_EXAMINED:
                try:
                    evidence = self._examine(int(sport), rest.strip())
                except Exception as e:  # a diagnosis aid must never cost the load's lines
                    evidence = f"stall of source port {sport} not examined: {e!r}"
                self._evidence[int(sport)] = evidence

    def stop(self) -> list[Attempt]:
        if self._seen is not None:
            return self._seen
        self._stop_file.touch()
        try:
            self._proc.wait(timeout=30)
            self._reader.join(timeout=30)
        finally:
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
        attempts = []
        for line in self._lines:
            at, sport, result, detail = line.rstrip("\n").split(" ", 3)
            ms = float(detail.rsplit(" ", 1)[-1])
            attempts.append(
                Attempt(
                    float(at), result == "ok", f"{result} {detail}", ms / 1000, int(sport),
                    self._evidence.get(int(sport), ""),
                )
            )  # fmt: skip
        self._seen = attempts
        return attempts


@contextmanager
def load(lab: Lab, pod: str, dst: str, tmp: Path, pause: float = 0.05) -> Iterator[Load]:
    """A ``Load`` from ``pod`` to pod ``dst``, its stalls examined (``stall_evidence``);
    killed on exit if the test did not stop it."""
    dst_ip = str(lab.pod(dst)["ip"])

    def examine(source_port: int, phase: str) -> str:
        return stall_evidence(lab, pod, dst_ip, source_port, phase)

    running = Load(lab, pod, dst, tmp / f"stop-{pod}-{dst}", pause, examine)
    try:
        yield running
    finally:
        running.stop()


def stall_evidence(lab: Lab, pod: str, dst_ip: str, source_port: int, phase: str) -> str:
    """Where a stalled connection ``pod``:``source_port`` -> ``dst_ip``:``PORT`` is: its
    sockets in the pod and in every node's namespace (a proxy socket, or a TIME_WAIT one that
    holds its 4-tuple), the agents' ``/connections`` rows for it, and the source agent's state
    and capture counters. Whatever cannot be read says why instead."""
    src = f"{lab.pod(pod)['ip']}:{source_port}"
    dst = f"{dst_ip}:{PORT}"
    node = str(lab.pod(pod)["node"])
    lines = [f"stalled {src} -> {dst} (waiting to {phase}), seen {time.strftime('%H:%M:%S')}:"]
    nodes = [str(n["name"]) for n in lab.status()["nodes"]]
    for where in (pod, *nodes):
        lines.append(f"  sockets in {where}: {_sockets(lab, where, src, dst)}")
    for name in nodes:
        rows = _read(lambda name=name: _rows(lab, name, src))  # type: ignore[misc]
        lines.append(f"  {name} /connections rows: {rows}")
    state = _read(lambda: admin(lab, node, "/status")["state"])
    lines.append(f"  {node} state: {state}")
    counters = _read(lambda: admin(lab, node, "/datapath")["datapath"].get("counters"))
    lines.append(f"  {node} capture counters: {counters}")
    return "\n".join(lines)


def _rows(lab: Lab, node: str, src: str) -> list[dict[str, Any]]:
    rows = admin(lab, node, "/connections")["connections"]
    return [r for r in rows if r.get("source_address") == src]


def _sockets(lab: Lab, where: str, src: str, dst: str) -> str:
    """``ss`` lines in ``where``'s namespace for the 4-tuple (either way round)."""
    out = lab.exec(where, "ss", "-Htanoi", capture_output=True, text=True)
    if out.returncode != 0:
        return f"unavailable (ss: {out.stderr.strip()})"
    found = []
    lines = out.stdout.splitlines()
    for i, line in enumerate(lines):
        if {src, dst} <= set(line.split()[3:5]):
            info = lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1][:1].isspace() else ""
            found.append(" ".join(line.split()) + (f" [{info}]" if info else ""))
    return "; ".join(found) or "none"


def _read(get: Callable[[], Any]) -> str:
    try:
        return json.dumps(get(), sort_keys=True)
    except (OSError, AssertionError, ValueError, KeyError) as e:
        return f"unavailable ({type(e).__name__}: {e})"


@contextmanager
def kept_logs(lab: Lab, tmp: Path) -> Iterator[None]:
    """Copy the lab's component logs to ``tmp/logs`` when the block ends (pytest keeps the
    last runs' temporary directories), so a failed drill can be read after the lab is gone."""
    try:
        yield
    finally:
        shutil.copytree(lab.state_dir / "logs", tmp / "logs", dirs_exist_ok=True)


def admin(lab: Lab, node: str, path: str) -> Any:
    """``GET path`` on ``node``'s admin API (127.0.0.1:15000 inside the node's namespace)."""
    status, body = netns.http_get(lab.netns(node), "127.0.0.1", ADMIN_PORT, path, timeout=5)
    assert status == 200, (path, status, body)
    return json.loads(body)


def ready(lab: Lab, node: str) -> tuple[int, Any]:
    ip = str(lab.node(node)["ip"])
    status, body = netns.http_get(lab.netns(node), ip, READY_PORT, "/healthz/ready", timeout=5)
    return status, json.loads(body)


def metric(lab: Lab, node: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples on ``node`` whose labels include ``labels``."""
    ip = str(lab.node(node)["ip"])
    status, body = netns.http_get(lab.netns(node), ip, METRICS_PORT, "/metrics", timeout=5)
    assert status == 200, body
    return sum(
        s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def serials(lab: Lab, node: str) -> dict[str, str]:
    """Identity → serial of the certificate ``node`` holds."""
    return {
        c["identity"]: c["certificate"]["serial"]
        for c in admin(lab, node, "/certs")["certificates"]
        if c["certificate"] is not None
    }


def agent_log(lab: Lab, node: str) -> str:
    return (lab.state_dir / "logs" / f"agent-{node}.log").read_text(errors="replace")


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall * 1000) % 1000:03d}"


def summary(attempts: list[Attempt]) -> str:
    failed = [a for a in attempts if not a.ok]
    stalled = [a for a in attempts if a.ok and a.seconds >= STALL_AFTER]
    first = failed[0] if failed else None
    return (
        f"{len(attempts)} connections, {len(failed)} failed"
        + (f", {len(stalled)} answered after stalling {STALL_AFTER:g}s or more" if stalled else "")
        + (
            f" (first: {first.detail}, source port {first.source_port}, started "
            f"{_clock(first.at)}; match it with the kept logs)"
            + (f"\n{first.evidence}" if first.evidence else "")
            if first is not None
            else ""
        )
    )
