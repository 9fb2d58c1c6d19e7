"""The Kubernetes API calls of the CA's Kubernetes mode: caller checks behind
``agent.ca.auth.KubeCluster``, the root in a Secret and the trust bundle in a ConfigMap.

Kept apart so that the authentication logic and the storage layout (``agent.ca.storage``) are
tested without an API server, and so that this is the only CA module importing the official
client. Pods are listed per check (field selector on
the node) rather than cached: issuance is rare (once per identity per half lifetime per node) and
a fresh answer cannot be fooled by a stale cache after a pod moved.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from typing import Any

from agent.ca.auth import TokenReview
from agent.ca.authority import Authority, AuthorityError
from agent.ca.storage import ROOT_FILE, authority_from, new_material
from agent.identity.keysmith import to_pem

log = logging.getLogger(__name__)


class KubeApiError(RuntimeError):
    """An API call the CA needs failed; the message names the call and the status."""


class ApiServerCluster:
    def __init__(self, api_client: Any, audiences: list[str] | None = None) -> None:
        from kubernetes import client

        self._core = client.CoreV1Api(api_client)
        self._authn = client.AuthenticationV1Api(api_client)
        self._audiences = audiences or []

    @property
    def core(self) -> Any:
        return self._core

    def review_token(self, token: str) -> TokenReview:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        body = client.V1TokenReview(
            spec=client.V1TokenReviewSpec(token=token, audiences=self._audiences or None)
        )
        try:
            status = self._authn.create_token_review(body).status
        except ApiException as e:
            raise KubeApiError(
                f"TokenReview failed ({e.status} {e.reason}); the CA's service account needs "
                "permission to create tokenreviews.authentication.k8s.io"
            ) from e
        user = status.user
        return TokenReview(
            authenticated=bool(status.authenticated),
            username=(user.username or "") if user else "",
            extra=(user.extra or {}) if user else {},
            error=status.error or "",
        )

    def pod_node(self, namespace: str, name: str) -> str | None:
        from kubernetes.client.exceptions import ApiException

        try:
            pod = self._core.read_namespaced_pod(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise KubeApiError(f"reading pod {namespace}/{name} failed: {e.status}") from e
        node: str | None = pod.spec.node_name
        return node

    def has_pod_on(self, node: str, namespace: str, service_account: str) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            pods = self._core.list_namespaced_pod(namespace, field_selector=f"spec.nodeName={node}")
        except ApiException as e:
            raise KubeApiError(f"listing pods of {namespace} on {node} failed: {e.status}") from e
        return any(
            (p.spec.service_account_name or "default") == service_account
            and (p.status.phase or "") not in ("Succeeded", "Failed")
            for p in pods.items
        )


def _read_or_create(read: Callable[[], Any], create: Callable[[], Any], where: str) -> Any:
    """The object ``read`` returns, created with ``create`` first if absent. A 409 on create
    means another replica created it in between: read theirs, so all replicas agree."""
    from kubernetes.client.exceptions import ApiException

    try:
        return read()
    except ApiException as e:
        if e.status != 404:
            raise AuthorityError(f"cannot read {where}: {e.status} {e.reason}") from e
    try:
        created = create()
        log.info("created %s", where)
        return created
    except ApiException as e:
        if e.status != 409:
            raise AuthorityError(f"cannot create {where}: {e.status} {e.reason}") from e
    log.info("another CA replica created %s first; using it", where)
    return read()


def load_or_create_secret(core_v1: Any, namespace: str, name: str, trust_domain: str) -> Authority:
    """Read the root Secret, creating it with a new self-signed root if absent."""
    from kubernetes.client import V1ObjectMeta, V1Secret

    def create() -> Any:
        body = V1Secret(
            metadata=V1ObjectMeta(name=name, namespace=namespace),
            type="Opaque",
            data={k: base64.b64encode(v).decode() for k, v in new_material(trust_domain).items()},
        )
        return core_v1.create_namespaced_secret(namespace, body)

    where = f"Secret {namespace}/{name}"
    secret = _read_or_create(lambda: core_v1.read_namespaced_secret(name, namespace), create, where)
    data = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
    return authority_from(data, where=where)


def publish_bundle_configmap(core_v1: Any, namespace: str, name: str, authority: Authority) -> None:
    """Keep ConfigMap ``namespace/name`` key ``root.pem`` equal to the trust bundle.

    Agents mount it as ``--ca-root``: it anchors both their TLS to the CA and, during a root
    rotation, the roots they must already trust before the CA switches signers.
    """
    from kubernetes.client import V1ConfigMap, V1ObjectMeta
    from kubernetes.client.exceptions import ApiException

    bundle = to_pem(list(authority.roots))
    where = f"ConfigMap {namespace}/{name}"
    current = _read_or_create(
        lambda: core_v1.read_namespaced_config_map(name, namespace),
        lambda: core_v1.create_namespaced_config_map(
            namespace,
            V1ConfigMap(
                metadata=V1ObjectMeta(name=name, namespace=namespace), data={ROOT_FILE: bundle}
            ),
        ),
        where,
    )
    if (current.data or {}).get(ROOT_FILE) == bundle:
        return
    current.data = {**(current.data or {}), ROOT_FILE: bundle}
    try:
        core_v1.replace_namespaced_config_map(name, namespace, current)
    except ApiException as e:
        raise AuthorityError(
            f"cannot update {where}: {e.status} {e.reason} (another CA replica may be publishing "
            "a different root; check that all replicas read the same root Secret)"
        ) from e
    log.info("updated the trust bundle in %s", where)
