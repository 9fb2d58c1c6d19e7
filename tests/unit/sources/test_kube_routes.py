"""Gateway API routes through the Kubernetes source, against the fake API server."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from agent.policy.routes import CONTROLLER_NAME, RouteTable
from agent.sources.kube import KubeSource
from agent.state import StateStore
from tests.fakeapi import FakeApiServer
from tests.fakeapi.objects import service, wait_for

GATEWAY = "gateway.networking.k8s.io"


def _route(name: str, backend: str = "echo-v1", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GATEWAY}/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
            "rules": [{"backendRefs": [{"name": backend, "port": 80}]}],
            **spec,
        },
    }


def _ours(api: FakeApiServer, name: str, kind: str = "HTTPRoute") -> dict[str, Any] | None:
    status = api.get(kind, name).get("status") or {}
    return next(
        (p for p in status.get("parents") or () if p["controllerName"] == CONTROLLER_NAME), None
    )


def _conditions(entry: dict[str, Any] | None) -> dict[str, tuple[str, str, int]]:
    return {
        c["type"]: (c["status"], c["reason"], c["observedGeneration"])
        for c in (entry or {}).get("conditions", ())
    }


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.05) as fake:
        fake.create("Namespace", {"metadata": {"name": "default"}})
        fake.create("Service", service("echo", "10.96.0.10"))
        fake.create("Service", service("echo-v1", "10.96.0.11"))
        yield fake


def _start(api: FakeApiServer, node: str = "node1", **kw: Any) -> tuple[KubeSource, Any]:
    store = StateStore()
    api_client = client.ApiClient(client.Configuration(host=api.url))
    source = KubeSource(api_client, store, node=node, watch_timeout=5, **kw)
    source.start()
    assert source.wait_ready(10), f"not ready: {source.not_ready()}"
    return source, api_client


def test_routes_reach_the_state_and_their_status_is_written_per_parent(
    api: FakeApiServer,
) -> None:
    api.create("HTTPRoute", _route("canary"))
    foreign = {"parentRef": {"name": "gw"}, "controllerName": "example.com/gw", "conditions": []}
    api.patch("HTTPRoute", "canary", {"status": {"parents": [foreign]}}, status=True)
    source, api_client = _start(api)
    try:
        snap = source.store.snapshot()
        route = snap.routes[("HTTPRoute", "default", "canary")]
        assert route.generation == 1 and route.created
        assert RouteTable.build(snap).routed(("default", "echo"), 80)

        wait_for(lambda: _ours(api, "canary"))
        assert _conditions(_ours(api, "canary")) == {
            "Accepted": ("True", "Accepted", 1),
            "ResolvedRefs": ("True", "ResolvedRefs", 1),
        }
        assert api.get("HTTPRoute", "canary")["status"]["parents"][0] == foreign

        api.patch(
            "HTTPRoute",
            "canary",
            {"spec": {"rules": [{"backendRefs": [{"name": "gone", "port": 80}]}]}},
        )
        wait_for(lambda: _conditions(_ours(api, "canary")).get("ResolvedRefs", ("",))[0] == "False")
        assert _conditions(_ours(api, "canary"))["ResolvedRefs"] == ("False", "BackendNotFound", 2)

        # The Service appears: the verdict follows without a route change.
        api.create("Service", service("gone", "10.96.0.12"))
        wait_for(lambda: _conditions(_ours(api, "canary")).get("ResolvedRefs", ("",))[0] == "True")

        api.delete("HTTPRoute", "canary")
        wait_for(lambda: not source.store.snapshot().routes)
    finally:
        source.stop()
        api_client.close()


def test_two_agents_agree_and_stop_writing(api: FakeApiServer) -> None:
    api.create("HTTPRoute", _route("r"))
    first, c1 = _start(api, "node1")
    second, c2 = _start(api, "node2")
    try:
        wait_for(lambda: _ours(api, "r"))
        wait_for(lambda: all(s.store.snapshot().routes for s in (first, second)))
        entry = _ours(api, "r")
        # Both agents see the written status and find nothing left to write.
        wait_for(
            lambda: all(
                s.route_status._seen.get(("HTTPRoute", "default", "r"), ("", []))[1]
                for s in (first, second)
            )
        )
        writes = first.route_status.writes + second.route_status.writes
        first.report_routes()
        second.report_routes()
        assert first.route_status.writes + second.route_status.writes == writes
        assert _ours(api, "r") == entry
        statuses = api.get("HTTPRoute", "r")["status"]["parents"]
        assert len(statuses) == 1  # one entry for the one parent, not one per agent
    finally:
        for s, c in ((first, c1), (second, c2)):
            s.stop()
            c.close()


def test_invalid_route_is_refused_in_status_and_log_once(
    api: FakeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    bad = _route("bad")
    bad["spec"]["rules"][0]["filters"] = [{"type": "CORS", "cors": {}}]
    api.create("HTTPRoute", bad)
    with caplog.at_level(logging.WARNING, logger="agent.sources.routestatus"):
        source, api_client = _start(api)
        try:
            wait_for(lambda: _ours(api, "bad"))
            accepted = next(c for c in _ours(api, "bad")["conditions"] if c["type"] == "Accepted")  # type: ignore[index]
            assert (accepted["status"], accepted["reason"]) == ("False", "UnsupportedValue")
            assert "spec.rules[0].filters[0].type" in accepted["message"]
            assert not RouteTable.build(source.store.snapshot()).routed(("default", "echo"), 80)
            source.report_routes()
        finally:
            source.stop()
            api_client.close()
    refusals = [
        r for r in caplog.records if "HTTPRoute default/bad is not applied" in r.getMessage()
    ]
    assert len(refusals) == 1


def test_without_the_gateway_api_crds_the_agent_runs_and_says_routes_are_unavailable(
    api: FakeApiServer,
) -> None:
    api.absent_groups.add(GATEWAY)
    source, api_client = _start(api, absent_recheck=0.1)
    try:
        assert source.ready
        view = source.describe()
        assert str(view["routes"]).startswith("unavailable (httproutes: 404")
        assert "install the Gateway API CRDs" in str(view["routes"])
        # The CRDs are installed later: the agent picks the routes up without a restart.
        api.absent_groups.clear()
        api.create("HTTPRoute", _route("late"))
        wait_for(lambda: source.store.snapshot().routes)
        wait_for(lambda: source.describe()["routes"] == "available")
        wait_for(lambda: _ours(api, "late"))
    finally:
        source.stop()
        api_client.close()


FAST_LEASE = (1.5, 1.0, 0.1)  # duration, renew deadline, retry period (seconds)


def test_one_agent_per_cluster_writes_route_status_and_another_takes_over_when_it_stops(
    api: FakeApiServer,
) -> None:
    api.create("HTTPRoute", _route("r"))
    first, c1 = _start(api, "node1", lease_timing=FAST_LEASE)
    second, c2 = _start(api, "node2", lease_timing=FAST_LEASE)
    sources = {"node1": (first, c1), "node2": (second, c2)}
    try:
        wait_for(lambda: _ours(api, "r"))
        lease = wait_for(lambda: api.find("Lease", "nodemesh-route-status", "nodemesh-system"))
        holder = lease["spec"]["holderIdentity"]
        leader, _ = sources[holder]
        follower, _ = sources["node2" if holder == "node1" else "node1"]
        assert leader.election.leading() and not follower.election.leading()
        assert leader.describe()["route_status_writer"] is True
        assert follower.describe()["route_status_writer"] is False
        # Route changes: only the holder writes, the other computes the same and sends nothing.
        for backend in ("gone", "echo-v1", "also-gone"):
            api.patch("HTTPRoute", "r", {"spec": {"rules": [{"backendRefs": [
                {"name": backend, "port": 80}]}]}})  # fmt: skip
            resolved = "True" if backend == "echo-v1" else "False"
            wait_for(lambda r=resolved: _conditions(_ours(api, "r"))["ResolvedRefs"][0] == r)
        wait_for(lambda: leader.route_status.writes == 4)  # the first status, then 3 changes
        assert follower.route_status.writes == 0
        # The follower never even tries. (The leader may meet a 409 when its write races one of
        # the test's spec patches: optimistic concurrency, retried from the next event.)
        assert follower.route_status.conflicts == 0
        # The holder stops and gives the Lease up: the other one takes it and writes.
        leader.stop()
        wait_for(lambda: follower.election.leading())
        lease = api.get("Lease", "nodemesh-route-status", "nodemesh-system")
        assert lease["spec"]["holderIdentity"] == follower.election.identity
        assert lease["spec"]["leaseTransitions"] == 1
        api.create("Service", service("also-gone", "10.96.0.13"))
        wait_for(lambda: _conditions(_ours(api, "r"))["ResolvedRefs"][0] == "True")
        wait_for(lambda: follower.route_status.writes == 1)
        assert leader.route_status.writes == 4
    finally:
        for s, c in sources.values():
            s.stop()
            c.close()


def test_a_lease_another_agent_renews_is_left_alone_and_taken_once_it_expires(
    api: FakeApiServer,
) -> None:
    api.create("HTTPRoute", _route("r"))
    spec = {"holderIdentity": "node9", "leaseDurationSeconds": 3, "renewTime": "0"}
    lease = {"metadata": {"name": "nodemesh-route-status"}, "spec": spec}
    api.create("Lease", lease, namespace="nodemesh-system")
    source, connection = _start(api, "node1", lease_timing=(3.0, 2.0, 0.1))
    try:
        for i in range(30):  # node9 renews for 3 s (every 0.1 s): node1 only follows
            api.patch("Lease", "nodemesh-route-status", {"spec": {"renewTime": str(i + 1)}},
                      namespace="nodemesh-system")  # fmt: skip
            assert not source.election.leading()
            time.sleep(0.1)
        assert _ours(api, "r") is None  # and writes no route status meanwhile
        wait_for(lambda: source.election.leading())  # node9 stopped renewing: taken over
        taken = api.get("Lease", "nodemesh-route-status", "nodemesh-system")["spec"]
        assert (taken["holderIdentity"], taken["leaseTransitions"]) == ("node1", 1)
        wait_for(lambda: _ours(api, "r"))  # the new holder writes what was pending
    finally:
        source.stop()
        connection.close()
