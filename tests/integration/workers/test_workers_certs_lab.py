"""``nodemesh agent --workers 2`` in a real lab: the workers' certificates follow the main
process's identity manager (``agent.workers.certs``).

node1's agent runs two workers. When a pod leaves the mesh on node1 (the cluster document
changes), no worker keeps its identity; when the main process renews a certificate (the CA is
restarted with a 16 s lifetime, so renewals come every 7-8 s), the workers hold the renewed one
whenever they are asked after it: each sample reads the main process's serial, then the
workers', then the main process's again, and checks the workers only when the main process did
not renew in between, so nothing depends on how fast anything is.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.request import urlopen

import pytest

from agent.lab.handle import Lab
from agent.lab.netns import call_in
from tests.labtools import counting_server, mesh_lab, pod_servers, retry

pytestmark = [pytest.mark.root, pytest.mark.lab]

PORT = 8080
CLIENT = "spiffe://cluster.local/ns/default/sa/client"
NEIGHBOR = "spiffe://cluster.local/ns/default/sa/neighbor"
TTL = 16  # seconds: renewed after 45-50 % of it
RENEWALS = 2  # observed and checked
SAMPLES_FOR = 90.0  # seconds at most to observe them (a renewal every 7-8 s)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with mesh_lab("wc") as lab, pod_servers(lab, ["server-0"], counting_server(PORT), PORT):
        lab.kill("agent-node1", signal.SIGTERM)
        lab.start("agent-node1", "--workers", "2")
        yield lab


def admin(lab: Lab, path: str) -> Any:
    def get() -> Any:
        with urlopen(f"http://127.0.0.1:15000{path}", timeout=10) as response:
            return json.loads(response.read())

    return call_in(lab.netns("node1"), get)


def main_serials(lab: Lab) -> dict[str, str]:
    return {
        c["identity"]: c["certificate"]["serial"]
        for c in admin(lab, "/certs")["certificates"]
        if c["certificate"] is not None
    }


def worker_serials(lab: Lab) -> dict[int, dict[str, str]]:
    rows = admin(lab, "/workers")["workers"]
    assert sorted(w["worker"] for w in rows) == [0, 1] and all(w["up"] for w in rows), rows
    return {w["worker"]: {c["identity"]: c["serial"] for c in w["certificates"]} for w in rows}


def send(lab: Lab) -> bytes:
    ip = lab.pod("server-0")["ip"]

    def once() -> bytes:
        with socket.create_connection((ip, PORT), timeout=10) as s:
            s.sendall(b"x" * 100)
            s.shutdown(socket.SHUT_WR)
            return s.recv(100)

    return call_in(lab.netns("client"), retry, once)


def test_a_pod_leaving_the_node_takes_its_identity_out_of_every_worker(lab: Lab) -> None:
    def held_everywhere() -> dict[str, str]:
        main = main_serials(lab)
        assert {CLIENT, NEIGHBOR} <= set(main)
        assert worker_serials(lab) == {0: main, 1: main}  # pushed, without any connection
        return main

    retry(held_everywhere)
    assert send(lab) == b"100"
    lab.annotate("neighbor", "nodemesh.io/mesh-")
    try:

        def dropped() -> None:
            main = main_serials(lab)
            assert NEIGHBOR not in main and CLIENT in main
            for worker, held in worker_serials(lab).items():
                assert NEIGHBOR not in held, f"worker {worker} still holds {NEIGHBOR}"
                assert held[CLIENT] == main[CLIENT]

        retry(dropped)
        assert send(lab) == b"100"  # the identities still on the node keep working
    finally:
        lab.annotate("neighbor", "nodemesh.io/mesh=enabled")


def test_a_renewal_reaches_the_workers_when_the_main_process_makes_it(lab: Lab) -> None:
    lab.kill("ca", signal.SIGTERM)
    lab.start("ca", "--max-ttl", f"{TTL}s", "--min-ttl", "1s")
    lab.kill("agent-node1", signal.SIGTERM)
    lab.start("agent-node1", "--workers", "2")
    checked: set[str] = set()
    deadline = time.monotonic() + SAMPLES_FOR
    while len(checked) < RENEWALS + 1:
        assert time.monotonic() < deadline, f"saw {len(checked)} certificates of {CLIENT}"
        before = main_serials(lab).get(CLIENT)
        workers = worker_serials(lab)
        after = main_serials(lab).get(CLIENT)
        if before is None or before != after:
            continue  # renewed while the workers were asked: sample again
        assert {w: held.get(CLIENT) for w, held in workers.items()} == {0: before, 1: before}
        checked.add(before)
        time.sleep(0.2)
    assert send(lab) == b"100"  # new connections after the renewals are served
