"""Helpers for tests and benchmarks that drive real traffic through a lab.

The lab tests of several areas (proxy, telemetry) and the lab benchmarks share one way of
working: a module-wide lab with agents and the CA, small Python servers started in pods and
waited for, polling until the mesh converges, and iperf3 between two pods. Keeping that here
means a fix to one of them (say, a wait that is too short on a loaded machine) reaches all.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest

from agent.lab.handle import Lab
from agent.lab.netns import call_in

T = TypeVar("T")


def retry(fn: Callable[[], T], timeout: float = 20.0) -> T:
    """``fn()``'s result once it stops raising ``OSError`` or ``AssertionError``.

    The mesh converges asynchronously (agents follow the state, servers take a moment to bind),
    so lab checks poll instead of asserting once; after ``timeout`` seconds the last error is
    raised as is, so a failing test shows what was wrong, not merely that time ran out.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@contextmanager
def mesh_lab(
    prefix: str, timeout: float = 90.0, drain_seconds: float | None = None
) -> Iterator[Lab]:
    """A default-topology lab named ``prefix`` + a random suffix, removed on exit.

    Skips (rather than fails) without root, and when this build's lab runs no CA: without a CA
    the agents have no certificates, so there is no proxy to test.
    """
    if os.geteuid() != 0:
        pytest.skip("a lab needs root")
    lab = Lab.up(prefix + secrets.token_hex(3), timeout=timeout, drain_seconds=drain_seconds)
    try:
        if lab.status()["ca"]["state"] != "running":
            pytest.skip("this build's lab runs no CA, so no proxy")
        yield lab
    finally:
        lab.down()


def counting_server(port: int) -> str:
    """A pod server program: per connection, read until the client half-closes, answer with the
    byte count, close (so a test knows exactly how many bytes the mesh delivered)."""
    return f"""
import socket, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", {port}))
srv.listen(64)
def count(conn):
    n = 0
    while data := conn.recv(1 << 16):
        n += len(data)
    conn.sendall(str(n).encode())
    conn.close()
while True:
    conn, _ = srv.accept()
    threading.Thread(target=count, args=(conn,), daemon=True).start()
"""


def _accepts(port: int) -> None:
    socket.create_connection(("127.0.0.1", port), timeout=2).close()


@contextmanager
def pod_servers(lab: Lab, pods: Iterable[str], program: str, port: int) -> Iterator[None]:
    """Run ``python -c program`` in each of ``pods``; enter once each accepts on ``port``.

    The wait probes the pod's own loopback, so it proves the server is bound without sending
    anything through the mesh; a server that died before binding is started again (its exit
    status is the error if none ever binds). On exit (also on failure) every server started is
    killed and reaped.
    """
    procs: list[subprocess.Popen[Any]] = []
    names = list(pods)

    def bound(i: int, pod: str) -> None:
        status = procs[i].poll()
        if status is not None:  # it died before binding: say how (``retry`` shows the last)
            procs[i] = lab.popen(pod, sys.executable, "-c", program)
            raise AssertionError(f"the server in {pod} exited with status {status}; restarted")
        call_in(lab.netns(pod), _accepts, port)

    try:
        for pod in names:
            procs.append(lab.popen(pod, sys.executable, "-c", program))
        for i, pod in enumerate(names):
            retry(lambda i=i, pod=pod: bound(i, pod))  # type: ignore[misc]
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def iperf(lab: Lab, client: str, server: str, seconds: float) -> float:
    """Gbit/s received, from ``client`` to an iperf3 server in ``server`` (one TCP stream)."""
    srv = lab.popen(server, "iperf3", "-s", "-1", stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = lab.exec(
            client, "iperf3", "-J", "-c", str(lab.pod(server)["ip"]), "-t", str(seconds),
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    finally:
        srv.wait(timeout=30)
    return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9
