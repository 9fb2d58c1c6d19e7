"""Kubernetes resource words as ``kubectl`` and Linkerd users type them (``deploy/web``).

``linkerd viz stat deploy/web`` and ``linkerd viz tap deploy/web`` name a pod controller; the
mesh's metrics and request records name a *workload* by its canonical name, which is by default
the controller's name (``agent.telemetry.labels``), so the controller words mean a workload
here. ``pod`` is left out on purpose: a pod's name is not its workload's name.
"""

from __future__ import annotations

WORKLOAD = "workload"
SERVICE = "service"

KINDS: dict[str, str] = {
    **dict.fromkeys(
        ("workload", "workloads", "deploy", "deployment", "deployments", "sts", "statefulset",
         "statefulsets", "ds", "daemonset", "daemonsets"),
        WORKLOAD,
    ),
    **dict.fromkeys(("service", "services", "svc"), SERVICE),
}  # fmt: skip


class ResourceError(ValueError):
    """A resource word nodemesh does not know; the message lists the known ones."""


def resource_kind(word: str) -> str:
    """``WORKLOAD`` or ``SERVICE`` for a resource word (``deploy``, ``svc``...)."""
    kind = KINDS.get(word.lower())
    if kind is None:
        raise ResourceError(
            f"{word!r} is no resource nodemesh knows: use workload or service (or deploy, sts, "
            "ds, svc), optionally as TYPE/NAME"
        )
    return kind


def split_resource(text: str) -> tuple[str, str | None]:
    """``deploy/web`` → (``workload``, ``web``); ``svc`` → (``service``, None)."""
    word, slash, name = text.partition("/")
    return resource_kind(word), (name or None) if slash else None
