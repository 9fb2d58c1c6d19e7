"""What the agents' admin APIs say about one workload: its pods, policies, certificates (pure).

The metrics name a workload by its canonical name (``agent.telemetry.labels``: the
``service.istio.io/canonical-name``, ``app.kubernetes.io/name`` or ``app`` label, else the pod
name) and namespace; the admin APIs list pods. This module joins the two:

* **pods** of ``namespace/name``: the state's workloads (every agent holds the whole state, so
  the first agent that answered is enough) whose canonical name and namespace are these;
* **policies**: the AuthorizationPolicy and PeerAuthentication objects that select one of
  those pods as the policy code does (``agent.policy.authz``: the pod's namespace or the root
  namespace, ``selector.matchLabels`` a subset of the pod's labels, no selector: all);
* **certificates**: what the agents hold for the pods' identities (only the agents of nodes
  running such a pod hold one; public facts only: the admin API never serves a key, and the
  page does not show the chain's PEM).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.policy.authz import selects_pod
from agent.telemetry.labels import CANONICAL_NAME_LABELS

WORKLOAD_POLICY_KINDS = ("AuthorizationPolicy", "PeerAuthentication")

Row = Mapping[str, Any]


@dataclass(frozen=True)
class AgentAnswer:
    """One agent's admin answers (``/workloads``, ``/policies``, ``/certs``), or why not."""

    agent: str  # how the page names the agent (the node, or its admin address)
    workloads: Sequence[Row] = ()
    policies: Sequence[Row] = ()
    certificates: Sequence[Row] = ()
    error: str | None = None


@dataclass(frozen=True)
class WorkloadInfo:
    pods: tuple[Row, ...]
    policies: tuple[Row, ...]
    certificates: tuple[tuple[str, Row], ...]  # (agent, entry of /certs)
    errors: tuple[str, ...] = field(default=())


def canonical_name(pod: Row) -> str:
    labels = pod.get("labels") or {}
    for key in CANONICAL_NAME_LABELS:
        if value := labels.get(key):
            return str(value)
    return str(pod.get("name", ""))


def workload_info(name: str, answers: Sequence[AgentAnswer]) -> WorkloadInfo:
    """The pods, policies and certificates of workload ``name`` (``namespace/name``)."""
    namespace, _, workload = name.partition("/")
    errors = tuple(f"{a.agent}: {a.error}" for a in answers if a.error)
    answered = [a for a in answers if a.error is None]
    state = answered[0] if answered else AgentAnswer("none")
    pods = tuple(
        p
        for p in state.workloads
        if p.get("namespace") == namespace and canonical_name(p) == workload
    )
    policies = tuple(
        p
        for p in state.policies
        if p.get("kind") in WORKLOAD_POLICY_KINDS and any(selects_pod(p, pod) for pod in pods)
    )
    identities = {p.get("identity") for p in pods}
    certificates = tuple(
        (a.agent, c) for a in answered for c in a.certificates if c.get("identity") in identities
    )
    return WorkloadInfo(pods, policies, certificates, errors)
