"""A RateLimitPolicy holds per node when the node's agent runs ``--workers 2``.

node2's agent is restarted with ``--workers 2``. The outsider pod (node1, not meshed) sends
requests to server-0 (node2) on port 9080, which Service ``web`` declares HTTP, each on a new
connection: node2 captures every SYN to its inbound listener group, so the kernel picks a worker
per connection (``/workers``: both accept some), and each worker's HTTP layer asks the
RateLimitPolicy of ``web`` for a token. The workers share the node's buckets
(``agent.policy.sharedbuckets``), so the pod admits at most ``BURST + RPS * elapsed`` (+1 for a
token refilled while the last request was on its way) in total; with a bucket per worker it
would admit up to twice that.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.request import urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.lab.handle import Lab
from agent.lab.netns import call_in
from tests.integration.proxy.test_ratelimit_fault_lab import RATE_LIMITED, rate_limit_policy
from tests.integration.traffic.test_traffic_lab import report
from tests.integration.workers.test_workers_lab import HTTP_PORT, HTTP_SERVER
from tests.labtools import mesh_lab, pod_servers, retry

pytestmark = [pytest.mark.root, pytest.mark.lab]

RPS, BURST, REQUESTS = 5, 10, 60
LIMIT = rate_limit_policy(RPS, BURST)
WEB = "web.default.svc.cluster.local"
# In the outsider pod: one request per connection to argv[1]:argv[2]; prints the statuses and
# the seconds from the first connect to the last response.
CLIENT = """
import http.client, json, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
codes = []
started = time.monotonic()
for i in range(n):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", f"/r/{i}", headers={"Connection": "close"})
    response = conn.getresponse()
    response.read()
    codes.append(response.status)
    conn.close()
print(json.dumps({"codes": codes, "elapsed": time.monotonic() - started}))
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with mesh_lab("wr") as lab, pod_servers(lab, ["server-0"], HTTP_SERVER, HTTP_PORT):
        lab.kill("agent-node2", signal.SIGTERM)
        lab.start("agent-node2", "--workers", "2")
        yield lab


def node2(lab: Lab, path: str, port: int = 15000) -> bytes:
    def get() -> bytes:
        with urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            body: bytes = response.read()
            return body

    return call_in(lab.netns("node2"), get)


def accepted(lab: Lab) -> dict[int, int]:
    workers = json.loads(node2(lab, "/workers"))["workers"]
    return {w["worker"]: w.get("accepted", {}).get("INBOUND", 0) for w in workers}


def rate_limited(lab: Lab) -> float:
    text = node2(lab, "/metrics", port=15020).decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == RATE_LIMITED and s.labels.get("service") == WEB
    )


def requests(lab: Lab, n: int) -> dict[str, Any]:
    ip = str(lab.pod("server-0")["ip"])
    out = lab.exec(
        "outsider", sys.executable, "-c", CLIENT, ip, str(HTTP_PORT), str(n),
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def check(ok: bool) -> None:
    assert ok


def test_a_rate_limit_holds_per_node_across_the_workers(lab: Lab) -> None:
    retry(lambda: check(requests(lab, 1)["codes"] == [200]), 40)
    lab.apply(LIMIT)
    try:
        retry(lambda: check(b"web-limit" in node2(lab, "/policies")), 40)
        time.sleep(BURST / RPS + 0.5)  # the workers have the policy; no token spent yet
        accepted_before, limited_before = accepted(lab), rate_limited(lab)
        result = requests(lab, REQUESTS)
        gained = {w: n - accepted_before.get(w, 0) for w, n in accepted(lab).items()}
        codes, elapsed = Counter(result["codes"]), result["elapsed"]
        bound = BURST + RPS * elapsed + 1
        report(
            f"rate limit {RPS} rps burst {BURST}, 1 pod, node2 --workers 2",
            n=REQUESTS,
            elapsed_s=f"{elapsed:.2f}",
            accepted_per_worker=gained,
            ok=codes[200],
            limited=codes[429],
            admitted_at_most=f"{bound:.1f}",
        )
        assert sorted(gained) == [0, 1] and sum(gained.values()) == REQUESTS
        assert all(n > 0 for n in gained.values()), gained  # the kernel used both workers
        assert set(codes) <= {200, 429} and sum(codes.values()) == REQUESTS, codes
        assert BURST <= codes[200] <= bound  # one bucket for the pod, full at the start
        assert rate_limited(lab) - limited_before == codes[429]  # both workers' counts summed
    finally:
        lab.delete(LIMIT)
