"""What the drills share: a steady load from pods, reading an agent's admin API and metrics.

A drill breaks one dependency of the mesh (the CA, the Kubernetes API, the agent itself) while
pods keep opening connections, and then judges by counts: how many connections failed while
they had every right to succeed, how many reached their destination some other way. Each load
generator runs in a pod as its own process and writes one line per connection, so the test
reads what the pod saw, not what the mesh claims. Timings are printed for the report, never
asserted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
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

# A pod's load: a new connection every argv[3] seconds to argv[1]:argv[2] until the file
# argv[4] exists; one line per connection: "<wall time> ok <ms>" when the server echoed the
# line sent, else "<wall time> ERR <reason>".
LOAD = """
import os, socket, sys, time
host, port, pause, stop = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
n = 0
while not os.path.exists(stop):
    n += 1
    line = f"drill-{os.getpid()}-{n}"
    started = time.time()
    try:
        with socket.create_connection((host, port), timeout=10) as s:
            s.settimeout(10)
            s.sendall(line.encode() + b"\\n")
            answer = s.makefile("rb").readline().decode().split()
        result = "ok" if answer[1:] == [line] else "ERR answer:" + "_".join(answer)
    except (OSError, IndexError) as e:
        result = "ERR " + type(e).__name__
    print(f"{started:.3f} {result} {(time.time() - started) * 1000:.1f}", flush=True)
    time.sleep(pause)
"""


@dataclass(frozen=True)
class Attempt:
    at: float  # wall clock when the connection was started
    ok: bool
    detail: str
    seconds: float  # until it was answered or failed

    @property
    def done(self) -> float:
        return self.at + self.seconds


class Load:
    """A connection loop running in a pod (``LOAD``); ``stop()`` returns what it saw."""

    def __init__(self, lab: Lab, pod: str, dst_ip: str, stop_file: Path, pause: float) -> None:
        self._stop_file = stop_file
        self._seen: list[Attempt] | None = None
        self._proc = lab.popen(
            pod, sys.executable, "-c", LOAD, dst_ip, str(PORT), str(pause), str(stop_file),
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def stop(self) -> list[Attempt]:
        if self._seen is not None:
            return self._seen
        self._stop_file.touch()
        try:
            out, _ = self._proc.communicate(timeout=30)
        finally:
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
        attempts = []
        for line in out.splitlines():
            at, result, detail = line.split(" ", 2)
            ms = float(detail.rsplit(" ", 1)[-1])
            attempts.append(Attempt(float(at), result == "ok", f"{result} {detail}", ms / 1000))
        self._seen = attempts
        return attempts


@contextmanager
def load(lab: Lab, pod: str, dst: str, tmp: Path, pause: float = 0.05) -> Iterator[Load]:
    """A ``Load`` from ``pod`` to pod ``dst``; killed on exit if the test did not stop it."""
    running = Load(lab, pod, str(lab.pod(dst)["ip"]), tmp / f"stop-{pod}-{dst}", pause)
    try:
        yield running
    finally:
        running.stop()


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
    return f"{len(attempts)} connections, {len(failed)} failed" + (
        f" (first: {failed[0].detail}, started {_clock(failed[0].at)}; match it with the kept logs)"
        if failed
        else ""
    )
