"""Writing ``status.parents`` of Gateway API routes back.

Who writes: the one agent per cluster that holds the route-status Lease
(``agent.sources.lease``; ``KubeSource.report_routes`` passes ``write`` only while it leads).
Every agent computes the status all the same (and logs refused routes), so a new holder writes
what changed meanwhile at once. The writes keep the rules that made them safe before there
was a single writer, and still matter around a hand-over:

* the status is a pure function of the route and the Services (``agent.policy.routes``), so
  agents with the same view compute the same bytes, and an agent writes only when what the
  object already says differs (``merged_parents`` returns ``None``): after the first write the
  others find it done and send nothing;
* each write carries the ``resourceVersion`` the agent computed from, so of several agents
  racing on the same change one succeeds and the others get a 409 and stop: the watch brings
  them the new object and they find nothing left to write. A stale agent (one that has not
  seen a Service yet) cannot overwrite a newer object blindly, and once views converge, so do
  the writes.

With the Lease, the racing writes of the first moment (N requests, one accepted) are one, and
status never depends on one component: any agent can take the Lease over.

A refused route is also logged, once per generation and message.
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from agent.policy.routes import Rejected, RouteTable, merged_parents
from agent.policy.routes.model import RouteKey
from agent.state.snapshot import Snapshot

log = logging.getLogger(__name__)

Raw = Mapping[str, Any]
# (kind, namespace, name, merge patch) -> None; raises ``StatusConflict`` on a 409.
Patch = Callable[[str, str, str, dict[str, Any]], None]


class StatusConflict(Exception):
    """The object changed since it was read (409): its watch event brings the new one."""


class RouteStatusWriter:
    """Keeps each route's ``status.parents`` in step with the verdicts of the current state."""

    def __init__(self, patch: Patch) -> None:
        self._patch = patch
        self._lock = threading.Lock()
        self._seen: dict[RouteKey, tuple[str, list[Raw]]] = {}  # resourceVersion, parents
        self._logged: dict[RouteKey, tuple[int, str]] = {}
        self.writes = 0
        self.conflicts = 0

    def observe(self, kind: str, obj: Raw, deleted: bool) -> None:
        """The route as the API server holds it now (from the list or a watch event)."""
        meta = obj.get("metadata") or {}
        key = (kind, str(meta.get("namespace")), str(meta.get("name")))
        with self._lock:
            if deleted:
                self._seen.pop(key, None)
                self._logged.pop(key, None)
                return
            parents = list((obj.get("status") or {}).get("parents") or ())
            self._seen[key] = (str(meta.get("resourceVersion") or ""), parents)

    def sync(self, snap: Snapshot, now: str | None = None, *, write: bool = True) -> None:
        """Compute every route's status and write those that differ (with ``write`` false,
        as for an agent told not to report status, only log the refused ones)."""
        now = now or datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        table = RouteTable.build(snap)
        with self._lock:
            for key in [k for k in self._seen if k not in snap.routes]:
                del self._seen[key]
            work = []
            for key, verdicts in table.verdicts.items():
                route = snap.routes[key]
                self._log_refusal(key, route.generation, table.compiled[key])
                rv, current = self._seen.get(key, ("", []))
                parents = merged_parents(
                    current,
                    verdicts,
                    route_namespace=route.namespace,
                    generation=route.generation,
                    now=now,
                )
                if parents is not None and rv and write:
                    body = {"metadata": {"resourceVersion": rv}, "status": {"parents": parents}}
                    work.append((key, body))
        for (kind, namespace, name), body in work:
            try:
                self._patch(kind, namespace, name, body)
                self.writes += 1
            except StatusConflict:
                self.conflicts += 1

    def _log_refusal(self, key: RouteKey, generation: int, compiled: object) -> None:
        if not isinstance(compiled, Rejected):
            return
        said = (generation, str(compiled.error))
        if self._logged.get(key) != said:
            self._logged[key] = said
            log.warning(
                "%s %s/%s is not applied: %s (nothing of it is programmed until it is fixed)",
                *key,
                compiled.error,
            )
