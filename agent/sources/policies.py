"""Policy manifests inside a cluster document.

The document carries full ``nodemesh.io/v1alpha1`` manifests, exactly as ``kubectl apply`` would
take them, so that a policy tried in the lab applies to a cluster unchanged. Each one is validated
by ``agent.policy.schema`` against the same OpenAPI schemas the CRDs install, so the lab refuses
exactly what the API server would refuse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.policy.schema import PolicyError, validate_policy
from agent.sources.fields import DocumentError, check_unique, type_name
from agent.state.model import PolicyObject


def parse_policies(
    source: str, items: list[tuple[str, object]]
) -> tuple[tuple[PolicyObject, ...], tuple[Mapping[str, Any], ...]]:
    """All policies of a document, with the manifests as written; duplicates are refused."""
    policies = []
    manifests: list[Mapping[str, Any]] = []
    for path, item in items:
        if not isinstance(item, Mapping):
            raise DocumentError(source, path, f"expected a policy manifest, got {type_name(item)}")
        try:
            policies.append(validate_policy(item, path=path))
        except PolicyError as e:
            raise DocumentError(source, e.path, e.reason) from e
        manifests.append(item)
    check_unique(
        source,
        "policy",
        [(f"{path}.metadata.name", p.key) for (path, _), p in zip(items, policies, strict=True)],
    )
    return tuple(policies), tuple(manifests)
