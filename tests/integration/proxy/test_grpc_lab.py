"""gRPC at the destination node on a real lab: a grpcio client through the mesh to grpcecho.

Both server pods (node2) run ``agent.lab.grpcecho`` on port 50051, which the default topology's
Service ``grpc`` declares ``appProtocol: grpc``; the client pod (node1) calls through the
Service VIP on one channel, so every call crosses node1's outbound HTTP/2 layer (an endpoint per
call), HBONE, and node2's inbound HTTP/2 layer. Counts are exact: the tests wait for the mesh to
converge with a call of their own, then compare metrics before and after.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.lab import grpcecho
from agent.lab.handle import Lab
from agent.lab.netns import call_in
from tests.integration.proxy.test_proxy_lab import capture
from tests.labtools import mesh_lab, pod_servers, retry

pytestmark = [pytest.mark.root, pytest.mark.lab]

PORT = grpcecho.PORT
Labels = frozenset[tuple[str, str]]
REQUESTS = "istio_requests_total"
DEST = {"reporter": "destination", "destination_workload": "server", "request_protocol": "grpc"}


def _server(name: str, port: int = PORT) -> str:
    args = ["serve", "--name", name, "--port", str(port)]
    return f"from agent.lab.grpcecho import main; main({args!r})"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with mesh_lab("gr") as lab, ExitStack() as stack:
        for pod in ("server-0", "server-1"):
            stack.enter_context(pod_servers(lab, (pod,), _server(pod), PORT))
        yield lab


def vip(lab: Lab) -> str:
    return str(next(s for s in lab.status()["services"] if s["name"] == "grpc")["clusterIP"])


def calls(
    lab: Lab,
    pod: str,
    target: str,
    *wanted: tuple[str, str],
    headers: Sequence[str] = (),
    timed_calls: bool = False,
) -> list[tuple[str, ...]]:
    """``wanted`` (method, request) calls on ONE channel from ``pod``, each with ``headers``
    (``name=value``): (status, answer), and the call's seconds if ``timed_calls``."""
    options = [f"--header={h}" for h in headers] + (["--timed"] if timed_calls else [])
    out = lab.exec(
        pod, sys.executable, "-m", "agent.lab.grpcecho", "call", target,
        *(f"{m}={r}" for m, r in wanted), *options, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [tuple(x) for x in json.loads(out.stdout)]


def _get(lab: Lab, node: str, url: str) -> str:
    def get() -> str:
        with urlopen(url, timeout=10) as response:
            text: str = response.read().decode()
            return text

    return call_in(lab.netns(node), get)


def metrics(lab: Lab, node: str = "node2") -> dict[tuple[str, Labels], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(
            _get(lab, node, "http://127.0.0.1:15020/metrics")
        )
        for s in family.samples
    }


def total(parsed: dict[tuple[str, Labels], float], **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in parsed.items() if n == REQUESTS and want <= ls)


def converged(lab: Lab) -> dict[tuple[str, Labels], float]:
    """One call through the gRPC layer, seen in the metrics: the Service's declaration and any
    policy change have reached node2's agent. Returns the metrics after it."""
    before = total(metrics(lab), **DEST)

    def check() -> dict[tuple[str, Labels], float]:
        (result,) = calls(lab, "client", f"{vip(lab)}:{PORT}", (grpcecho.UNARY, "warmup"))
        assert result[0] == "OK", result
        now = metrics(lab)
        assert total(now, **DEST) > before
        return now

    return retry(check, timeout=40)


def grpc_service(name: str, app: str, port: int) -> dict[str, Any]:
    """A Service manifest selecting the pods labelled ``app`` on ``port``, declared gRPC."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": {"app": app},
            "ports": [{"port": port, "targetPort": port, "name": "grpc", "appProtocol": "grpc"}],
        },
    }


def test_unary_and_streaming_calls_are_counted_exactly_with_their_grpc_status(lab: Lab) -> None:
    before = converged(lab)
    result = calls(
        lab, "client", f"{vip(lab)}:{PORT}",
        (grpcecho.UNARY, "a"), (grpcecho.STREAM, "3"), (grpcecho.UNARY, "fail:on-purpose"),
        (grpcecho.STREAM, "2"), (grpcecho.UNARY, "b"),
    )  # fmt: skip
    assert [status for status, _ in result] == ["OK", "OK", "NOT_FOUND", "OK", "OK"]
    replica = result[1][1].split(":")[0]  # one call, one replica: the whole stream from it
    assert replica in ("server-0", "server-1")
    assert result[1][1] == f"{replica}:0,{replica}:1,{replica}:2"
    assert result[4][1] in ("server-0:b", "server-1:b")
    after = metrics(lab)
    ok = {**DEST, "response_code": "200", "grpc_response_status": "0", "response_flags": "-"}
    assert total(after, **ok) - total(before, **ok) == 4
    failed = {**DEST, "response_code": "200", "grpc_response_status": "5"}
    assert total(after, **failed) - total(before, **failed) == 1
    principal = {**DEST, "source_principal": "spiffe://cluster.local/ns/default/sa/client"}
    assert total(after, **principal) - total(before, **principal) == 5


def test_an_l7_deny_on_a_method_refuses_exactly_those_calls_on_one_channel(lab: Lab) -> None:
    name = "deny-grpc-admin-" + secrets.token_hex(3)
    manifest: dict[str, Any] = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "action": "DENY",
            "selector": {"matchLabels": {"app": "server"}},
            "rules": [{"to": [{"operation": {"paths": [grpcecho.ADMIN]}}]}],
        },
    }
    target = f"{vip(lab)}:{PORT}"
    lab.apply(manifest)
    try:
        retry(
            lambda: _assert_denied(calls(lab, "client", target, (grpcecho.ADMIN, "warm"))),
            timeout=40,
        )
        before = metrics(lab)
        result = calls(
            lab, "client", target,
            (grpcecho.UNARY, "a"), (grpcecho.ADMIN, "x"), (grpcecho.STREAM, "2"),
            (grpcecho.ADMIN, "y"), (grpcecho.UNARY, "b"),
        )  # fmt: skip
        assert [status for status, _ in result] == [
            "OK", "PERMISSION_DENIED", "OK", "PERMISSION_DENIED", "OK",
        ]  # fmt: skip
        assert result[1][1] == "RBAC: access denied"
        after = metrics(lab)
        denied = {**DEST, "grpc_response_status": "7", "response_flags": "RBAC"}
        assert total(after, **denied) - total(before, **denied) == 2
        ok = {**DEST, "grpc_response_status": "0", "response_flags": "-"}
        assert total(after, **ok) - total(before, **ok) == 3
    finally:
        lab.delete(manifest)


def _assert_denied(result: list[tuple[str, str]]) -> None:
    assert result == [("PERMISSION_DENIED", "RBAC: access denied")]


def test_the_wire_carries_no_plaintext_and_a_plaintext_caller_is_served_too(
    lab: Lab, tmp_path: Path
) -> None:
    converged(lab)
    secret = "SECRET-" + secrets.token_hex(8)
    control = "PLAIN-" + secrets.token_hex(8)
    pcap = tmp_path / "uplink.pcap"
    with capture(lab, "node1", pcap, until=control.encode()):
        meshed = calls(lab, "client", f"{vip(lab)}:{PORT}", (grpcecho.UNARY, secret))
        # outsider is not meshed: its call crosses the wire as is, and node2's plaintext listener
        # (PERMISSIVE) serves it with the same HTTP/2 layer.
        outside = calls(
            lab, "outsider", f"{lab.pod('server-0')['ip']}:{PORT}", (grpcecho.UNARY, control)
        )
    assert meshed[0][0] == "OK" and meshed[0][1].endswith(secret)
    assert outside == [("OK", f"server-0:{control}")]
    wire = pcap.read_bytes()
    assert control.encode() in wire  # the capture sees plaintext when there is plaintext
    assert secret.encode() not in wire
    summary = subprocess.run(["tcpdump", "-nn", "-r", str(pcap)], capture_output=True, text=True)
    assert ".15008" in summary.stdout


def test_calls_on_one_channel_are_spread_over_both_replicas(lab: Lab) -> None:
    """Per-request balancing at the source: ROUND_ROBIN makes the split exact."""
    name = "grpc-rr-" + secrets.token_hex(3)
    manifest: dict[str, Any] = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "targetRef": {"kind": "Service", "name": "grpc"},
            "loadBalancer": {"type": "ROUND_ROBIN"},
        },
    }
    converged(lab)
    lab.apply(manifest)
    try:

        def in_force() -> None:
            traffic = json.loads(_get(lab, "node1", "http://127.0.0.1:15000/traffic"))
            assert traffic["effective"].get("default/grpc", {}).get("balancer") == "ROUND_ROBIN"

        retry(in_force, timeout=40)
        source = {"reporter": "source", "request_protocol": "grpc", "grpc_response_status": "0"}
        before = metrics(lab, "node1")
        result = calls(lab, "client", f"{vip(lab)}:{PORT}", *[(grpcecho.UNARY, "x")] * 20)
        replicas = Counter(answer.split(":")[0] for status, answer in result if status == "OK")
        assert replicas == {"server-0": 10, "server-1": 10}
        after = metrics(lab, "node1")
        assert total(after, **source) - total(before, **source) == 20
        mtls = {**source, "connection_security_policy": "mutual_tls"}
        assert total(after, **mtls) - total(before, **mtls) == 20

        def nothing_in_flight() -> None:  # every request's attempt was finished
            traffic = json.loads(_get(lab, "node1", "http://127.0.0.1:15000/traffic"))
            service = traffic["services"]["default/grpc"]
            assert (service["active"], service["pending"]) == (0, 0), service
            assert [e["active"] for e in service["endpoints"]] == [0, 0], service

        retry(nothing_in_flight, timeout=10)
    finally:
        lab.delete(manifest)


def test_a_call_to_a_service_that_selects_no_pod_is_answered_unavailable_at_once(
    lab: Lab,
) -> None:
    """A Service added by ``lab apply`` without ``clusterIP`` gets a VIP (before, it had none:
    the status said ``None``, grpcio resolved the name ``None`` and the call hung until its
    deadline); its gRPC port without endpoints answers each call UNAVAILABLE, flag ``UH``."""
    manifest = grpc_service("grpc-none", "none", PORT)
    lab.apply(manifest)
    try:
        address = next(s for s in lab.status()["services"] if s["name"] == "grpc-none")
        assert address["clusterIP"], address
        target = f"{address['clusterIP']}:{PORT}"
        unavailable = [("UNAVAILABLE", "no healthy upstream")]
        retry(lambda: _check(calls(lab, "client", target, (grpcecho.UNARY, "w")) == unavailable),
              timeout=40)  # fmt: skip
        flagged = {
            "reporter": "source", "response_flags": "UH", "grpc_response_status": "14",
            "destination_service": "grpc-none.default.svc.cluster.local",
        }  # fmt: skip
        before = metrics(lab, "node1")
        result = calls(lab, "client", target, *[(grpcecho.UNARY, "x")] * 3, timed_calls=True)
        assert [r[:2] for r in result] == unavailable * 3
        assert total(metrics(lab, "node1"), **flagged) - total(before, **flagged) == 3
        print("seconds per UNAVAILABLE call:", [r[2] for r in result])
    finally:
        lab.delete(manifest)


def _check(ok: bool) -> None:
    assert ok


def _counter(parsed: dict[tuple[str, Labels], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in parsed.items() if n == name and want <= ls)


def test_calls_go_to_the_replica_that_listens_while_the_other_refuses(lab: Lab) -> None:
    """The Service's TrafficPolicy retries on a gRPC port: ``grpc-half`` selects both server
    pods, but only server-0 listens on its port, so a call balanced to server-1 finds its tunnel
    refused (node2 answers 503) and goes to server-0: every call succeeds, the retries counted
    (ROUND_ROBIN and no ejection keep choosing server-1)."""
    half = PORT + 1
    service = grpc_service("grpc-half", "server", half)
    policy: dict[str, Any] = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": "grpc-half-rr", "namespace": "default"},
        "spec": {
            "targetRef": {"kind": "Service", "name": "grpc-half"},
            "loadBalancer": {"type": "ROUND_ROBIN"},
            "outlierDetection": {"consecutiveFailures": 1000},
        },
    }
    with pod_servers(lab, ("server-0",), _server("server-0", half), half):
        lab.apply(service)
        lab.apply(policy)
        try:
            address = next(s for s in lab.status()["services"] if s["name"] == "grpc-half")
            target = f"{address['clusterIP']}:{half}"

            def in_force() -> None:
                (answer,) = calls(lab, "client", target, (grpcecho.UNARY, "w"))
                assert answer == ("OK", "server-0:w"), answer
                traffic = json.loads(_get(lab, "node1", "http://127.0.0.1:15000/traffic"))
                effective = traffic["effective"].get("default/grpc-half", {})
                assert effective.get("balancer") == "ROUND_ROBIN", effective

            retry(in_force, timeout=40)
            before = metrics(lab, "node1")
            result = calls(lab, "client", target, *[(grpcecho.UNARY, "x")] * 20)
            after = metrics(lab, "node1")
        finally:
            lab.delete(policy)
            lab.delete(service)
    assert result == [("OK", "server-0:x")] * 20
    ours = {"service": "default/grpc-half"}
    retried = (_counter(after, "nodemesh_service_retries_total", **ours)
               - _counter(before, "nodemesh_service_retries_total", **ours))  # fmt: skip
    failures = "nodemesh_service_connect_failures_total"
    refused = (_counter(after, failures, cause="refused", **ours)
               - _counter(before, failures, cause="refused", **ours))  # fmt: skip
    # Round robin alternates its picks (a retry's too), so at least every other call was
    # balanced to server-1 first.
    assert retried >= 10 and retried == refused, (retried, refused)
    ok = {"reporter": "source", "grpc_response_status": "0", "response_flags": "-",
          "destination_service": "grpc-half.default.svc.cluster.local"}  # fmt: skip
    assert total(after, **ok) - total(before, **ok) == 20


def test_a_same_node_replica_is_authorized_per_call_under_an_l7_deny(lab: Lab) -> None:
    """``grpc-near`` selects the neighbor pod, on the client's node: no other proxy sees its
    calls, so node1 authorizes each one. A DENY on the Admin method refuses exactly those calls
    (before, the connection-level check broadened it to every call), the others on the channel
    reach the pod, and node1 counts each call with both reporters."""
    near = PORT + 2
    service = grpc_service("grpc-near", "neighbor", near)
    deny: dict[str, Any] = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-near-admin-" + secrets.token_hex(3), "namespace": "default"},
        "spec": {
            "action": "DENY",
            "selector": {"matchLabels": {"app": "neighbor"}},
            "rules": [{"to": [{"operation": {"paths": [grpcecho.ADMIN]}}]}],
        },
    }
    with pod_servers(lab, ("neighbor",), _server("neighbor", near), near):
        lab.apply(service)
        lab.apply(deny)
        try:
            address = next(s for s in lab.status()["services"] if s["name"] == "grpc-near")
            target = f"{address['clusterIP']}:{near}"

            def in_force() -> None:
                result = calls(lab, "client", target, (grpcecho.UNARY, "w"), (grpcecho.ADMIN, "w"))
                assert result == [
                    ("OK", "neighbor:w"),
                    ("PERMISSION_DENIED", "RBAC: access denied"),
                ], result

            retry(in_force, timeout=40)
            before = metrics(lab, "node1")
            result = calls(
                lab, "client", target,
                (grpcecho.UNARY, "a"), (grpcecho.ADMIN, "x"), (grpcecho.STREAM, "2"),
                (grpcecho.ADMIN, "y"), (grpcecho.UNARY, "b"),
            )  # fmt: skip
            after = metrics(lab, "node1")
        finally:
            lab.delete(deny)
            lab.delete(service)
    assert result == [
        ("OK", "neighbor:a"), ("PERMISSION_DENIED", "RBAC: access denied"),
        ("OK", "neighbor:0,neighbor:1"), ("PERMISSION_DENIED", "RBAC: access denied"),
        ("OK", "neighbor:b"),
    ]  # fmt: skip
    ours = {"destination_service": "grpc-near.default.svc.cluster.local",
            "destination_workload": "neighbor", "request_protocol": "grpc"}  # fmt: skip
    for reporter in ("source", "destination"):
        flags = "RBAC" if reporter == "destination" else "-"  # as for a far node's refusal
        denied = {**ours, "reporter": reporter, "grpc_response_status": "7",
                  "response_flags": flags}  # fmt: skip
        assert total(after, **denied) - total(before, **denied) == 2, reporter
        ok = {**ours, "reporter": reporter, "grpc_response_status": "0", "response_flags": "-"}
        assert total(after, **ok) - total(before, **ok) == 3, reporter
    failures = "nodemesh_service_connect_failures_total"
    mine = {"service": "default/grpc-near"}
    assert _counter(after, failures, **mine) == _counter(before, failures, **mine)


def test_a_same_node_replica_is_rate_limited_at_the_source(lab: Lab) -> None:
    """``grpc-near-rl`` selects the neighbor pod, on the client's node, under a RateLimitPolicy
    of 1 call/s, burst 5: no other proxy sees its calls, so node1's source proxy takes each
    call's token from node1's buckets. Of 30 calls on one channel, once the bucket is full, at
    least 5 and at most 5 + 1 x t (+1) pass, the others are ``RESOURCE_EXHAUSTED``
    ``local_rate_limited`` (before, every call passed), and node1 counts each refusal once in
    ``nodemesh_rate_limited_requests_total`` and with both reporters, flag ``RL`` on the
    destination's report (the source's has none, as for a far node's refusal)."""
    near, name = PORT + 3, "grpc-near-rl"
    service = grpc_service(name, "neighbor", near)
    limit: dict[str, Any] = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": "near-limit-" + secrets.token_hex(3), "namespace": "default"},
        "spec": {"targetRef": {"kind": "Service", "name": name}, "requestsPerSecond": 1,
                 "burst": 5},
    }  # fmt: skip
    limited = ("RESOURCE_EXHAUSTED", "local_rate_limited")
    with pod_servers(lab, ("neighbor",), _server("neighbor", near), near):
        lab.apply(service)
        lab.apply(limit)
        try:
            address = next(s for s in lab.status()["services"] if s["name"] == name)
            target = f"{address['clusterIP']}:{near}"

            def in_force() -> None:
                result = calls(lab, "client", target, *[(grpcecho.UNARY, "w")] * 8)
                assert limited in result, result

            retry(in_force, timeout=40)
            time.sleep(5.5)  # the probes emptied the bucket: 5 s refill it to its burst
            before = metrics(lab, "node1")
            started = time.monotonic()
            result = calls(lab, "client", target, *[(grpcecho.UNARY, str(i)) for i in range(30)])
            elapsed = time.monotonic() - started
            after = metrics(lab, "node1")
        finally:
            lab.delete(limit)
            lab.delete(service)
    passed = [r for r in result if r[0] == "OK"]
    assert all(r == limited for r in result if r[0] != "OK"), result
    assert 5 <= len(passed) <= 5 + 1 * elapsed + 1, (len(passed), elapsed)
    refused = len(result) - len(passed)
    assert refused > 0
    hostname = f"{name}.default.svc.cluster.local"
    counted = "nodemesh_rate_limited_requests_total"
    mine = {"service": hostname}
    assert _counter(after, counted, **mine) - _counter(before, counted, **mine) == refused
    ours = {"destination_service": hostname, "destination_workload": "neighbor",
            "request_protocol": "grpc"}  # fmt: skip
    for reporter in ("source", "destination"):
        flags = "RL" if reporter == "destination" else "-"
        rl = {**ours, "reporter": reporter, "grpc_response_status": "8", "response_flags": flags}
        assert total(after, **rl) - total(before, **rl) == refused, reporter
        ok = {**ours, "reporter": reporter, "grpc_response_status": "0", "response_flags": "-"}
        assert total(after, **ok) - total(before, **ok) == len(passed), reporter
