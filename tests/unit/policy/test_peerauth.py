"""PeerAuthentication resolution: the most specific scope wins, UNSET inherits."""

from __future__ import annotations

from typing import Any

import pytest

from agent.policy.peerauth import PERMISSIVE, STRICT, PeerAuthenticator
from agent.state.model import PolicyObject
from tests.workloads import workload

POD = workload("server", "node1", "10.244.1.3", app="server")


def pa(
    mode: str,
    *,
    ns: str = "default",
    name: str = "p",
    sel: bool = False,
    ports: dict[str, str] | None = None,
    dry_run: bool = False,
) -> PolicyObject:
    spec: dict[str, Any] = {"mtls": {"mode": mode}}
    if sel:
        spec["selector"] = {"matchLabels": {"app": "server"}}
    if ports:
        spec["portLevelMtls"] = {k: {"mode": v} for k, v in ports.items()}
    return PolicyObject("PeerAuthentication", ns, name, spec, dry_run=dry_run)


CASES: list[tuple[str, list[PolicyObject], int, str]] = [
    ("default is permissive", [], 80, PERMISSIVE),
    ("dry-run strict is not enforced", [pa(STRICT, dry_run=True)], 80, PERMISSIVE),
    (
        "dry-run workload policy does not hide the namespace one",
        [pa(STRICT), pa(PERMISSIVE, sel=True, name="w", dry_run=True)],
        80,
        STRICT,
    ),
    ("mesh-wide strict", [pa(STRICT, ns="nodemesh-system")], 80, STRICT),
    ("namespace strict", [pa(STRICT)], 80, STRICT),
    ("other namespace ignored", [pa(STRICT, ns="other")], 80, PERMISSIVE),
    (
        "namespace overrides mesh",
        [pa(STRICT, ns="nodemesh-system"), pa(PERMISSIVE, name="ns")],
        80,
        PERMISSIVE,
    ),
    (
        "workload overrides namespace",
        [pa(STRICT), pa(PERMISSIVE, sel=True, name="w")],
        80,
        PERMISSIVE,
    ),
    ("UNSET inherits from namespace", [pa(STRICT), pa("UNSET", sel=True, name="w")], 80, STRICT),
    ("UNSET inherits from mesh", [pa(STRICT, ns="nodemesh-system"), pa("UNSET")], 80, STRICT),
    ("port level wins", [pa(PERMISSIVE, sel=True, ports={"8080": STRICT})], 8080, STRICT),
    (
        "port level only for that port",
        [pa(PERMISSIVE, sel=True, ports={"8080": STRICT})],
        80,
        PERMISSIVE,
    ),
    (
        "port UNSET falls back to workload mode",
        [pa(STRICT, sel=True, ports={"8080": "UNSET"})],
        8080,
        STRICT,
    ),
    ("first by name wins a tie", [pa(STRICT, name="a"), pa(PERMISSIVE, name="b")], 80, STRICT),
]


@pytest.mark.parametrize(
    ("policies", "port", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_mode(policies: list[PolicyObject], port: int, expected: str) -> None:
    assert PeerAuthenticator.compile(policies).mode(POD, port) == expected


def test_selector_not_matching_is_ignored() -> None:
    other = workload("db", "n", "10.0.0.9", app="db")
    assert PeerAuthenticator.compile([pa(STRICT, sel=True)]).mode(other, 80) == PERMISSIVE
