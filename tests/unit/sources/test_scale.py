"""Scale: 10,000 pods, 2,000 services (with EndpointSlices) and 500 policies.

Measures (printed; run with ``-s`` to see them; no timing assertions): the memory the state
holds, the full sync from raw API objects into the store, a single pod update, and the same
end to end through the fake API server and the official client (full sync until ready, and the
latency from an annotation change in the API to the store's subscribers being notified).
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
import tracemalloc
from typing import Any

import pytest
from kubernetes import client

from agent.sources import kubehandlers as kh
from agent.sources.kube import POLICY_PLURALS, KubeSource
from agent.sources.kubeobjects import InvalidObject, Raw
from agent.state import Snapshot, StateStore
from tests.fakeapi import FakeApiServer
from tests.fakeapi.objects import authz, endpoint_slice, pod, service

PODS, SERVICES, POLICIES, NODES, NAMESPACES = 10_000, 2_000, 500, 100, 50


class _NoReports:
    def report_invalid(self, obj: Raw, error: InvalidObject) -> None:
        raise AssertionError(f"unexpected invalid object: {error}")

    def report_pod(self, obj: Raw, deleted: bool) -> None:
        return None

    def report_namespace(self, obj: Raw, deleted: bool) -> None:
        return None

    def report_policy(self, plural: str, obj: Raw, error: InvalidObject | None) -> None:
        assert error is None

    def observe_route(self, kind: str, obj: Raw, deleted: bool) -> None:
        return None

    def report_routes(self) -> None:
        return None


def _with_meta(obj: dict[str, Any], i: int) -> dict[str, Any]:
    obj["metadata"].update(
        uid=f"uid-{obj['metadata']['name']}", resourceVersion=str(i), generation=1
    )
    return obj


def _cluster() -> dict[str, list[dict[str, Any]]]:
    pods = [
        pod(
            f"pod-{i}",
            f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
            ns=f"ns-{i % NAMESPACES}",
            node=f"node-{i % NODES}",
            labels={"app": f"svc-{i % SERVICES}", "version": f"v{i % 3}"},
            annotations={"nodemesh.io/mesh": "enabled"} if i % 2 else {},
        )
        for i in range(PODS)
    ]
    services, slices = [], []
    for s in range(SERVICES):
        ns = f"ns-{s % NAMESPACES}"
        ips = [p["status"]["podIP"] for p in pods[s::SERVICES]]
        services.append(service(f"svc-{s}", f"10.96.{s >> 8}.{s & 255}", ns=ns))
        slices.append(endpoint_slice(f"svc-{s}-x", f"svc-{s}", ips, ns=ns))
    policies = [authz(f"p-{i}", ns=f"ns-{i % NAMESPACES}") for i in range(POLICIES)]
    return {
        "pods": [_with_meta(o, i) for i, o in enumerate(pods)],
        "services": services,
        "slices": slices,
        "policies": policies,
    }


def _load(store: StateStore, raw: dict[str, list[dict[str, Any]]]) -> kh.Context:
    ctx = kh.Context(store, _NoReports())
    kh.Namespaces(ctx).replace([{"metadata": {"name": f"ns-{n}"}} for n in range(NAMESPACES)])
    kh.Pods(ctx).replace(raw["pods"])
    kh.Services(ctx).replace(raw["services"])
    kh.EndpointSlices(ctx).replace(raw["slices"])
    kh.Policies(ctx, "AuthorizationPolicy", "authorizationpolicies").replace(raw["policies"])
    return ctx


def _report(capsys: pytest.CaptureFixture[str], lines: list[str]) -> None:
    with capsys.disabled():
        print("\n" + "\n".join(f"scale: {line}" for line in lines))


def test_state_scale(capsys: pytest.CaptureFixture[str]) -> None:
    raw = _cluster()
    store = StateStore()
    start = time.perf_counter()
    ctx = _load(store, raw)
    full_sync = time.perf_counter() - start
    snap = store.snapshot()
    assert len(snap.workloads) == PODS and len(snap.services) == SERVICES
    assert len(snap.policies) == POLICIES
    assert len(snap.service_by_ip["10.96.0.1"].endpoints) == PODS // SERVICES

    pods = kh.Pods(ctx)
    durations = []
    for i in range(200):
        changed = dict(
            raw["pods"][i],
            metadata={**raw["pods"][i]["metadata"], "labels": {"app": "x", "n": str(i)}},
        )
        t = time.perf_counter()
        pods.event("MODIFIED", changed)
        durations.append(time.perf_counter() - t)
    assert store.snapshot().workloads["uid-pod-199"].labels["n"] == "199"
    t = time.perf_counter()
    with store.update() as txn:
        txn.put_namespace(
            snap.namespaces["ns-1"].__class__("ns-1", {"nodemesh.io/mesh": "enabled"})
        )
    ns_toggle = time.perf_counter() - t
    assert sum(1 for _ in store.snapshot().meshed_workloads_on("node-1")) == PODS // NODES

    del ctx, pods, store, snap
    gc.collect()
    tracemalloc.start()
    store = StateStore()
    _load(store, raw)
    del raw
    gc.collect()
    state_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    _report(
        capsys,
        [
            f"{PODS} pods, {SERVICES} services (+slices), {POLICIES} policies",
            f"full sync from raw API objects into the store: {full_sync:.2f} s",
            f"single pod update (event -> new snapshot): median "
            f"{statistics.median(durations) * 1e3:.2f} ms, max {max(durations) * 1e3:.2f} ms",
            f"namespace label toggle: {ns_toggle * 1e3:.2f} ms",
            f"memory held by the state: {state_bytes / 2**20:.1f} MiB",
        ],
    )


def test_end_to_end_scale_through_the_fake_api(capsys: pytest.CaptureFixture[str]) -> None:
    raw = _cluster()
    with FakeApiServer(bookmark_interval=1.0) as api:
        for n in range(NAMESPACES):
            api.create("Namespace", {"metadata": {"name": f"ns-{n}"}})
        for kind, items in (
            ("Pod", raw["pods"]),
            ("Service", raw["services"]),
            ("EndpointSlice", raw["slices"]),
            ("AuthorizationPolicy", raw["policies"]),
        ):
            for obj in items:
                api.create(kind, obj, namespace=obj["metadata"]["namespace"])
        del raw
        store = StateStore()
        notified = threading.Event()
        store.subscribe(lambda snap, kinds: notified.set())
        api_client = client.ApiClient(client.Configuration(host=api.url))
        source = KubeSource(api_client, store, node="node-0", report_status=False)
        try:
            start = time.perf_counter()
            source.start()
            assert source.wait_ready(60)
            ready = time.perf_counter() - start
            assert len(store.snapshot().workloads) == PODS
            latencies = []
            for i in range(50):
                value = "disabled" if i % 2 else "enabled"
                notified.clear()
                t = time.perf_counter()
                api.patch(
                    "Pod",
                    "pod-0",
                    {"metadata": {"annotations": {"nodemesh.io/mesh": value}}},
                    namespace="ns-0",
                )
                assert notified.wait(10)
                latencies.append(time.perf_counter() - t)
            snap: Snapshot = store.snapshot()
            assert snap.workload_by_ip["10.0.0.0"].mesh_annotation == "disabled"
        finally:
            source.stop()
            api_client.close()
    latencies.sort()
    _report(
        capsys,
        [
            f"end to end (fake API, official client, {len(POLICY_PLURALS) + 4} watches): "
            f"full sync until ready {ready:.2f} s",
            f"annotation change in the API -> store notified: median "
            f"{statistics.median(latencies) * 1e3:.1f} ms, p99 {latencies[-1] * 1e3:.1f} ms "
            f"(50 samples)",
        ],
    )
