"""Gateway API GRPCRoute (and HTTPRoute) per call on the source node, in a real lab, with one
grpcio channel per client run.

Service ``grpc`` (VIP port 50051, declared gRPC) selects server-0 (``version: v1``) and
server-1 (``version: v2``), each running ``agent.lab.grpcecho``, which answers with its name.
The test adds Services ``grpc-v1`` and ``grpc-v2`` (one pod each) with ``nodemesh lab apply``,
and routes attached to ``grpc``. node1's agent terminates the client's h2c and routes each
call: a canary by header, a 90/10 split of the rest, ``UNIMPLEMENTED`` for a method no rule
matches, ``DEADLINE_EXCEEDED`` when an HTTPRoute's request timeout expires, and an HTTPRoute
``retry`` hiding a replica that answers ``UNAVAILABLE``. Shares are reported with their
binomial bounds; the assertions allow 4 standard deviations.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest

from agent.lab import grpcecho
from agent.lab.handle import Lab
from tests.integration.proxy.test_grpc_lab import _server, calls, metrics, total, vip
from tests.integration.proxy.test_http_routes_lab import bounds, counted, stable
from tests.integration.traffic.test_traffic_lab import admin, report, within
from tests.labtools import mesh_lab, pod_servers, retry

pytestmark = [pytest.mark.root, pytest.mark.lab]

PORT = grpcecho.PORT
GRPC_PORT = {"port": PORT, "targetPort": PORT, "name": "grpc", "appProtocol": "grpc"}
PARENT = {"group": "", "kind": "Service", "name": "grpc", "port": PORT}
CANARY = "x-canary=true"
RETRIES = "nodemesh_http_retries_total"


def service(name: str, version: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": {"app": "server", "version": version}, "ports": [GRPC_PORT]},
    }


def grpc_route(*rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GRPCRoute",
        "metadata": {"name": "grpc-routes", "namespace": "default"},
        "spec": {"parentRefs": [PARENT], "rules": list(rules)},
    }


def http_route(*rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "grpc-http-routes", "namespace": "default"},
        "spec": {"parentRefs": [PARENT], "rules": list(rules)},
    }


UNARY = {"service": grpcecho.SERVICE, "method": "Unary"}
CANARY_ROUTE = grpc_route(
    {
        "matches": [{"method": UNARY, "headers": [{"name": "x-canary", "value": "true"}]}],
        "backendRefs": [{"name": "grpc-v2", "port": PORT}],
    },
    {
        "matches": [{"method": UNARY}],
        "backendRefs": [
            {"name": "grpc-v1", "port": PORT, "weight": 90},
            {"name": "grpc-v2", "port": PORT, "weight": 10},
        ],
    },
)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with mesh_lab("gq") as lab, ExitStack() as stack:
        for pod in ("server-0", "server-1"):
            stack.enter_context(pod_servers(lab, (pod,), _server(pod), PORT))
        lab.apply([service("grpc-v1", "v1"), service("grpc-v2", "v2")])
        yield lab


def served(lab: Lab, n: int, *headers: str) -> Counter[str]:
    """``n`` Unary calls on one channel: how many each replica answered (all must be OK)."""
    result = calls(lab, "client", f"{vip(lab)}:{PORT}", *[(grpcecho.UNARY, "x")] * n,
                   headers=headers)  # fmt: skip
    assert [status for status, _ in result] == ["OK"] * n, Counter(s for s, _ in result)
    return Counter(answer.split(":")[0] for _, answer in result)


def check(ok: bool) -> None:
    assert ok


@contextmanager
def traffic_policy(lab: Lab, spec: dict[str, Any]) -> Iterator[None]:
    """A TrafficPolicy on Service ``grpc``, in force on node1 while the block runs."""
    manifest = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": "grpc-traffic", "namespace": "default"},
        "spec": {"targetRef": {"kind": "Service", "name": "grpc"}, **spec},
    }

    def balancer() -> str:
        return str(admin(lab, "/traffic")["effective"].get("default/grpc", {}).get("balancer"))

    lab.apply(manifest)
    try:
        retry(lambda: check(balancer() == spec["loadBalancer"]["type"]), timeout=40)
        yield
    finally:
        lab.delete(manifest)
        retry(lambda: check(balancer() == "None"), timeout=40)


def test_a_grpcroute_sends_the_canary_header_to_v2_and_splits_the_rest_90_10(lab: Lab) -> None:
    lab.apply(CANARY_ROUTE)
    try:
        retry(lambda: check(served(lab, 10, CANARY) == {"server-1": 10}), timeout=40)
        assert served(lab, 50, CANARY) == {"server-1": 50}
        n = 300
        split = served(lab, n)
        report("gRPC 90/10 split", n=n, v2=split["server-1"], expected=bounds(n, 0.1))
        assert within(split["server-1"], n, 0.1)
        # A method that no rule matches: UNIMPLEMENTED from node1, counted with flag NR.
        source = {"reporter": "source", "grpc_response_status": "12", "response_flags": "NR"}
        before = total(metrics(lab, "node1"), **source)
        result = calls(lab, "client", f"{vip(lab)}:{PORT}", (grpcecho.ADMIN, "x"),
                       (grpcecho.UNARY, "y"), (grpcecho.ADMIN, "z"))  # fmt: skip
        assert [status for status, _ in result] == ["UNIMPLEMENTED", "OK", "UNIMPLEMENTED"]
        assert result[0][1] == "no route matched the request"
        retry(lambda: check(total(metrics(lab, "node1"), **source) - before == 2), timeout=10)
    finally:
        lab.delete(CANARY_ROUTE)


def test_an_httproute_request_timeout_answers_a_slow_call_deadline_exceeded(lab: Lab) -> None:
    timed = http_route({"timeouts": {"request": "200ms"}})
    lab.apply(timed)
    try:
        target = f"{vip(lab)}:{PORT}"

        def in_force() -> list[tuple[str, ...]]:
            result = calls(lab, "client", target, (grpcecho.UNARY, "sleep:1"), timed_calls=True)
            assert result[0][:2] == ("DEADLINE_EXCEEDED", "upstream request timeout"), result
            return result

        retry(in_force, timeout=40)
        source = {"reporter": "source", "grpc_response_status": "4", "response_flags": "UT"}
        before = total(metrics(lab, "node1"), **source)
        slow, quick = (grpcecho.UNARY, "sleep:1"), (grpcecho.UNARY, "quick")
        result = calls(lab, "client", target, slow, quick, slow, timed_calls=True)
        assert [r[0] for r in result] == ["DEADLINE_EXCEEDED", "OK", "DEADLINE_EXCEEDED"]
        report("gRPC call against a 1 s handler under timeouts.request 200ms",
               seconds=[r[2] for r in result], client_deadline="10 s")  # fmt: skip
        retry(lambda: check(total(metrics(lab, "node1"), **source) - before == 2), timeout=10)
    finally:
        lab.delete(timed)


def test_an_httproute_retry_hides_a_replica_answering_unavailable(lab: Lab) -> None:
    retrying = http_route({"retry": {"attempts": 2, "codes": [503], "backoff": "10ms"}})
    lab.apply(retrying)
    # Round robin and no ejection, so that server-1 surely keeps getting first tries.
    spec = {"loadBalancer": {"type": "ROUND_ROBIN"}, "outlierDetection": {"maxEjectionPercent": 0}}
    target, flaky = f"{vip(lab)}:{PORT}", (grpcecho.UNARY, "unavailable:server-1")
    far = {"reporter": "destination", "grpc_response_status": "14"}
    try:
        with traffic_policy(lab, spec):

            def in_force() -> None:
                result = calls(lab, "client", target, *[flaky] * 4)
                assert [r[0] for r in result] == ["OK"] * 4, result

            retry(in_force, timeout=40)
            before = metrics(lab, "node1")
            far_before = stable(lambda: total(metrics(lab), **far))
            n = 40
            started = time.monotonic()
            result = calls(lab, "client", target, *[flaky] * n)
            took = time.monotonic() - started
            after = metrics(lab, "node1")
            far_after = stable(lambda: total(metrics(lab), **far))
        assert Counter(result) == {("OK", "server-0:unavailable:server-1"): n}
        attempted = counted(after, RETRIES, "default/grpc", "attempted") - counted(
            before, RETRIES, "default/grpc", "attempted"
        )
        report("gRPC retry on UNAVAILABLE", calls=n, ok=n, retries=attempted,
               far_unavailable=far_after - far_before, seconds=f"{took:.2f}")  # fmt: skip
        # Every UNAVAILABLE server-1 gave was retried, and no call needed more than one retry.
        assert 1 <= far_after - far_before <= attempted <= n
        ok = {"reporter": "source", "grpc_response_status": "0", "response_flags": "-"}
        assert total(after, **ok) - total(before, **ok) == n
    finally:
        lab.delete(retrying)


def http_fault(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "HTTPFault",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def fault_filter(name: str) -> dict[str, Any]:
    ref = {"group": "nodemesh.io", "kind": "HTTPFault", "name": name}
    return {"type": "ExtensionRef", "extensionRef": ref}


def flagged(lab: Lab, flags: str, **labels: str) -> float:
    return total(metrics(lab, "node1"), reporter="source", response_flags=flags, **labels)


def test_a_grpcroute_fault_aborts_with_its_grpc_status_and_delays_flagged_di(lab: Lab) -> None:
    """GRPCRoute rules with ExtensionRef filters: ``x-chaos: abort`` calls are answered
    trailers-only ``RESOURCE_EXHAUSTED`` (the HTTPFault's ``grpcStatus: 8``, flag FI),
    ``x-chaos: delay`` calls are held 300 ms and then served (flag DI)."""

    def rule(value: str, fault: str) -> dict[str, Any]:
        header = {"name": "x-chaos", "value": value}
        return {"matches": [{"method": UNARY, "headers": [header]}],
                "backendRefs": [{"name": "grpc", "port": PORT}],
                "filters": [fault_filter(fault)]}  # fmt: skip

    rest = {"matches": [{"method": UNARY}], "backendRefs": [{"name": "grpc", "port": PORT}]}
    manifests = [
        http_fault("grpc-abort", {"abort": {"grpcStatus": 8, "percentage": 100}}),
        http_fault("grpc-delay", {"delay": {"fixedDelay": "300ms", "percentage": 100}}),
        grpc_route(rule("abort", "grpc-abort"), rule("delay", "grpc-delay"), rest),
    ]
    target = f"{vip(lab)}:{PORT}"
    lab.apply(manifests)
    try:
        exhausted = ("RESOURCE_EXHAUSTED", "fault filter abort")

        def in_force() -> None:
            probe = calls(lab, "client", target, (grpcecho.UNARY, "w"), headers=["x-chaos=abort"])
            assert probe == [exhausted], probe

        retry(in_force, timeout=40)
        fi_before = flagged(lab, "FI", grpc_response_status="8")
        di_before = flagged(lab, "DI", grpc_response_status="0")
        n = 5
        aborted = calls(lab, "client", target, *[(grpcecho.UNARY, "a")] * n,
                        headers=["x-chaos=abort"])  # fmt: skip
        delayed = calls(lab, "client", target, *[(grpcecho.UNARY, "d")] * n,
                        headers=["x-chaos=delay"], timed_calls=True)  # fmt: skip
        plain = calls(lab, "client", target, *[(grpcecho.UNARY, "p")] * n, timed_calls=True)
        assert aborted == [exhausted] * n
        assert [r[0] for r in delayed] == ["OK"] * n and [r[0] for r in plain] == ["OK"] * n
        report("GRPCRoute HTTPFault delay 300ms", delayed_seconds=[r[2] for r in delayed],
               plain_seconds=[r[2] for r in plain])  # fmt: skip
        retry(lambda: check(flagged(lab, "FI", grpc_response_status="8") - fi_before == n), 10)
        retry(lambda: check(flagged(lab, "DI", grpc_response_status="0") - di_before == n), 10)
    finally:
        lab.delete(manifests)


def test_an_injected_delay_does_not_count_toward_the_request_timeout(lab: Lab) -> None:
    """An HTTPRoute on the gRPC port: a 300 ms fault delay and ``timeouts.request: 200ms``.
    The timeout starts after the delay (as Envoy's route timeout starts after its fault
    filter), so quick calls are served (flag DI), and a 1 s call still times out."""
    manifests = [
        http_fault("grpc-delay", {"delay": {"fixedDelay": "300ms", "percentage": 100}}),
        http_route({"filters": [fault_filter("grpc-delay")], "timeouts": {"request": "200ms"}}),
    ]
    target = f"{vip(lab)}:{PORT}"
    lab.apply(manifests)
    try:
        di_before = flagged(lab, "DI", grpc_response_status="0")

        def in_force() -> None:
            assert calls(lab, "client", target, (grpcecho.UNARY, "w"))[0][0] == "OK"
            assert flagged(lab, "DI", grpc_response_status="0") > di_before
            result = calls(lab, "client", target, (grpcecho.UNARY, "sleep:1"))
            assert result[0][0] == "DEADLINE_EXCEEDED", result

        retry(in_force, timeout=40)
        result = calls(lab, "client", target, *[(grpcecho.UNARY, "q")] * 5, timed_calls=True)
        assert [r[0] for r in result] == ["OK"] * 5
        report("delay 300ms + timeouts.request 200ms, quick calls",
               seconds=[r[2] for r in result])  # fmt: skip
    finally:
        lab.delete(manifests)


def test_backend_request_is_a_per_try_timeout_that_is_retried(lab: Lab) -> None:
    """``timeouts.backendRequest: 200ms`` with ``retry.attempts: 1`` against a 1 s handler:
    each call's first try times out and is retried (counted), the second times out too and
    the call ends ``DEADLINE_EXCEEDED`` (flag UT)."""
    route = http_route({"timeouts": {"backendRequest": "200ms"},
                        "retry": {"attempts": 1, "codes": [503], "backoff": "10ms"}})  # fmt: skip
    target = f"{vip(lab)}:{PORT}"
    lab.apply(route)
    try:
        slow = (grpcecho.UNARY, "sleep:1")

        def in_force() -> None:
            result = calls(lab, "client", target, slow)
            assert result[0][:2] == ("DEADLINE_EXCEEDED", "upstream request timeout"), result

        retry(in_force, timeout=40)
        before = metrics(lab, "node1")
        n = 3
        result = calls(lab, "client", target, *[slow] * n, timed_calls=True)
        after = metrics(lab, "node1")
        assert [r[0] for r in result] == ["DEADLINE_EXCEEDED"] * n
        attempted = counted(after, RETRIES, "default/grpc", "attempted") - counted(
            before, RETRIES, "default/grpc", "attempted"
        )
        report("backendRequest 200ms, one retry, 1 s handler",
               seconds=[r[2] for r in result], retries=attempted)  # fmt: skip
        assert attempted == n
        timed_out = {"reporter": "source", "grpc_response_status": "4", "response_flags": "UT"}
        assert total(after, **timed_out) - total(before, **timed_out) == n
    finally:
        lab.delete(route)


DEST_V2 = {
    "reporter": "destination",
    "request_protocol": "grpc",
    "destination_service": "grpc-v2.default.svc.cluster.local",
    "grpc_response_status": "0",
}


def copies_sent(parsed: dict[Any, float]) -> float:
    return counted(parsed, "nodemesh_http_mirrored_total", "default/grpc-v2", "sent")


def test_a_grpcroute_mirror_copies_each_call_to_v2_and_the_primary_goes_to_v1(lab: Lab) -> None:
    """Each call goes to grpc-v1 (server-0), which answers it; a copy of it goes to grpc-v2
    (server-1), whose answer is dropped: node1 counts it ``sent``, node2 reports it."""
    v2 = {"name": "grpc-v2", "port": PORT}
    mirror = {"type": "RequestMirror", "requestMirror": {"backendRef": v2}}
    route = grpc_route(
        {
            "matches": [{"method": UNARY}],
            "filters": [mirror],
            "backendRefs": [{"name": "grpc-v1", "port": PORT}],
        }
    )
    lab.apply(route)
    try:
        before = copies_sent(metrics(lab, "node1"))

        def in_force() -> None:
            assert served(lab, 1) == {"server-0": 1}
            assert copies_sent(metrics(lab, "node1")) > before

        retry(in_force, timeout=40)
        before = copies_sent(metrics(lab, "node1"))
        far_before = stable(lambda: total(metrics(lab), **DEST_V2))
        n = 20
        assert served(lab, n) == {"server-0": n}  # every answer is the primary's (v1)
        retry(lambda: check(copies_sent(metrics(lab, "node1")) - before == n), 20)
        far = stable(lambda: total(metrics(lab), **DEST_V2)) - far_before
        report("GRPCRoute RequestMirror to grpc-v2", calls=n, copies_at_v2=far)
        assert far == n  # server-1 answered each copy
    finally:
        lab.delete(route)


def test_calls_over_max_connections_wait_and_a_full_queue_is_unavailable(lab: Lab) -> None:
    """``maxConnections: 1`` and ``maxPendingRequests: 1`` on ``grpc``: a slow call in
    flight, a second call waits at node1 (then is served), a third finds the queue full and is
    answered ``UNAVAILABLE`` at once (flag UO, rejection ``max_pending_requests``)."""
    manifest = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": "grpc-queue", "namespace": "default"},
        "spec": {
            "targetRef": {"kind": "Service", "name": "grpc"},
            "connectionPool": {"maxConnections": 1, "maxPendingRequests": 1},
        },
    }
    target = f"{vip(lab)}:{PORT}"

    def grpc_state() -> dict[str, Any]:
        service: dict[str, Any] = admin(lab, "/traffic")["services"].get("default/grpc", {})
        return service

    def call_in_background(request: str) -> Any:
        command = ["-m", "agent.lab.grpcecho", "call", target, f"{grpcecho.UNARY}={request}"]
        return lab.popen("client", sys.executable, *command, stdout=subprocess.PIPE, text=True)

    lab.apply(manifest)
    running = []
    try:

        def in_force() -> None:
            effective = admin(lab, "/traffic")["effective"].get("default/grpc", {})
            assert effective.get("max_pending_requests") == 1

        retry(in_force, timeout=40)
        before = metrics(lab, "node1")
        running.append(call_in_background("sleep:4"))
        retry(lambda: check(grpc_state().get("active") == 1), timeout=20)
        running.append(call_in_background("sleep:0.5"))
        retry(lambda: check(grpc_state().get("queued") == 1), timeout=20)
        third = calls(lab, "client", target, (grpcecho.UNARY, "now"), timed_calls=True)
        results = [json.loads(p.communicate(timeout=60)[0]) for p in running]
        after = metrics(lab, "node1")
    finally:
        for p in running:
            if p.poll() is None:
                p.kill()
                p.wait()
        lab.delete(manifest)
    assert third[0][:2] == ("UNAVAILABLE", "upstream overflow: over the Service's request limit")
    assert [r[0][0] for r in results] == ["OK", "OK"]  # the waiting call was served after
    report("maxPendingRequests 1 over maxConnections 1", full_queue_seconds=third[0][2])
    overflow = {"reporter": "source", "grpc_response_status": "14", "response_flags": "UO"}
    assert total(after, **overflow) - total(before, **overflow) == 1
    rejected = counted_reason(after) - counted_reason(before)
    assert rejected == 1


def counted_reason(parsed: dict[Any, float]) -> float:
    want = {("service", "default/grpc"), ("reason", "max_pending_requests")}
    return sum(v for (name, ls), v in parsed.items()
               if name == "nodemesh_service_rejections_total" and want <= ls)  # fmt: skip
