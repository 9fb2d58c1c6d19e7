"""PeerAuthentication: does a meshed workload accept plaintext on a port (PERMISSIVE) or not.

Resolution follows Istio: the most specific policy wins, and ``UNSET`` inherits from the next
scope out. Scopes, most specific first: a policy with a ``selector`` in the workload's namespace
(its ``portLevelMtls`` entry for the port, then its ``mtls.mode``), a policy without selector in
the workload's namespace, a policy without selector in the root namespace (mesh-wide), and finally
PERMISSIVE. When several policies compete at one scope (Istio picks the oldest; the state keeps no
creation time) the one with the smallest name wins, so every agent resolves the same way.

Only the inbound plaintext path (15006) consults this: HBONE is mTLS whatever the mode.

A policy annotated ``nodemesh.io/dry-run`` or ``istio.io/dry-run: "true"`` is left out: dry-run
means "not enforced" for every nodemesh kind, and a trial STRICT must not start refusing
plaintext. (Istio has no dry-run for PeerAuthentication and would enforce it.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.policy.authz import DEFAULT_ROOT_NAMESPACE
from agent.state.model import PolicyObject, Workload

KIND = "PeerAuthentication"
STRICT = "STRICT"
PERMISSIVE = "PERMISSIVE"
UNSET = "UNSET"


@dataclass(frozen=True, slots=True)
class _Compiled:
    namespace: str
    name: str
    selector: Mapping[str, str] | None
    mode: str
    ports: Mapping[int, str]

    def selects(self, workload: Workload) -> bool:
        sel = self.selector or {}
        return all(workload.labels.get(k) == v for k, v in sel.items())


def _compile(policy: PolicyObject) -> _Compiled:
    spec: Mapping[str, Any] = policy.spec
    selector = spec.get("selector")
    mode = (spec.get("mtls") or {}).get("mode", UNSET)
    ports = {int(k): v.get("mode", UNSET) for k, v in (spec.get("portLevelMtls") or {}).items()}
    labels = selector.get("matchLabels") if selector else None
    return _Compiled(policy.namespace, policy.name, labels, mode, ports)


class PeerAuthenticator:
    """All PeerAuthentications of one state version, compiled."""

    def __init__(self, policies: Sequence[_Compiled], *, root_namespace: str) -> None:
        self._policies = sorted(policies, key=lambda p: (p.namespace, p.name))
        self.root_namespace = root_namespace

    @classmethod
    def compile(
        cls, policies: Iterable[PolicyObject], *, root_namespace: str = DEFAULT_ROOT_NAMESPACE
    ) -> PeerAuthenticator:
        enforced = [_compile(p) for p in policies if p.kind == KIND and not p.dry_run]
        return cls(enforced, root_namespace=root_namespace)

    def mode(self, workload: Workload, port: int) -> str:
        """STRICT or PERMISSIVE for plaintext arriving at ``workload`` on ``port``."""
        for scope in self._scopes(workload):
            for p in scope:
                mode = p.ports.get(port, UNSET) if p.selector else UNSET
                if mode == UNSET:
                    mode = p.mode
                if mode != UNSET:
                    return mode
                break  # the winner of this scope said UNSET: inherit from the next scope
        return PERMISSIVE

    def _scopes(self, workload: Workload) -> list[list[_Compiled]]:
        ns = workload.namespace
        return [
            [p for p in self._policies if p.namespace == ns and p.selector and p.selects(workload)],
            [p for p in self._policies if p.namespace == ns and not p.selector],
            [p for p in self._policies if p.namespace == self.root_namespace and not p.selector],
        ]
