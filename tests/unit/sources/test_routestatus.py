"""The route status writer without an API server: when it writes, and what a 409 does."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from agent.sources.routestatus import RouteStatusWriter, StatusConflict
from tests.unit.policy.routes_fixtures import NS, backend, mesh_services, route, snapshot

KEY = ("HTTPRoute", NS, "r")


def _raw(rv: str, parents: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    meta = {"name": "r", "namespace": NS, "resourceVersion": rv}
    return {"metadata": meta, "status": {"parents": parents or []}}


class _Api:
    def __init__(self, conflict: bool = False) -> None:
        self.patches: list[tuple[str, str, str, dict[str, Any]]] = []
        self.conflict = conflict

    def patch(self, kind: str, namespace: str, name: str, body: dict[str, Any]) -> None:
        if self.conflict:
            raise StatusConflict("the object has been modified")
        self.patches.append((kind, namespace, name, body))


def test_writes_only_what_it_has_read_and_only_when_it_differs() -> None:
    api = _Api()
    writer = RouteStatusWriter(api.patch)
    snap = snapshot(mesh_services(), [route("r", [{"backendRefs": [backend("echo-v1")]}])])
    writer.sync(snap)
    assert api.patches == []  # the route's current status is not known yet: nothing written
    writer.observe("HTTPRoute", _raw("7"), deleted=False)
    writer.sync(snap)
    ((kind, ns, name, body),) = api.patches
    assert (kind, ns, name) == KEY
    assert body["metadata"] == {"resourceVersion": "7"}  # a precondition, not a blind write
    writer.observe("HTTPRoute", _raw("8", body["status"]["parents"]), deleted=False)
    writer.sync(snap)
    assert len(api.patches) == 1 and writer.writes == 1


def test_a_conflict_is_counted_and_left_to_the_watch() -> None:
    api = _Api(conflict=True)
    writer = RouteStatusWriter(api.patch)
    writer.observe("HTTPRoute", _raw("7"), deleted=False)
    writer.sync(snapshot(mesh_services(), [route("r", [{}])]))
    assert (writer.writes, writer.conflicts) == (0, 1)


def test_without_status_reporting_a_refused_route_is_still_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = _Api()
    writer = RouteStatusWriter(api.patch)
    bad = route("r", [{"filters": [{"type": "CORS", "cors": {}}]}])
    writer.observe("HTTPRoute", _raw("7"), deleted=False)
    with caplog.at_level(logging.WARNING, logger="agent.sources.routestatus"):
        for _ in range(3):
            writer.sync(snapshot(mesh_services(), [bad]), write=False)
    assert api.patches == []
    (record,) = caplog.records
    assert "spec.rules[0].filters[0].type" in record.getMessage()
