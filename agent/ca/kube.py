"""The Kubernetes API calls of the CA's Kubernetes mode, behind ``agent.ca.auth.KubeCluster``.

Kept apart so that the authentication logic is tested without an API server, and so that this is
the only CA module importing the official client. Pods are listed per check (field selector on
the node) rather than cached: issuance is rare (once per identity per half lifetime per node) and
a fresh answer cannot be fooled by a stale cache after a pod moved.
"""

from __future__ import annotations

from typing import Any

from agent.ca.auth import TokenReview


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
