"""The local-file source loads the cluster document, follows edits and survives bad ones."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sources.localfile import LocalFileError, LocalFileSource
from agent.state import Snapshot, StateStore

DOC = """\
trustDomain: example.org
nodes:
  - name: node1
    pods:
      - {{name: client, namespace: default, serviceAccount: client, ip: 10.244.1.2,
         labels: {{app: client}}, annotations: {{nodemesh.io/mesh: {mesh}}}}}
      - {{name: server, namespace: default, serviceAccount: server, ip: 10.244.1.3,
         labels: {{app: server}}}}
services:
  - {{name: server, namespace: default, selector: {{app: server}},
     ports: [{{port: 80, targetPort: 8080}}], clusterIP: 10.96.0.10}}
policies:
  - apiVersion: nodemesh.io/v1alpha1
    kind: AuthorizationPolicy
    metadata: {{name: allow-client, namespace: default}}
    spec: {{action: {action}, rules: [{{from: [{{source: {{namespaces: [other]}}}}]}}]}}
"""


def _write(path: Path, text: str) -> None:
    """Atomic replace, as ``nodemesh lab annotate`` does."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _Changes:
    def __init__(self, store: StateStore, source: LocalFileSource | None = None) -> None:
        self.event = threading.Event()
        self.seen: list[Snapshot] = []
        self.errors: list[str | None] = []  # the source's error as each notification saw it
        self.source = source
        store.subscribe(self._on)

    def _on(self, snap: Snapshot, kinds: frozenset[str]) -> None:
        self.seen.append(snap)
        self.errors.append(self.source.last_error if self.source is not None else None)
        self.event.set()

    def wait(self) -> Snapshot:
        assert self.event.wait(10), "the store was not updated within 10 s"
        self.event.clear()
        return self.seen[-1]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Path, StateStore, LocalFileSource]]:
    path = tmp_path / "cluster.yaml"
    _write(path, DOC.format(mesh="enabled", action="ALLOW"))
    store = StateStore()
    source = LocalFileSource(path, store, interval=0.02)
    source.start()
    try:
        yield path, store, source
    finally:
        source.stop()


def test_start_loads_everything(cluster: tuple[Path, StateStore, LocalFileSource]) -> None:
    _, store, source = cluster
    snap = store.snapshot()
    assert source.ready and source.last_error is None
    assert snap.trust_domain == "example.org"
    assert snap.is_meshed(snap.workload_by_ip["10.244.1.2"])
    assert not snap.is_meshed(snap.workload_by_ip["10.244.1.3"])
    assert [e.ip for e in snap.service_by_ip["10.96.0.10"].endpoints] == ["10.244.1.3"]
    (policy,) = snap.policies_of("AuthorizationPolicy")
    assert policy.spec["action"] == "ALLOW"


def test_valid_edit_applied_and_bad_edit_keeps_previous_state(
    cluster: tuple[Path, StateStore, LocalFileSource], capsys: pytest.CaptureFixture[str]
) -> None:
    path, store, source = cluster
    changes = _Changes(store, source)
    start = time.monotonic()
    _write(path, DOC.format(mesh="disabled", action="ALLOW"))
    snap = changes.wait()
    latency = time.monotonic() - start
    assert not snap.is_meshed(snap.workload_by_ip["10.244.1.2"])
    assert snap.changed_keys == {"workloads": frozenset({"default/client"})}

    good = store.snapshot()
    _write(path, DOC.format(mesh="maybe", action="ALLOW"))
    _wait_for(lambda: source.last_error is not None)
    assert "cluster.yaml" in source.last_error  # type: ignore[operator]
    assert "nodes[0].pods[0].annotations" in source.last_error  # type: ignore[operator]
    _write(path, DOC.format(mesh="enabled", action="ALLOWED"))
    _wait_for(lambda: "policies[0].spec.action" in (source.last_error or ""))
    assert store.snapshot() is good

    _write(path, DOC.format(mesh="enabled", action="DENY"))
    snap = changes.wait()
    assert source.last_error is None
    # a subscriber told of the fixed file's state already sees the error gone
    assert changes.errors[-1] is None
    assert [p.spec["action"] for p in snap.policies_of("AuthorizationPolicy")] == ["DENY"]
    with capsys.disabled():
        print(
            f"\nlocal-file source: file edit -> store notified in {latency * 1000:.1f} ms "
            f"(poll interval {source.interval * 1000:.0f} ms)"
        )


def _wait_for(condition: object) -> None:
    deadline = time.monotonic() + 10
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met within 10 s"
        time.sleep(0.01)


def test_start_refuses_an_invalid_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("nodes: []\n")
    with pytest.raises(LocalFileError, match=r"cluster\.yaml.*nodes"):
        LocalFileSource(path, StateStore()).start()


def test_deleted_file_keeps_state_until_it_returns(
    cluster: tuple[Path, StateStore, LocalFileSource],
) -> None:
    path, store, source = cluster
    before = store.snapshot()
    changes = _Changes(store)
    path.unlink()
    time.sleep(0.1)
    assert store.snapshot() is before
    _write(path, DOC.format(mesh="disabled", action="ALLOW"))
    assert changes.wait().version == before.version + 1
    assert source.loads == 2


def test_inotify_notices_an_edit_long_before_the_poll(tmp_path: Path) -> None:
    """With a one-minute poll, only the directory watch can deliver the edit within the wait."""
    path = tmp_path / "cluster.yaml"
    _write(path, DOC.format(mesh="enabled", action="ALLOW"))
    store = StateStore()
    source = LocalFileSource(path, store, interval=60)
    source.start()
    try:
        changes = _Changes(store)
        _write(path, DOC.format(mesh="disabled", action="ALLOW"))
        snap = changes.wait()
        assert not snap.is_meshed(snap.workload_by_ip["10.244.1.2"])
    finally:
        source.stop()


ROUTED = """\
nodes:
  - name: node1
    pods:
      - {name: server, namespace: default, ip: 10.244.1.3, labels: {app: server}}
services:
  - {name: web, namespace: default, selector: {app: server},
     ports: [{port: 80, targetPort: 8080, name: http}]}
routes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: web, namespace: default}
    spec:
      parentRefs: [{group: "", kind: Service, name: web}]
      rules: [{backendRefs: [{name: web, port: 80}]}]
"""


def test_routes_are_loaded_and_removed_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    _write(path, ROUTED)
    store = StateStore()
    source = LocalFileSource(path, store, interval=0.02)
    source.start()
    try:
        assert list(store.snapshot().routes) == [("HTTPRoute", "default", "web")]
        _write(path, ROUTED.split("routes:")[0])
        _wait_for(lambda: not store.snapshot().routes)
    finally:
        source.stop()


def test_applied_is_the_hash_of_the_document_in_force(tmp_path: Path) -> None:
    """``/status``'s ``state.applied`` (``nodemesh proxy-status``): the sha256 of the document
    applied, kept through a bad edit (the previous state stays in force), moved by a good one."""
    import hashlib

    path = tmp_path / "cluster.yaml"
    first = DOC.format(mesh="enabled", action="ALLOW")
    _write(path, first)
    source = LocalFileSource(path, StateStore(), interval=3600)  # reloads only when told
    source.start()
    try:
        entry = source.describe()["applied"]["cluster-file"]  # type: ignore[index]
        assert entry["sha256"] == hashlib.sha256(first.encode()).hexdigest()
        assert entry["synced"] is True and entry["modified"].endswith("Z")
        _write(path, "nodes: [")
        assert not source.reload()
        assert source.applied()["cluster-file"]["sha256"] == entry["sha256"]
        second = DOC.format(mesh="disabled", action="ALLOW")
        _write(path, second)
        assert source.reload()
        got = source.applied()["cluster-file"]["sha256"]
        assert got == hashlib.sha256(second.encode()).hexdigest()
    finally:
        source.stop()
