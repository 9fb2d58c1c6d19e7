"""``nodemesh proxy-status``'s comparison, sans-IO: agents' ``/status`` answers in, verdicts out."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

import pytest

from agent.admin.api import certificates_summary
from agent.admin.client import AdminError
from agent.admin.sync import (
    ABSENT,
    NOT_READY,
    STALE,
    SYNCED,
    UNREACHABLE,
    Answer,
    Target,
    Verdict,
    compare,
    format_rows,
    targets_of,
)

KUBE_RESOURCES = (
    "pods",
    "namespaces",
    "services",
    "endpointslices",
    "authorizationpolicies",
    "peerauthentications",
    "trafficpolicies",
    "ratelimitpolicies",
    "httpfaults",
    "httproutes",
    "grpcroutes",
)


def kube(
    node: str, rv: int, *, cluster: dict[str, str] | None = None, **override: dict[str, Any]
) -> Answer:
    """An agent whose every resource is at revision ``rv``, but for ``override``; of the
    cluster ``cluster`` (``trust_domain``, ``cluster_id``), else of an agent that says none."""
    applied: dict[str, dict[str, Any]] = {
        r: {"resource_version": str(rv), "synced": True, "absent": False} for r in KUBE_RESOURCES
    }
    for resource, entry in override.items():
        applied[resource] = {**applied[resource], **entry}
    state = {"version": 7, "applied_at": None, "source": "kubernetes", "applied": applied}
    status = {
        "node": node,
        "version": "0.1.0",
        "ready": True,
        "state": {**state, **(cluster or {})},
        "certificates": {"identities": 2, "available": 2, "soonest_expiry": None},
    }
    return Answer(node, "127.0.0.1:15000", status=status)


def lab(node: str, sha: str, modified: str, path: str | None = None, **state: str) -> Answer:
    """A cluster-file agent; ``path``: the document it follows (else it names none)."""
    applied = {"cluster-file": {"sha256": sha, "modified": modified, "synced": True}}
    named = {} if path is None else {"path": path}
    status = {
        "node": node,
        "version": "0.1.0",
        "ready": True,
        "state": {"version": 3, "source": "file", "applied": applied, **named, **state},
        "certificates": {"identities": 1, "available": 1, "soonest_expiry": None},
    }
    return Answer(node, "127.0.0.1:15000", status=status)


def verdicts(row: dict[str, Any]) -> dict[str, tuple[str, float | None]]:
    return {r: (v["verdict"]["state"], v["verdict"]["behind"]) for r, v in row["resources"].items()}


def test_an_agent_behind_the_newest_revision_is_stale_by_the_difference() -> None:
    behind = kube("node1", 120, pods={"resource_version": "100"})
    ahead = kube("node2", 120)
    rows = compare([behind, ahead])
    assert verdicts(rows[0])["pods"] == (STALE, 20)
    assert verdicts(rows[0])["services"] == (SYNCED, None)
    assert all(v == (SYNCED, None) for v in verdicts(rows[1]).values())
    assert rows[0]["columns"]["PODS"] == "STALE -20"
    assert rows[0]["columns"]["SERVICES"] == SYNCED
    assert rows[1]["columns"]["PODS"] == SYNCED


def test_an_agent_holding_the_newest_objects_at_an_older_revision_is_synced() -> None:
    """Watching an unchanged resource, an agent's revision stays where the last event left it
    while another agent lists at a newer one: the same objects (digest), so in sync."""
    quiet = kube("node1", 120, pods={"resource_version": "100", "digest": "d1"})
    listed = kube("node2", 120, pods={"digest": "d1"})
    rows = compare([quiet, listed])
    assert verdicts(rows[0])["pods"] == (SYNCED, None)
    assert rows[0]["columns"]["PODS"] == SYNCED


def test_an_agent_holding_other_objects_at_an_older_revision_is_stale() -> None:
    missed = kube("node1", 120, pods={"resource_version": "100", "digest": "d0"})
    listed = kube("node2", 120, pods={"digest": "d1"})
    same_late = kube("node3", 120, pods={"resource_version": "110", "digest": "d1"})
    rows = compare([missed, listed, same_late])
    assert verdicts(rows[0])["pods"] == (STALE, 20)
    assert verdicts(rows[1])["pods"] == (SYNCED, None)
    assert verdicts(rows[2])["pods"] == (SYNCED, None)


def test_agents_of_two_clusters_are_compared_within_their_own() -> None:
    """Two clusters' revisions are unrelated counters: each agent is compared with its own
    cluster's, and the table says which cluster each row is of."""
    one = {"trust_domain": "cluster.local", "cluster_id": "uid-one"}
    two = {"trust_domain": "cluster.local", "cluster_id": "uid-two"}
    rows = compare(
        [
            kube("a1", 100, cluster=one),
            kube("b1", 5000, cluster=two),
            kube("a2", 90, cluster=one),
        ]
    )
    assert [r["columns"]["PODS"] for r in rows] == [SYNCED, SYNCED, "STALE -10"]
    assert rows[1]["cluster"] == {"trust_domain": "cluster.local", "id": "uid-two"}
    text = format_rows(rows, dt.datetime(2026, 12, 6, tzinfo=dt.UTC)).splitlines()
    assert text[0].split()[:3] == ["NODE", "CLUSTER", "SOURCE"]
    assert [line.split()[1] for line in text[1:4]] == ["1", "2", "1"]
    assert (
        "cluster 2: trust domain cluster.local, API server's kube-system namespace uid "
        "uid-two" in text
    )
    assert "agents of 2 clusters: each is compared only with the agents of its own cluster" in text
    # one cluster: no CLUSTER column
    single = format_rows(
        compare([kube("a1", 1, cluster=one), kube("a2", 1, cluster=one)]),
        dt.datetime(2026, 12, 6, tzinfo=dt.UTC),
    )
    assert "CLUSTER" not in single and "clusters" not in single


def test_an_agent_older_than_the_cluster_id_joins_its_trust_domains_one_cluster() -> None:
    """In a rolling upgrade the agents not yet upgraded say no ``cluster_id``: they are compared
    with the upgraded ones of their trust domain, not shown as a cluster of their own."""
    one = {"trust_domain": "cluster.local", "cluster_id": "uid-one"}
    old = {"trust_domain": "cluster.local"}
    rows = compare([kube("new", 100, cluster=one), kube("old", 90, cluster=old)])
    assert [r["columns"]["PODS"] for r in rows] == [SYNCED, "STALE -10"]
    assert rows[1]["cluster"] == {"trust_domain": "cluster.local", "id": "uid-one"}
    assert "CLUSTER" not in format_rows(rows, dt.datetime(2026, 12, 6, tzinfo=dt.UTC))
    # with two clusters in its trust domain it cannot be placed: it stays apart
    two = {"trust_domain": "cluster.local", "cluster_id": "uid-two"}
    rows = compare(
        [kube("a", 100, cluster=one), kube("b", 5000, cluster=two), kube("old", 90, cluster=old)]
    )
    assert rows[2]["cluster"] == {"trust_domain": "cluster.local", "id": None}
    assert rows[2]["columns"]["PODS"] == SYNCED  # the only agent of its group
    # another trust domain's cluster does not take it in
    other = {"trust_domain": "example.org", "cluster_id": "uid-one"}
    rows = compare([kube("a", 100, cluster=other), kube("old", 90, cluster=old)])
    assert rows[1]["cluster"] == {"trust_domain": "cluster.local", "id": None}


def test_revisions_compare_as_numbers_not_strings() -> None:
    rows = compare([kube("node1", 99), kube("node2", 100)])
    assert verdicts(rows[0])["pods"] == (STALE, 1)
    assert verdicts(rows[1])["pods"] == (SYNCED, None)


def test_a_column_shows_the_worst_of_its_resources() -> None:
    rows = compare(
        [
            kube(
                "node1",
                50,
                httpfaults={"resource_version": "40"},
                trafficpolicies={"resource_version": None, "synced": False},
            ),
            kube("node2", 50),
        ]
    )
    assert rows[0]["columns"]["POLICIES"] == NOT_READY
    rows = compare([kube("node1", 50, httpfaults={"resource_version": "40"}), kube("node2", 50)])
    assert rows[0]["columns"]["POLICIES"] == "STALE -10"


def test_routes_not_served_are_absent_not_stale() -> None:
    gone = {"resource_version": None, "absent": True}
    rows = compare([kube("node1", 5, httproutes=gone, grpcroutes=gone), kube("node2", 5)])
    assert verdicts(rows[0])["httproutes"] == (ABSENT, None)
    assert rows[0]["columns"]["ROUTES"] == ABSENT


def test_relisting_after_gone_is_stale_by_an_unknown_amount() -> None:
    rows = compare([kube("node1", 5, pods={"resource_version": None}), kube("node2", 5)])
    assert verdicts(rows[0])["pods"] == (STALE, None)
    assert rows[0]["columns"]["PODS"] == "STALE (relisting)"


def test_cluster_documents_compare_by_hash_and_the_newest_time() -> None:
    old = lab("node1", "aa", "2026-12-06T22:00:00.000000Z")
    new = lab("node2", "bb", "2026-12-06T22:00:02.500000Z")
    same = lab("node3", "bb", "2026-12-06T22:00:02.500000Z")
    rows = compare([old, new, same])
    assert verdicts(rows[0])["cluster-file"] == (STALE, 2.5)
    assert verdicts(rows[1])["cluster-file"] == (SYNCED, None)
    assert verdicts(rows[2])["cluster-file"] == (SYNCED, None)
    # the document holds every kind: one column
    assert rows[0]["columns"] == {"DOCUMENT": "STALE -2.5s"}
    assert rows[1]["columns"] == {"DOCUMENT": SYNCED}


def test_cluster_file_agents_of_two_labs_of_one_trust_domain_are_two_clusters() -> None:
    """Two labs' agents (``--admin`` of both), one trust domain: their documents are unrelated
    (each lab's, its own modification times), so each agent is compared with its own lab's,
    told apart by the document they follow. Before, the trust domain alone grouped them: the
    lab whose document was older showed every agent STALE by the difference, in one cluster."""
    one, two = "/run/nodemesh/lab/one/cluster.yaml", "/run/nodemesh/lab/two/cluster.yaml"
    domain = {"trust_domain": "cluster.local"}
    rows = compare(
        [
            lab("a1", "aa", "2026-12-06T22:00:00.000000Z", one, **domain),
            lab("b1", "bb", "2026-12-06T22:05:00.000000Z", two, **domain),
            lab("a2", "aa", "2026-12-06T22:00:00.000000Z", one, **domain),
            lab("b2", "cc", "2026-12-06T22:04:00.000000Z", two, **domain),
        ]
    )
    assert [r["columns"]["DOCUMENT"] for r in rows] == [SYNCED, SYNCED, SYNCED, "STALE -60s"]
    assert rows[0]["cluster"] == {"trust_domain": "cluster.local", "id": f"file:{one}"}
    text = format_rows(rows, dt.datetime(2026, 12, 6, tzinfo=dt.UTC))
    assert [line.split()[:2] for line in text.splitlines()[1:5]] == [
        ["a1", "1"],
        ["b1", "2"],
        ["a2", "1"],
        ["b2", "2"],
    ]
    assert f"cluster 1: trust domain cluster.local, cluster file {one}" in text
    assert f"cluster 2: trust domain cluster.local, cluster file {two}" in text
    # one lab: one cluster, no CLUSTER column
    single = compare([lab("a1", "aa", "2026-12-06T22:00:00.000000Z", one, **domain)] * 2)
    assert "CLUSTER" not in format_rows(single, dt.datetime(2026, 12, 6, tzinfo=dt.UTC))


def test_an_unreachable_agent_is_a_row_and_the_others_still_compare() -> None:
    down = Answer("node3", "127.0.0.1:15000", error="connection refused")
    rows = compare([kube("node1", 9, pods={"resource_version": "8"}), down, kube("node2", 9)])
    assert rows[1]["reachable"] is False
    assert rows[1]["columns"] == {}
    assert verdicts(rows[0])["pods"] == (STALE, 1)
    text = format_rows(rows, dt.datetime(2026, 12, 6, tzinfo=dt.UTC))
    assert "node3: connection refused" in text
    assert text.splitlines()[2].split() == ["node3", UNREACHABLE, *["-"] * 7]
    # no DOCUMENT column: no agent has the file source
    assert text.splitlines()[0].split() == [
        "NODE",
        "SOURCE",
        "PODS",
        "SERVICES",
        "ENDPOINTS",
        "POLICIES",
        "ROUTES",
        "CERTS",
        "VERSION",
    ]  # fmt: skip


def test_certificates_show_the_count_and_the_soonest_expiry() -> None:
    certs = [
        {"state": "Available", "certificate": {"not_after": "2026-12-07T10:00:00+00:00"}},
        {"state": "Available", "certificate": {"not_after": "2026-12-06T23:30:00+00:00"}},
        {"state": "Pending", "certificate": None},
    ]
    summary = certificates_summary(certs)
    assert summary == {
        "identities": 3,
        "available": 2,
        "soonest_expiry": "2026-12-06T23:30:00+00:00",
    }
    answer = kube("node1", 1)
    assert answer.status is not None
    status = {**answer.status, "certificates": summary}
    rows = compare([Answer("node1", "a", status=status)])
    text = format_rows(rows, dt.datetime(2026, 12, 6, 22, 0, tzinfo=dt.UTC))
    assert "3 (1h30m)" in text


def test_verdict_text() -> None:
    assert Verdict(SYNCED).text() == "SYNCED"
    assert Verdict(STALE, 3).text() == "STALE -3"


def _args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"admin": None, "lab": None, **kw})


def test_targets_admin_repeated_else_the_lab_else_this_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NODEMESH_LAB", raising=False)
    got = targets_of(_args(admin=["127.0.0.1:1", "127.0.0.1:2"]))
    assert [t.address for t in got] == ["127.0.0.1:1", "127.0.0.1:2"]
    nodes = [Target("node1", "127.0.0.1:15000"), Target("node2", "127.0.0.1:15000")]
    assert targets_of(_args(), lambda name: nodes if name == "nm" else None) == nodes
    assert [t.address for t in targets_of(_args(), lambda _n: None)] == ["127.0.0.1:15000"]
    with pytest.raises(AdminError, match="no lab 'x' is up"):
        targets_of(_args(lab="x"), lambda _n: None)


def test_the_command_reads_agents_over_http_and_an_unreachable_one_is_a_row(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end on loopback: two agents (admin APIs over local-file sources of one document,
    as a lab's agents; one applied an older version of it) and an address where nothing
    listens; exit 1, every agent a row."""
    import asyncio
    import json
    import os
    import threading

    from agent.admin.api import AdminSources
    from agent.admin.component import AdminComponent
    from agent.admin.sync import run
    from agent.sources.localfile import LocalFileSource
    from agent.state import StateStore

    doc = "nodes:\n  - name: node{n}\n    pods: []\n"
    sources, components = [], []
    path = tmp_path / "cluster.yaml"
    for n in (1, 2):
        path.write_text(doc.format(n=n))
        os.utime(path, ns=(n * 10**9, n * 10**9))  # node2's document is 1 s newer
        source = LocalFileSource(path, StateStore(), interval=3600)
        source.start()
        source.stop()  # stops following the file: node1 keeps the older document
        sources.append(source)
        components.append(
            AdminComponent(
                address=("127.0.0.1", 0),
                sources=AdminSources(
                    node=f"node{n}",
                    store=source.store,
                    config={},
                    not_ready=list,
                    drain=lambda: None,
                    state_source=source.describe,
                ),
            )
        )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        for c in components:
            asyncio.run_coroutine_threadsafe(c.start(), loop).result(10)
        admins = [f"127.0.0.1:{c.port}" for c in components] + ["127.0.0.1:1"]
        args = argparse.Namespace(admin=admins, lab=None, output="json", timeout=5.0)
        assert run(args) == 1
        rows = json.loads(capsys.readouterr().out)["agents"]
        assert [r["node"] for r in rows] == ["node1", "node2", "127.0.0.1:1"]
        assert rows[0]["columns"] == {"DOCUMENT": "STALE -1s"}
        assert rows[1]["columns"] == {"DOCUMENT": SYNCED}
        assert rows[2]["reachable"] is False and "connection refused" in rows[2]["error"]
        args.output = "table"
        assert run(args) == 1
        table = capsys.readouterr().out.splitlines()
        assert table[0].split() == ["NODE", "SOURCE", "DOCUMENT", "CERTS", "VERSION"]
        assert table[1].split()[:4] == ["node1", "file", "STALE", "-1s"]
        assert table[3].split() == ["127.0.0.1:1", UNREACHABLE, "-", "-", "-"]
    finally:
        for c in components:
            asyncio.run_coroutine_threadsafe(c.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        for source in sources:
            source.stop()


def test_an_agent_whose_source_refused_the_newest_input_says_so_under_the_table() -> None:
    """Both agents refused the edited cluster file alike, so both hold the previous document
    and compare SYNCED; the note says the newest input is not in force anywhere."""
    error = "cluster.yaml: policies[2].spec.action: 'REJECT' is not allowed"
    rows = compare(
        [lab(n, "aa", "2026-12-06T22:00:00.000000Z", last_error=error) for n in ("n1", "n2")]
    )
    assert [r["columns"] for r in rows] == [{"DOCUMENT": SYNCED}] * 2
    assert [r["source_error"] for r in rows] == [error, error]
    text = format_rows(rows, dt.datetime(2026, 12, 6, tzinfo=dt.UTC)).splitlines()
    assert text[-2:] == [
        f"{n}: its state source refused the newest input and keeps the state it had: {error}"
        for n in ("n1", "n2")
    ]
