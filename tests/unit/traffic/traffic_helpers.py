"""Helpers for the sans-IO traffic-control tests: a manual clock and validated policies."""

from __future__ import annotations

from typing import Any

from agent.policy.schema import validate_policy
from agent.state import PolicyObject


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def traffic_policy(
    spec: dict[str, Any], *, name: str = "tp", namespace: str = "default", generation: int = 1
) -> PolicyObject:
    """A TrafficPolicy as the sources hand it over: schema-validated, defaults applied."""
    manifest = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": name, "namespace": namespace, "generation": generation},
        "spec": {"targetRef": {"kind": "Service", "name": "server"}, **spec},
    }
    return validate_policy(manifest, path="test")
