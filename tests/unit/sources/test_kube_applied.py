"""``/status`` says what a Kubernetes agent applied, and ``nodemesh proxy-status`` tells two
agents at different revisions apart (two sources against one fake API server)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from agent.admin.api import AdminApi, AdminSources
from agent.admin.sync import STALE, SYNCED, Answer, compare
from agent.sources.kube import KubeSource
from agent.state import StateStore
from tests.fakeapi import FakeApiServer
from tests.fakeapi.objects import pod, wait_for


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(bookmark_interval=0.05) as fake:
        fake.create("Namespace", {"metadata": {"name": "default"}})
        yield fake


class Agent:
    """A Kubernetes source and the admin API over its store, as ``agent.wiring`` joins them."""

    def __init__(self, api: FakeApiServer, node: str) -> None:
        self.store = StateStore()
        self.client = client.ApiClient(client.Configuration(host=api.url))
        self.source = KubeSource(self.client, self.store, node=node, watch_timeout=5)
        self.admin = AdminApi(
            AdminSources(
                node=node,
                store=self.store,
                config={},
                not_ready=self.source.not_ready,
                drain=lambda: None,
                state_source=self.source.describe,
            )
        )

    def start(self) -> None:
        self.source.start()
        assert self.source.wait_ready(10), f"not ready: {self.source.not_ready()}"

    def stop(self) -> None:
        self.source.stop()
        self.client.close()

    def status(self) -> dict[str, Any]:
        return asyncio.run(self.admin.status())

    def pods_revision(self) -> int:
        return int(self.status()["state"]["applied"]["pods"]["resource_version"] or 0)


def test_status_says_what_was_applied_and_two_agents_compare(api: FakeApiServer) -> None:
    first = api.create("Pod", pod("a", "10.244.1.2"))
    behind, ahead = Agent(api, "node1"), Agent(api, "node2")
    try:
        behind.start()
        st = behind.status()
        applied = st["state"]["applied"]
        assert set(applied) >= {"pods", "namespaces", "services", "endpointslices", "httproutes"}
        assert int(applied["pods"]["resource_version"]) >= int(first["metadata"]["resourceVersion"])
        assert applied["pods"]["synced"] is True and applied["pods"]["absent"] is False
        assert st["state"]["version"] >= 1
        assert st["state"]["applied_at"] is not None  # the admin API saw the commit
        behind.source.stop()  # node1's watches end: it stays at what it applied

        second = api.create("Pod", pod("b", "10.244.1.3"))
        ahead.start()
        wanted = int(second["metadata"]["resourceVersion"])
        wait_for(lambda: ahead.pods_revision() >= wanted)
        assert "b" in {w.name for w in ahead.store.snapshot().workloads.values()}

        old, new = behind.status(), ahead.status()
        gap = int(new["state"]["applied"]["pods"]["resource_version"]) - int(
            old["state"]["applied"]["pods"]["resource_version"]
        )
        assert gap >= 1
        rows = compare([Answer("node1", "a", status=old), Answer("node2", "b", status=new)])
        assert rows[0]["resources"]["pods"]["verdict"] == {
            "state": STALE,
            "behind": gap,
            "unit": "revisions",
        }
        assert rows[0]["columns"]["PODS"] == f"STALE -{gap}"
        assert rows[1]["resources"]["pods"]["verdict"]["state"] == SYNCED
        assert rows[1]["columns"]["PODS"] == SYNCED
    finally:
        behind.stop()
        ahead.stop()


def test_an_agent_watching_an_unchanged_resource_is_synced_and_names_its_cluster() -> None:
    """The real API server sends a bookmark about once a minute, so between two a quiet
    watch's revision stays where its last event left it while another agent lists at the
    cluster's newest: the same pods, so both are SYNCED; a pod one of them has not applied
    makes it STALE. Both name the cluster by its kube-system namespace's uid."""
    with FakeApiServer(bookmark_interval=3600) as api:
        api.create("Namespace", {"metadata": {"name": "default"}})
        system = api.create("Namespace", {"metadata": {"name": "kube-system"}})
        api.create("Pod", pod("a", "10.244.1.2"))
        quiet, late = Agent(api, "node1"), Agent(api, "node2")
        try:
            quiet.start()
            before = quiet.pods_revision()
            moved = api.create("Service", {"metadata": {"name": "web"}, "spec": {"ports": []}})
            late.start()  # lists pods at the Service's revision: no pod changed
            old, new = quiet.status(), late.status()
            assert int(new["state"]["applied"]["pods"]["resource_version"]) >= int(
                moved["metadata"]["resourceVersion"]
            )
            assert quiet.pods_revision() == before  # no event, no bookmark: the revision stays
            rows = compare([Answer("node1", "a", status=old), Answer("node2", "b", status=new)])
            assert [r["columns"]["PODS"] for r in rows] == [SYNCED, SYNCED]
            uid = system["metadata"]["uid"]
            assert old["state"]["cluster_id"] == new["state"]["cluster_id"] == uid

            late.source.stop()  # node2 stops following: a new pod reaches only node1
            created = api.create("Pod", pod("b", "10.244.1.3"))
            wanted = int(created["metadata"]["resourceVersion"])
            wait_for(lambda: quiet.pods_revision() >= wanted)
            rows = compare(
                [
                    Answer("node1", "a", status=quiet.status()),
                    Answer("node2", "b", status=late.status()),
                ]
            )
            assert rows[0]["columns"]["PODS"] == SYNCED
            assert rows[1]["columns"]["PODS"].startswith(f"{STALE} -")
        finally:
            quiet.stop()
            late.stop()
