"""RateLimitPolicy at the destination and an HTTPRoute's HTTPFault at the source, in a real lab.

Service ``web`` (VIP port 80, declared HTTP) selects server-0 and server-1 (node2). curl in the
client pod (node1) sends every request of a run on ONE keep-alive connection.

* Rate limit: 20 requests/s with a burst of 20 on ``web``. node2's agent keeps one bucket per
  pod, so over a run of ``elapsed`` seconds the two pods admit at most 2 x (20 + 20 x elapsed);
  every other request is answered 429 and ``nodemesh_rate_limited_requests_total`` on node2
  counts exactly the 429s the client saw.
* Faults: an HTTPRoute rule whose ExtensionRef names an HTTPFault (abort 20 % with 503, delay
  10 % by 100 ms). node1's agent aborts (flag FI) or delays (flag DI) per request; the counts
  are reported with their binomial bounds and asserted within 4 standard deviations.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.request import urlopen

import pytest

from agent.lab.handle import Lab
from agent.lab.netns import call_in
from tests.integration.proxy.test_http_source_lab import (
    PODS,
    PORT,
    SERVER,
    SOURCE,
    WEB,
    curl,
    metrics,
    vip,
)
from tests.integration.traffic.test_traffic_lab import report, within
from tests.labtools import mesh_lab, pod_servers, retry

pytestmark = [pytest.mark.root, pytest.mark.lab]

RATE_LIMITED = "nodemesh_rate_limited_requests_total"
RPS, BURST = 20, 20


def rate_limit_policy(rps: int, burst: int) -> dict[str, Any]:
    """RateLimitPolicy ``web-limit`` on Service ``web``."""
    return {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": "web-limit", "namespace": "default"},
        "spec": {
            "targetRef": {"kind": "Service", "name": "web"},
            "requestsPerSecond": rps,
            "burst": burst,
        },
    }


LIMIT = rate_limit_policy(RPS, BURST)
FAULT = {
    "apiVersion": "nodemesh.io/v1alpha1",
    "kind": "HTTPFault",
    "metadata": {"name": "web-chaos", "namespace": "default"},
    "spec": {
        "abort": {"httpStatus": 503, "percentage": 20},
        "delay": {"fixedDelay": "100ms", "percentage": 10},
    },
}
ROUTE = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "HTTPRoute",
    "metadata": {"name": "web-chaos", "namespace": "default"},
    "spec": {
        "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
        "rules": [
            {
                "backendRefs": [{"name": "web", "port": 80}],
                "filters": [
                    {
                        "type": "ExtensionRef",
                        "extensionRef": {
                            "group": "nodemesh.io",
                            "kind": "HTTPFault",
                            "name": "web-chaos",
                        },
                    }
                ],
            }
        ],
    },
}


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (scripts/debian-packages.txt)")
    with mesh_lab("rl") as lab, pod_servers(lab, PODS, SERVER, PORT):
        yield lab


def policies(lab: Lab, node: str) -> list[str]:
    def get() -> list[str]:
        with urlopen("http://127.0.0.1:15000/policies", timeout=10) as response:
            return [p["name"] for p in json.loads(response.read())["policies"]]

    return call_in(lab.netns(node), get)


def rate_limited(lab: Lab) -> float:
    return sum(
        v
        for (name, labels), v in metrics(lab, "node2").items()
        if name == RATE_LIMITED and ("service", WEB) in labels
    )


def flagged(lab: Lab, flag: str) -> float:
    want = {*SOURCE.items(), ("response_flags", flag)}
    return sum(
        v
        for (name, labels), v in metrics(lab, "node1").items()
        if name == "istio_requests_total" and want <= labels
    )


def check(ok: bool) -> None:
    assert ok


def test_requests_over_the_rate_limit_are_answered_429_and_counted(lab: Lab) -> None:
    retry(lambda: check(curl(lab, [f"http://{vip(lab)}/warm"])[0][1] == "200"), 40)
    lab.apply(LIMIT)
    try:
        retry(lambda: check("web-limit" in policies(lab, "node2")), 40)
        time.sleep(BURST / RPS)  # every bucket full again after the policy check's requests
        before = rate_limited(lab)
        n = 300
        started = time.monotonic()
        # 8 keep-alive connections at once: a loaded lab serves one connection's requests
        # more slowly than the pods' buckets refill.
        urls = [f"http://{vip(lab)}/r/{i}" for i in range(n)]
        result = curl(lab, urls, "client", "-Z", "--parallel-max", "8")
        elapsed = time.monotonic() - started
        codes = Counter(code for _, code, _ in result)
        assert sum(codes.values()) == n and set(codes) <= {"200", "429"}, codes
        # A 429 never closes the connection: only the first request of each opens one.
        assert sum(int(r[2]) for r in result) <= 8
        bound = len(PODS) * (BURST + RPS * elapsed)  # the most two pods' buckets can admit
        counted = rate_limited(lab) - before  # counted before the 429 was sent
        report(
            "rate limit 20 rps burst 20 (2 pods)",
            n=n,
            elapsed_s=f"{elapsed:.2f}",
            ok=codes["200"],
            limited=codes["429"],
            admitted_at_most=f"{bound:.0f}",
            metric=counted,
        )
        assert codes["200"] <= bound and codes["429"] >= n - bound
        assert counted == codes["429"]
    finally:
        lab.delete(LIMIT)


def test_route_fault_aborts_and_delays_within_binomial_bounds(lab: Lab) -> None:
    lab.apply([FAULT, ROUTE])
    try:
        # In force once a request is answered by the fault (503 with its body).
        retry(
            lambda: check(
                any(
                    body.startswith("fault filter abort")
                    for body, _, _ in curl(lab, [f"http://{vip(lab)}/probe"] * 20)
                )
            ),
            40,
        )
        aborted_before, delayed_before = flagged(lab, "FI"), flagged(lab, "DI")
        n = 400
        result = curl(lab, [f"http://{vip(lab)}/f/{i}" for i in range(n)])
        aborts = sum(1 for body, code, _ in result if code == "503" and "fault" in body)
        assert Counter(code for _, code, _ in result) == {"200": n - aborts, "503": aborts}
        # Reported once each response is out: wait for the aborts to be complete.
        retry(lambda: check(flagged(lab, "FI") - aborted_before == aborts), 20)
        delayed = flagged(lab, "DI") - delayed_before
        rest = n - aborts
        report(
            "route fault abort 20 % / delay 10 % of the rest",
            n=n,
            aborts=aborts,
            abort_bounds=f"{n * 0.2:.0f} ± {4 * (n * 0.2 * 0.8) ** 0.5:.1f}",
            delayed=delayed,
            delay_bounds=f"{rest * 0.1:.1f} ± {4 * (rest * 0.1 * 0.9) ** 0.5:.1f}",
        )
        assert within(aborts, n, 0.2)
        assert within(int(delayed), rest, 0.1)
    finally:
        lab.delete([ROUTE, FAULT])


def test_an_injected_delay_does_not_count_toward_the_request_timeout(lab: Lab) -> None:
    """A 300 ms fault delay on every request and ``timeouts.request: 200ms``: the timeout starts
    after the delay (Envoy's route timeout starts after its fault filter), so each request is
    answered 200 with flag DI instead of 504 UT."""
    delay = {**FAULT, "spec": {"delay": {"fixedDelay": "300ms", "percentage": 100}}}
    (rule,) = ROUTE["spec"]["rules"]
    rules = [{**rule, "timeouts": {"request": "200ms"}}]
    timed = {**ROUTE, "spec": {**ROUTE["spec"], "rules": rules}}
    lab.apply([delay, timed])
    try:
        delayed_before = flagged(lab, "DI")

        def in_force() -> None:  # the delay is applied
            curl(lab, [f"http://{vip(lab)}/probe"])
            assert flagged(lab, "DI") > delayed_before

        retry(in_force, 40)
        delayed_before = flagged(lab, "DI")
        n = 5
        started = time.monotonic()
        result = curl(lab, [f"http://{vip(lab)}/d/{i}" for i in range(n)])
        took = time.monotonic() - started
        assert [code for _, code, _ in result] == ["200"] * n, result
        report("HTTP/1.1 delay 300ms + timeouts.request 200ms", n=n, seconds=f"{took:.2f}")
        retry(lambda: check(flagged(lab, "DI") - delayed_before == n), 20)
    finally:
        lab.delete([timed, delay])
