"""Gateway API HTTPRoute on the source node, in a real lab, with curl keep-alive connections.

Service ``web`` (VIP port 80, declared HTTP) selects server-0 and server-1 (node2); the test
adds Services ``web-v1`` and ``web-v2`` (one pod each, by the pods' ``version`` label) with
``nodemesh lab apply``, and HTTPRoutes attached to ``web``. node1's agent terminates each curl
connection and routes every request: a canary by header, a weighted split changed live, a
retry that hides a replica answering 503, a request timeout, and a 404 when no rule matches.
Shares are reported with their binomial bounds; the assertions allow 4 standard deviations.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from agent.lab.handle import Lab
from tests.integration.proxy.test_http_source_lab import (
    PORT,
    SOURCE,
    WEB,
    curl,
    metrics,
    total,
    vip,
)
from tests.integration.traffic.test_traffic_lab import policy, report, within
from tests.labtools import mesh_lab, pod_servers, retry

pytestmark = [pytest.mark.root, pytest.mark.lab]

# server-1 answers 503 on /flaky; /slow sleeps 1 s, and so does a mirrored copy (its Host ends
# in -shadow); otherwise the body is the pod's address, then the request body if any.
SERVER = """
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
FLAKY = {flaky!r}
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers, body: two writes; no delayed-ACK stall
    def do_GET(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        me = self.connection.getsockname()[0]
        if self.path.startswith("/slow") or self.headers["Host"].endswith("-shadow"):
            time.sleep(1.0)
        status = 503 if self.path.startswith("/flaky") and me == FLAKY else 200
        out = me.encode() + (b" " + body if body else b"")
        self.send_response(status)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_POST = do_GET
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("0.0.0.0", {port}), Handler).serve_forever()
"""
HTTP_PORT = {"port": 80, "targetPort": PORT, "name": "http", "appProtocol": "http"}
RETRIES = "nodemesh_http_retries_total"
MIRRORED = "nodemesh_http_mirrored_total"


def service(name: str, version: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": {"app": "server", "version": version}, "ports": [HTTP_PORT]},
    }


def route(*rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "web-routes", "namespace": "default"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
            "rules": list(rules),
        },
    }


def canary(v1: int, v2: int) -> dict[str, Any]:
    return route(
        {
            "matches": [{"headers": [{"name": "x-canary", "value": "true"}]}],
            "backendRefs": [{"name": "web-v2", "port": 80}],
        },
        {
            "backendRefs": [
                {"name": "web-v1", "port": 80, "weight": v1},
                {"name": "web-v2", "port": 80, "weight": v2},
            ]
        },
    )


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (scripts/debian-packages.txt)")
    with mesh_lab("hr") as lab, ExitStack() as stack:
        program = SERVER.format(flaky=lab.pod("server-1")["ip"], port=PORT)
        stack.enter_context(pod_servers(lab, ("server-0", "server-1"), program, PORT))
        lab.apply([service("web-v1", "v1"), service("web-v2", "v2")])
        yield lab


def served(lab: Lab, n: int, *extra: str, path: str = "/r") -> Counter[str]:
    """``n`` requests on one curl connection: how many each pod answered (all must be 200)."""
    result = curl(lab, [f"http://{vip(lab)}{path}/{i}" for i in range(n)], "client", *extra)
    assert [code for _, code, _ in result] == ["200"] * n, Counter(c for _, c, _ in result)
    assert [r[2] for r in result] == ["1"] + ["0"] * (n - 1)  # ONE client connection
    names = {lab.pod(p)["ip"]: p for p in ("server-0", "server-1")}
    return Counter(names[body] for body, _, _ in result)


def routes(lab: Lab) -> list[dict[str, Any]]:
    """``nodemesh routes -o json`` against node1's admin API."""
    out = lab.exec(
        "node1", sys.executable, "-m", "agent", "routes", "-o", "json",
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout)["routes"])


def check(ok: bool) -> None:
    assert ok


def bounds(n: int, p: float) -> str:
    sd = (n * p * (1 - p)) ** 0.5
    return f"{n * p:.0f} ± {4 * sd:.1f} (4 sd)"


def test_canary_by_header_and_a_weighted_split_that_moves_live(lab: Lab) -> None:
    lab.apply(canary(90, 10))
    retry(lambda: check(served(lab, 10, "-H", "x-canary: true") == {"server-1": 10}), 40)
    assert served(lab, 50, "-H", "x-canary: true") == {"server-1": 50}
    n = 200
    split = served(lab, n)
    report("90/10 split", n=n, v2=split["server-1"], expected=bounds(n, 0.1))
    assert within(split["server-1"], n, 0.1)
    # ``nodemesh routes`` on node1: the split rule's backends got exactly what the pods saw.
    (shown,) = routes(lab)
    assert [p["accepted"]["reason"] for p in shown["parents"]] == ["Accepted"]
    header_rule, split_rule = shown["rules"]
    got = {b["service"]: b["requests"] for b in split_rule["backends"]}
    assert got == {"default/web-v1": split["server-0"], "default/web-v2": split["server-1"]}
    assert header_rule["backends"][0]["requests"] >= 60
    # Change the weights while one connection keeps sending: no request fails. The change is
    # applied once node1 has served 150 of them, so the first 100 surely ran at 90/10.
    results: list[list[tuple[str, str, str]]] = []
    m = 800
    urls = [f"http://{vip(lab)}/live/{i}" for i in range(m)]
    sender = threading.Thread(target=lambda: results.append(curl(lab, urls)))
    started = total(metrics(lab, "node1"), **SOURCE)
    sender.start()
    retry(lambda: check(total(metrics(lab, "node1"), **SOURCE) >= started + 150), timeout=60)
    lab.apply(canary(50, 50))
    sender.join(timeout=120)
    assert results, "the curl during the weight change did not finish"
    live = results[0]
    assert Counter(code for _, code, _ in live) == {"200": m}
    v2 = lab.pod("server-1")["ip"]
    first = sum(body == v2 for body, _, _ in live[:100])
    last = sum(body == v2 for body, _, _ in live[-100:])
    report(
        f"live change 90/10 -> 50/50 on one connection ({m} requests, none failed)",
        v2_in_first_100=f"{first} ({bounds(100, 0.1)})",
        v2_in_last_100=f"{last} ({bounds(100, 0.5)})",
    )
    assert within(first, 100, 0.1) and within(last, 100, 0.5)
    retry(lambda: check(served(lab, 40)["server-1"] >= 8), timeout=40)  # node1 has 50/50
    split = served(lab, n)
    report("50/50 split", n=n, v2=split["server-1"], expected=bounds(n, 0.5))
    assert within(split["server-1"], n, 0.5)


def counted(parsed: dict[Any, float], metric: str, service: str, outcome: str) -> float:
    want = {("service", service), ("outcome", outcome)}
    return sum(v for (name, ls), v in parsed.items() if name == metric and want <= ls)


def test_a_retry_on_503_hides_the_failing_replica_and_is_counted(lab: Lab) -> None:
    flaky = {
        "matches": [{"path": {"type": "PathPrefix", "value": "/flaky"}}],
        "retry": {"attempts": 2, "codes": [503], "backoff": "10ms"},
    }
    lab.apply(route(flaky, {}))
    retry(lambda: served(lab, 4, path="/flaky"), timeout=40)
    # Round robin and no ejection, so that server-1 surely keeps getting first tries (outlier
    # detection would otherwise eject it after 5 consecutive 503s; that is its own feature).
    spec = {"loadBalancer": {"type": "ROUND_ROBIN"}, "outlierDetection": {"maxEjectionPercent": 0}}
    unavailable = {"reporter": "destination", "response_code": "503", "destination_service": WEB}

    def refused() -> float:
        """node2's 503s; it reports an exchange once it ended there, which may be a moment
        after node1 dropped the session carrying it."""
        return total(metrics(lab, "node2"), **unavailable)

    with policy(lab, spec, lambda e: e.get("balancer") == "ROUND_ROBIN"):
        before, far_before = metrics(lab, "node1"), stable(refused)
        n = 40
        split = served(lab, n, path="/flaky")  # every one answered 200
        after, far_after = metrics(lab, "node1"), stable(refused)
    attempted = counted(after, RETRIES, "default/web", "attempted") - counted(
        before, RETRIES, "default/web", "attempted"
    )
    report(
        "retry on 503",
        requests=n,
        answered_by=dict(split),
        retries=attempted,
        far_503=far_after - far_before,
    )
    assert split == {"server-0": n}  # no 503 reached the client
    # Every 503 node2 answered was retried, and node2 reported each one, also when node1
    # reset the stream right after the response head (flag DC at node2).
    assert far_after - far_before == attempted
    ok = {**SOURCE, "response_code": "200", "destination_service": WEB}
    assert total(after, **ok) - total(before, **ok) == n
    # A POST is retried too when its body was read whole (held for the replay): server-0
    # gets the same body.
    with policy(lab, spec, lambda e: e.get("balancer") == "ROUND_ROBIN"):
        urls = [f"http://{vip(lab)}/flaky/post/{i}" for i in range(10)]
        posted = curl(lab, urls, "client", "--data-binary", "payload-123")
    server0 = lab.pod("server-0")["ip"]
    assert [(body, code) for body, code, _ in posted] == [(f"{server0} payload-123", "200")] * 10


def stable(count: Callable[[], float]) -> float:
    """``count()`` once it stayed the same for a second (reports still landing settle)."""

    def settled() -> float:
        first = count()
        time.sleep(1.0)
        assert count() == first
        return first

    return retry(settled, timeout=30)


def test_a_request_timeout_answers_504_ut(lab: Lab) -> None:
    lab.apply(
        route(
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/slow"}}],
                "timeouts": {"request": "200ms"},
            },
            {},
        )
    )

    def timed_out() -> tuple[str, str]:
        out = lab.exec(
            "client",
            "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}",
            f"http://{vip(lab)}/slow/1",
            capture_output=True, text=True,
        )  # fmt: skip
        code, seconds = out.stdout.split()
        assert code == "504", out.stdout
        return code, seconds

    before = metrics(lab, "node1")
    _, seconds = retry(timed_out, timeout=40)
    after = metrics(lab, "node1")
    report("timeouts.request 200ms against a 1 s handler", status=504, curl_seconds=seconds)
    flagged = {**SOURCE, "response_code": "504", "response_flags": "UT"}
    assert total(after, **flagged) - total(before, **flagged) >= 1
    assert served(lab, 3) != {}  # the other paths still answer
    # A per-try timeout (backendRequest) with a retry: each try is cut at 200 ms and tried
    # once more on the other replica (as slow), then 504.
    lab.apply(
        route(
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/slow"}}],
                "timeouts": {"request": "3s", "backendRequest": "200ms"},
                "retry": {"attempts": 1, "codes": [503], "backoff": "10ms"},
            },
            {},
        )
    )
    before = metrics(lab, "node1")

    def retried_then_timed_out() -> tuple[str, dict[str, float]]:
        # Until the new rule is in force the old one answers 504 too, without a retry: wait
        # for a 504 that came with a retry counted.
        _, seconds = timed_out()
        after = metrics(lab, "node1")
        tried = counted(after, RETRIES, "default/web", "attempted") - counted(
            before, RETRIES, "default/web", "attempted"
        )
        assert tried >= 1
        return seconds, after

    seconds, after = retry(retried_then_timed_out, timeout=40)
    tried = counted(after, RETRIES, "default/web", "attempted") - counted(
        before, RETRIES, "default/web", "attempted"
    )
    report("backendRequest 200ms + 1 retry against 1 s handlers", status=504, retries=tried,
           curl_seconds=seconds)  # fmt: skip
    assert total(after, **flagged) - total(before, **flagged) >= 1


def test_a_route_whose_matches_do_not_match_answers_404_nr(lab: Lab) -> None:
    lab.apply(route({"matches": [{"path": {"type": "Exact", "value": "/only"}}]}))

    def answered() -> list[tuple[str, str, str]]:
        result = curl(lab, [f"http://{vip(lab)}/other", f"http://{vip(lab)}/only"])
        assert [code for _, code, _ in result] == ["404", "200"]
        return result

    before = metrics(lab, "node1")
    retry(answered, timeout=40)
    after = metrics(lab, "node1")
    flagged = {**SOURCE, "response_code": "404", "response_flags": "NR"}
    assert total(after, **flagged) - total(before, **flagged) >= 1


def test_a_mirror_gets_a_copy_of_each_request_and_never_slows_the_primary(lab: Lab) -> None:
    lab.apply(
        route(
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/copy"}}],
                "backendRefs": [{"name": "web-v1", "port": 80}],
                "filters": [
                    {
                        "type": "RequestMirror",
                        "requestMirror": {"backendRef": {"name": "web-v2", "port": 80}},
                    }
                ],
            },
            {},
        )
    )
    retry(lambda: check(served(lab, 4, path="/copy") == {"server-0": 4}), timeout=40)
    v2 = {"reporter": "destination", "destination_service": "web-v2.default.svc.cluster.local"}

    def copies() -> float:
        return total(metrics(lab, "node2"), **v2)

    def sent() -> float:
        return counted(metrics(lab, "node1"), MIRRORED, "default/web-v2", "sent")

    far_before, sent_before = stable(copies), stable(sent)  # no warm-up copy in flight
    n = 20
    started = time.monotonic()
    served(lab, n, path="/plain")  # the same requests without a copy, for comparison
    plain = time.monotonic() - started
    started = time.monotonic()
    assert served(lab, n, path="/copy") == {"server-0": n}  # the primary: all from v1
    elapsed = time.monotonic() - started
    # Each copy takes 1 s at server-1; the primary does not wait for them.
    retry(lambda: check(copies() - far_before == n), timeout=30)
    retry(lambda: check(sent() - sent_before == n), timeout=30)
    time.sleep(1.5)
    assert (copies() - far_before, sent() - sent_before) == (n, n)  # and no more
    report(
        "mirror (each copy takes 1 s at server-1)",
        requests=n,
        copies=n,
        curl_seconds_with_copies=f"{elapsed:.2f}",
        curl_seconds_without=f"{plain:.2f}",
    )
