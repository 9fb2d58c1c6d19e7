"""Traffic control end to end in a lab: eBPF capture, the agents' proxies, HBONE, real pods.

Topology: node1 runs the meshed clients ``client`` and ``chaos``; node2 runs ``web-0``
(``version: v1``) and ``web-1`` (``version: v2``) behind Service ``web`` (VIP port 80 -> 8080).
Each web pod runs a tiny server that answers every connection with its pod name (after an
optional delay: the "slow replica") and holds it until the client closes. Clients connect to the
VIP from their pod's namespace; the outcome of each connection is the name that answered or ''
(reset, closed without an answer, timeout). The measured numbers are printed (``pytest -s``).
One lab serves the module; each test starts the servers it needs and removes its policy.
"""

from __future__ import annotations

import json
import secrets
import socket
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from agent.lab.handle import Lab
from agent.lab.netns import call_in
from agent.sources.document import DocumentError

pytestmark = [pytest.mark.root, pytest.mark.lab]

TOPOLOGY = """\
nodes:
  - name: node1
    pods:
      - {name: client, namespace: default, serviceAccount: client,
         labels: {app: client}, annotations: {nodemesh.io/mesh: enabled}}
      - {name: chaos, namespace: default, serviceAccount: chaos,
         labels: {app: chaos}, annotations: {nodemesh.io/mesh: enabled}}
  - name: node2
    pods:
      - {name: web-0, namespace: default, serviceAccount: web,
         labels: {app: web, version: v1}, annotations: {nodemesh.io/mesh: enabled}}
      - {name: web-1, namespace: default, serviceAccount: web,
         labels: {app: web, version: v2}, annotations: {nodemesh.io/mesh: enabled}}
services:
  - {name: web, namespace: default, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
"""

# argv: pod name, seconds to wait before answering.
WEB = """
import socket, sys, threading, time
name, delay = sys.argv[1].encode(), float(sys.argv[2])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 8080))
srv.listen(256)
def serve(conn):
    try:
        time.sleep(delay)
        conn.sendall(name)
        while conn.recv(4096):
            pass
    except OSError:
        pass
    conn.close()
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def wait(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    import os

    if os.geteuid() != 0:
        pytest.skip("a lab needs root")
    lab = Lab.up("tc" + secrets.token_hex(3), topology=TOPOLOGY, timeout=90)
    try:
        if lab.status()["ca"]["state"] != "running":
            pytest.skip("this build's lab runs no CA, so no proxy")
        yield lab
    finally:
        lab.down()


@contextmanager
def web(lab: Lab, delays: dict[str, float]) -> Iterator[None]:
    """Run the web server in the pods named in ``delays`` (others stay down: refused)."""
    procs = [lab.popen(pod, sys.executable, "-c", WEB, pod, str(d)) for pod, d in delays.items()]
    try:
        for pod in delays:
            ip = lab.pod(pod)["ip"]
            wait(lambda ip=ip: _listening(lab, ip), f"{pod} to listen")  # type: ignore[misc]
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _listening(lab: Lab, ip: str) -> bool:
    def probe() -> bool:
        try:
            socket.create_connection((ip, 8080), timeout=1).close()
        except OSError:
            return False
        return True

    return call_in(lab.netns("node2"), probe)  # from the node: not captured, no mesh involved


def vip(lab: Lab) -> str:
    return str(next(s for s in lab.status()["services"] if s["name"] == "web")["clusterIP"])


def connections(
    lab: Lab, n: int, *, pod: str = "client", hold: int = 0, times: list[float] | None = None
) -> list[str]:
    """``n`` sequential connections to the VIP from ``pod`` while ``hold`` others stay open;
    ``times`` receives each one's seconds from connect to answer (or failure)."""
    address = (vip(lab), 80)

    def one() -> str:
        start = time.monotonic()
        try:
            with socket.create_connection(address, timeout=30) as s:
                return s.recv(64).decode()
        except OSError:
            return ""
        finally:
            if times is not None:
                times.append(time.monotonic() - start)

    def run() -> list[str]:
        held = [socket.create_connection(address, timeout=30) for _ in range(hold)]
        try:
            for s in held:
                assert s.recv(64), "a held connection got no answer"
            return [one() for _ in range(n)]
        finally:
            for s in held:
                s.close()

    return call_in(lab.netns(pod), run)


def admin(lab: Lab, path: str, port: int = 15000) -> Any:
    def get() -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return bytes(r.read())

    body = call_in(lab.netns("node1"), get)
    return json.loads(body) if port == 15000 else body.decode()


def manifest(spec: dict[str, Any], name: str = "web") -> dict[str, Any]:
    return {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"targetRef": {"kind": "Service", "name": "web"}, **spec},
    }


def effective(lab: Lab) -> dict[str, Any]:
    return dict(admin(lab, "/traffic")["effective"].get("default/web") or {})


@contextmanager
def policy(
    lab: Lab, spec: dict[str, Any], check: Callable[[dict[str, Any]], bool]
) -> Iterator[None]:
    """Apply ``spec`` and wait until node1's agent has it in force (``check`` on /traffic)."""
    lab.apply(manifest(spec))
    try:
        wait(lambda: check(effective(lab)), "the agent to apply the TrafficPolicy")
        yield
    finally:
        lab.delete(manifest(spec))
        wait(lambda: not effective(lab), "the agent to drop the TrafficPolicy")


def service_state(lab: Lab) -> dict[str, Any]:
    """node1's traffic state of the web Service; none (no counters) until a connection to it
    made one, so that a test run alone reads its ``before`` as zeros."""
    return dict(admin(lab, "/traffic")["services"].get("default/web") or {"counters": {}})


def within(observed: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(observed - n * p) <= sigmas * (n * p * (1 - p)) ** 0.5


def report(what: str, **numbers: object) -> None:
    print(f"\nMEASURED {what}: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))


def test_slow_replica_gets_a_small_share_under_peak_ewma_and_half_under_round_robin(
    lab: Lab,
) -> None:
    # 200 ms: far above the scheduling hiccups of a loaded 2-core machine, which are samples too.
    n, n_rr = 200, 100
    with web(lab, {"web-0": 0.0, "web-1": 0.2}):
        with policy(lab, {"loadBalancer": {"type": "PEAK_EWMA"}}, lambda e: bool(e)):
            ewma = Counter(connections(lab, n))
        with policy(
            lab,
            {"loadBalancer": {"type": "ROUND_ROBIN"}},
            lambda e: e.get("balancer") == "ROUND_ROBIN",
        ):
            rr = Counter(connections(lab, n_rr))
    report("slow replica share", peak_ewma=ewma["web-1"] / n, round_robin=rr["web-1"] / n_rr)
    assert ewma["web-0"] + ewma["web-1"] == n and rr["web-0"] + rr["web-1"] == n_rr
    assert ewma["web-1"] < 0.2 * n
    assert 0.4 * n_rr <= rr["web-1"] <= 0.6 * n_rr


def test_over_limit_connections_are_rejected_with_the_counted_reason(lab: Lab) -> None:
    spec = {"connectionPool": {"maxConnections": 3}}
    with (
        web(lab, {"web-0": 0.0, "web-1": 0.0}),
        policy(lab, spec, lambda e: e.get("max_connections") == 3),
    ):
        over = connections(lab, 2, hold=3)
        metrics = admin(lab, "/metrics", port=15020)
        wait(lambda: service_state(lab)["active"] == 0, "the held connections to end")
        # One held + one closing (its close reaches the proxy a moment later) + one new.
        under = connections(lab, 2, hold=1)
    report("limits", over_limit=over, under_limit=under)
    assert over == ["", ""] and "" not in under
    assert 'nodemesh_rejected_connections_total{reason="max_connections"} 2.0' in metrics
    assert (
        'nodemesh_service_rejections_total{reason="max_connections",service="default/web"} 2.0'
        in metrics
    )


def test_injected_delay_and_abort_rates_match_the_configuration(lab: Lab) -> None:
    n = 300
    spec = {
        "faultInjection": {
            "delay": {"percent": 30, "fixedDelay": "100ms"},
            "abort": {"percent": 20},
        }
    }
    with web(lab, {"web-0": 0.0, "web-1": 0.0}), policy(lab, spec, lambda e: bool(e.get("fault"))):
        before = service_state(lab)["counters"]
        times: list[float] = []
        answers = connections(lab, n, times=times)
        counters = service_state(lab)["counters"]
    delays = counters.get("fault_delay", 0) - before.get("fault_delay", 0)
    aborts = counters.get("fault_abort_reset", 0) - before.get("fault_abort_reset", 0)
    failed = answers.count("")
    slow = sorted(t for t in times if t >= 0.1)
    report(
        "faults",
        n=n,
        delayed=delays,
        aborted=aborts,
        failed_seen=failed,
        seen_over_100ms=len(slow),
        their_median_ms=round(slow[len(slow) // 2] * 1000, 1) if slow else None,
        others_median_ms=round(sorted(t for t in times if t < 0.1)[(n - len(slow)) // 2] * 1000, 1),
    )
    assert failed == aborts
    assert within(aborts, n, 0.20) and within(delays, n, 0.30)


def test_fault_limited_to_a_source_selector(lab: Lab) -> None:
    spec = {
        "faultInjection": {
            "abort": {"percent": 100, "mode": "REFUSE"},
            "sourceSelector": {"matchLabels": {"app": "chaos"}},
        }
    }
    with web(lab, {"web-0": 0.0}), policy(lab, spec, lambda e: bool(e.get("fault"))):
        chaos = connections(lab, 10, pod="chaos")
        client = connections(lab, 10)
    assert chaos == [""] * 10 and client == ["web-0"] * 10


def test_split_holds_changes_live_and_a_bad_edit_keeps_it(lab: Lab) -> None:
    def split(v1: int, v2: int, labels2: dict[str, str] | None = None) -> dict[str, Any]:
        subsets = [
            {"name": "v1", "labels": {"version": "v1"}, "weight": v1},
            {"name": "v2", "labels": labels2 or {"version": "v2"}, "weight": v2},
        ]
        # No ejection here: on a loaded machine a replica that misses a few connects would be
        # ejected and its share rightly go to the other subset, which is not what this measures.
        return {"split": {"subsets": subsets}, "outlierDetection": {"maxEjectionPercent": 0}}

    def weights(e: dict[str, Any]) -> list[int]:
        return [s["weight"] for s in e.get("subsets", [])]

    with (
        web(lab, {"web-0": 0.0, "web-1": 0.0}),
        policy(lab, split(90, 10), lambda e: weights(e) == [90, 10]),
    ):
        first = Counter(connections(lab, 500))
        lab.apply(manifest(split(50, 50)))
        wait(lambda: weights(effective(lab)) == [50, 50], "the live change")
        second = Counter(connections(lab, 300))
        with pytest.raises(DocumentError, match="weights must sum to 100"):
            lab.apply(manifest(split(50, 40)))
        lab.apply(manifest(split(50, 50, {"app": "other"})))
        wait(
            lambda: admin(lab, "/traffic")["policies"]["default/web"]["reason"] == "Invalid",
            "the agent to refuse the subset",
        )
        condition = admin(lab, "/traffic")["policies"]["default/web"]
        assert weights(effective(lab)) == [50, 50]
        third = Counter(connections(lab, 100))
    report("split", v2_at_10=first["web-1"] / 500, v2_at_50=second["web-1"] / 300)
    assert within(first["web-1"], 500, 0.10) and first["web-0"] + first["web-1"] == 500
    assert within(second["web-1"], 300, 0.50) and second["web-0"] + second["web-1"] == 300
    assert (
        "unknown to Service web" in condition["message"]
        and "stays in force" in condition["message"]
    )
    assert third["web-0"] + third["web-1"] == 100 and third["web-1"] > 0


def test_refusing_replica_is_ejected_and_clients_see_no_failed_connect(lab: Lab) -> None:
    spec = {
        "loadBalancer": {"type": "ROUND_ROBIN"},
        "outlierDetection": {"consecutiveFailures": 3, "baseEjectionTime": "2s"},
    }
    web_1 = lab.pod("web-1")["ip"]

    def health() -> dict[str, str]:
        return {e["ip"]: e["state"] for e in service_state(lab)["endpoints"]}

    with policy(lab, spec, lambda e: e.get("balancer") == "ROUND_ROBIN"):
        with web(lab, {"web-0": 0.0}):
            before = service_state(lab)
            answers = Counter(connections(lab, 100))
            state = service_state(lab)
            # With a 2 s penalty a slow run may be between ejections: still out, on probation.
            out = health()[web_1]
        with web(lab, {"web-0": 0.0, "web-1": 0.0}):  # back up: the probe lets it return
            wait(lambda: bool(connections(lab, 2)) and health()[web_1] == "HEALTHY", "return")
    counters, was = state["counters"], before["counters"]
    refused = counters.get("failed_refused", 0) - was.get("failed_refused", 0)
    retries = counters.get("retries", 0) - was.get("retries", 0)
    ejections = state["ejections"]["ejected"] - before["ejections"]["ejected"]
    report(
        "refusing replica",
        answers=dict(answers),
        refused_attempts=refused,
        retries=retries,
        ejections=ejections,
    )
    assert answers == {"web-0": 100}
    assert out in ("EJECTED", "PROBE") and ejections >= 1
    assert refused == retries >= 3
