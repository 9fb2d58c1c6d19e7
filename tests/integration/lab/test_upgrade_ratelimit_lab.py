"""A client held at its RateLimitPolicy stays held across ``nodemesh lab upgrade``.

The outsider pod (node1, not meshed) sends requests to server-0 (node2) on port 9080, which
Service ``web`` declares HTTP, one per connection, until node2's bucket for the pod is empty;
then node2's agent is upgraded (a successor takes the node over, ``agent.handover``) and the
outsider sends again at once. The successor continues its predecessor's buckets
(``sharedbuckets.share``), so what it admits is only what the rate refilled since the bucket
emptied (``RPS * elapsed`` + 1 for a token refilled while the last request was on its way); a
successor whose buckets start full admits the whole second batch. With ``--workers 1`` (both
agents take from the table handed over until the old one has exited, then the new one from
in-process buckets at the table's levels) and ``--workers 2`` (the workers' table itself).
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from agent.lab import components
from agent.lab.handle import Lab
from tests.integration.proxy.test_ratelimit_fault_lab import rate_limit_policy
from tests.integration.traffic.test_traffic_lab import report
from tests.integration.workers.test_workers_lab import HTTP_PORT, HTTP_SERVER
from tests.integration.workers.test_workers_ratelimit_lab import check, node2, requests
from tests.labtools import mesh_lab, pod_servers, retry

pytestmark = [pytest.mark.root, pytest.mark.lab]

RPS, AFTER = 1, 20  # 20 requests right after the upgrade: a full bucket would admit them all


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with mesh_lab("ru") as lab, pod_servers(lab, ["server-0"], HTTP_SERVER, HTTP_PORT):
        yield lab


@pytest.mark.parametrize("workers", [1, 2])
def test_a_client_at_its_limit_is_still_limited_right_after_an_upgrade(
    lab: Lab, workers: int
) -> None:
    if workers > 1:
        lab.kill("agent-node2", signal.SIGTERM)
        lab.start("agent-node2", "--workers", str(workers))  # the upgrade keeps this flag
    retry(lambda: check(requests(lab, 1)["codes"] == [200]), 40)
    upgrade = None
    burst = 30 + workers  # another burst, another key: no bucket of the previous run applies
    limit = rate_limit_policy(RPS, burst)
    lab.apply(limit)
    try:
        retry(lambda: check(f'"burst": {burst}'.encode() in node2(lab, "/policies")), 40)
        before = Counter(requests(lab, burst + 10)["codes"])
        assert before[429] > 0, before  # the bucket is empty now
        emptied = time.monotonic()
        upgrade = lab.upgrade("node2")
        after = requests(lab, AFTER)
        elapsed = time.monotonic() - emptied
        codes = Counter(after["codes"])
        bound = RPS * elapsed + 1
        report(
            f"rate limit {RPS} rps burst {burst} across an upgrade, node2 --workers {workers}",
            before=dict(before),
            after=dict(codes),
            seconds_since_empty=f"{elapsed:.2f}",
            admitted_at_most=f"{bound:.1f}",
            old_pid=upgrade.old_pid,
            new_pid=upgrade.new_pid,
        )
        assert set(codes) <= {200, 429} and sum(codes.values()) == AFTER, codes
        assert bound < AFTER, f"the upgrade took {elapsed:.1f}s: the test cannot tell"
        assert codes[200] <= bound, codes  # no fresh burst from the successor
        # Once the old agent has exited, the new one goes on from the same levels (with
        # --workers 1 on in-process buckets again, which its log says).
        sent = time.monotonic()
        components.wait_exit(upgrade.old_pid)
        again = Counter(requests(lab, AFTER)["codes"])
        bound = RPS * (time.monotonic() - sent) + 1
        report("after the old agent exited", after=dict(again), admitted_at_most=f"{bound:.1f}")
        assert bound < AFTER and again[200] <= bound, again
        log = (lab.state_dir / "logs" / "agent-node2.log").read_text()
        left = f"agent {upgrade.old_pid} exited: rate-limit buckets in this process again"
        assert (left in log) == (workers == 1), left
    finally:
        lab.delete(limit)
        if upgrade is not None:  # the next restart must not meet its draining listeners
            components.wait_exit(upgrade.old_pid)
