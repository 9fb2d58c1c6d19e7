"""The long-running agent processes keep grpc, protobuf, pyroute2, BCC, ``cryptography`` and
``prometheus_client`` out (ARCHITECTURE.md, "No compiler in the agent" and "A small agent"): its
CA client, its netlink helper child, its compiler child and its short-lived key child carry them
instead, and ``agent.base.promtext`` writes its metrics.

How it cannot pass by accident: node1's agent is restarted with ``python -X importtime``, which
makes that interpreter (and only it: children started with ``sys.executable`` do not inherit the
option) write a line for every module it imports, for its whole life. The test checks the log
holds the lines of the modules it exercised (the CA client did fetch certificates, the datapath
did ask its helper), then that no line names a forbidden module; the same parsing finds those
modules where they are imported. The process's ``/proc/<pid>/maps`` must not hold grpc's,
protobuf's or ``cryptography``'s shared objects either, and the netlink helper must run as its
child. The agent runs ``--workers 2``: the workers (started without ``-X importtime``) are
checked by their maps, which is enough for ``cryptography``: none of its use works without its
``_rust`` extension. The key child must be gone once the agent is idle.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.lab import netns
from agent.lab.handle import Lab

pytestmark = [pytest.mark.root, pytest.mark.lab]

FORBIDDEN = ("grpc", "google", "pyroute2", "bcc", "cryptography", "prometheus_client")
FORBIDDEN_OBJECTS = ("cygrpc", "_upb", "_message.", "libLLVM", "libbcc", "libclang", "_rust.abi3")


def imported(log: str) -> set[str]:
    """Module names from ``-X importtime`` lines (``import time: self | cumulative | name``)."""
    return {
        line.split("|")[2].strip()
        for line in log.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


def forbidden_objects(maps: str) -> list[str]:
    """The forbidden shared objects among the files of a ``/proc/<pid>/maps`` text."""
    objects = {Path(line.split()[-1]).name for line in maps.splitlines() if "/" in line}
    return sorted(o for o in objects if any(x in o for x in FORBIDDEN_OBJECTS))


def children_running(pid: int, module: str) -> list[int]:
    return [c for c in children(pid) if module.encode() in Path(f"/proc/{c}/cmdline").read_bytes()]


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_the_import_lines_name_the_forbidden_modules_where_they_are_imported() -> None:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import grpc, google.protobuf, pyroute2"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert {"grpc", "google.protobuf", "pyroute2"} <= imported(out.stderr)


def test_the_maps_name_cryptographys_extension_where_it_is_loaded() -> None:
    code = "import cryptography.x509; print(open('/proc/self/maps').read())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert forbidden_objects(out.stdout) == ["_rust.abi3.so"]


def test_the_agent_processes_never_import_grpc_protobuf_pyroute2_bcc_or_cryptography(
    lab: Lab, tmp_path: Path
) -> None:
    status = lab.status()
    if status["ca"]["state"] != "running":
        pytest.skip("this build's lab runs no CA")
    planned = lab.component("agent-node1")
    lab.kill("agent-node1", signal.SIGTERM)
    log_path = tmp_path / "agent-node1.log"
    argv = [planned.argv[0], "-X", "importtime", *planned.argv[1:], "--workers", "2"]
    with open(log_path, "wb") as log:
        proc = lab.popen("node1", *argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not planned.ready():  # certificates for node1's meshed pods included
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"agent not ready: {log_path.read_text()}"
            time.sleep(0.2)
        code, body = netns.http_get(
            lab.netns("node1"), "127.0.0.1", 15000, "/datapath", timeout=10.0
        )
        assert code == 200 and json.loads(body)["datapath"]["attachments"]  # via the helper

        names = imported(log_path.read_text())
        exercised = ("agent.datapath.datapath", "agent.datapath.netlink",
                     "agent.identity.caclient", "agent.identity.grpcunary",
                     "agent.identity.keys", "agent.workers.supervisor")  # fmt: skip
        for used in exercised:
            assert used in names, f"no import line for {used}: is -X importtime in effect?"
        assert sorted(n for n in names if n.split(".")[0] in FORBIDDEN) == []

        workers = children_running(proc.pid, "agent.workers.worker")
        assert len(workers) == 2
        for pid in (proc.pid, *workers):
            assert forbidden_objects(Path(f"/proc/{pid}/maps").read_text()) == [], pid

        assert len(children_running(proc.pid, "agent.datapath.netlinkd")) == 1
        deadline = time.monotonic() + 60  # the key child leaves a few seconds after its burst
        while children_running(proc.pid, "agent.identity.keysmith"):
            assert time.monotonic() < deadline, "the key child stays although the agent is idle"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
