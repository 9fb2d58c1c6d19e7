"""The workload name the CLI matches a user's NAME against, read from ``/workloads`` (pure).

Metrics and requests name a workload by its pods' canonical name (``agent.telemetry.labels``:
``server`` for pods ``server-0``/``server-1``), not by a pod's name: ``nodemesh requests`` and
``nodemesh stat`` read that name off the admin API's workload views the same way, here.
"""

from __future__ import annotations

from collections.abc import Mapping

from agent.telemetry.labels import CANONICAL_NAME_LABELS


def canonical_name(view: Mapping[str, object]) -> str:
    """The workload name of one ``/workloads`` entry as the metrics and requests carry it."""
    labels = view.get("labels")
    for key in CANONICAL_NAME_LABELS:
        if isinstance(labels, Mapping) and (value := labels.get(key)):
            return str(value)
    return str(view.get("name", ""))
