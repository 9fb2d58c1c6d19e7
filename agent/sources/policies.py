"""Policy manifests inside a cluster document.

The document carries full ``nodemesh.io/v1alpha1`` manifests, exactly as ``kubectl apply`` would
take them, so that a policy tried in the lab can be applied to a cluster unchanged. Only the
envelope (apiVersion, kind, metadata, spec) is checked here; the spec of each kind is validated
against the CRD schemas by ``agent.policy.schema`` once it exists, and until then by the agent's
policy compiler when it loads the state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.sources.fields import DocumentError, Fields, check_unique
from agent.state.model import PolicyObject

API_VERSION = "nodemesh.io/v1alpha1"
POLICY_KINDS = ("AuthorizationPolicy", "PeerAuthentication", "TrafficPolicy")
_MANIFEST_KEYS = ("apiVersion", "kind", "metadata", "spec")
_METADATA_KEYS = ("name", "namespace", "labels", "annotations", "generation", "uid")


def validate_envelope(manifest: object, *, source: str, path: str) -> PolicyObject:
    """Check a manifest's apiVersion, kind and metadata and return its ``PolicyObject``."""
    f = Fields(manifest, source=source, path=path, allowed=_MANIFEST_KEYS)
    api_version = f.string("apiVersion")
    if api_version != API_VERSION:
        f.fail("apiVersion", f"{api_version!r} is not supported: use {API_VERSION}")
    kind = f.string("kind")
    if kind not in POLICY_KINDS:
        f.fail(
            "kind", f"{kind!r} is not a nodemesh policy kind: use one of {', '.join(POLICY_KINDS)}"
        )
    meta = Fields(f.raw("metadata"), source=source, path=f.at("metadata"), allowed=_METADATA_KEYS)
    spec = f.raw("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        f.fail("spec", "expected a mapping (the policy's spec)")
    generation = meta.raw("generation") or 0
    if not isinstance(generation, int):
        meta.fail("generation", f"expected an integer, got {generation!r}")
    return PolicyObject(
        kind=kind,
        namespace=meta.name("namespace", default="default"),
        name=meta.subdomain("name"),
        spec=spec,
        generation=generation,
        uid=str(meta.raw("uid") or ""),
    )


def parse_policies(
    source: str, items: list[tuple[str, object]]
) -> tuple[tuple[PolicyObject, ...], tuple[Mapping[str, Any], ...]]:
    """All policies of a document, with the manifests as written; duplicates are refused."""
    policies = tuple(validate_envelope(item, source=source, path=path) for path, item in items)
    check_unique(
        source,
        "policy",
        [(f"{path}.metadata.name", p.key) for (path, _), p in zip(items, policies, strict=True)],
    )
    manifests: tuple[Mapping[str, Any], ...] = tuple(item for _, item in items)  # type: ignore[misc]
    return policies, manifests


__all__ = ["API_VERSION", "POLICY_KINDS", "DocumentError", "parse_policies", "validate_envelope"]
