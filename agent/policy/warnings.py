"""What the mesh accepts but would silently ignore or never match: warnings, never refusals.

Two kinds of input are well formed yet almost certainly not what their author meant:

* a pod annotation under ``nodemesh.io/`` that no agent reads (``nodemesh.io/http-port`` for
  ``nodemesh.io/http-ports``): the pod is meshed as if it were absent;
* an AuthorizationPolicy value that can never match (``methods: ["get"]``, a path ``/a/*/b``,
  a principal ``default/client``; ``agent.policy.authz.never_matching``), which Istio accepts too.

Neither is refused. An agent older than the manifest must not break pods that carry an
annotation a newer agent reads, and a refused policy would be enforced as its fail-closed
stand-in, changing traffic for a policy Istio accepts. So they are warnings, and one function
per input decides them for every place that shows them: the lab (which refuses unknown
annotations in its own topology files, where nothing older can read them), ``nodemesh
policies``, and the agent's Kubernetes source, which records them as Events of type Warning on
the object (``kubectl describe``). Pure functions: no I/O, same answer everywhere.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.policy.authz import never_matching
from agent.state.model import (
    EXCLUDE_INBOUND_ANNOTATION,
    EXCLUDE_OUTBOUND_ANNOTATION,
    HTTP_PORTS_ANNOTATION,
    MESH_ANNOTATION,
)

ANNOTATION_PREFIX = "nodemesh.io/"
# The pod annotations the mesh reads (Istio's analyzer reports unknown ones likewise, IST0108).
POD_ANNOTATIONS = (
    MESH_ANNOTATION,
    EXCLUDE_OUTBOUND_ANNOTATION,
    EXCLUDE_INBOUND_ANNOTATION,
    HTTP_PORTS_ANNOTATION,
)
UNKNOWN_ANNOTATION = "UnknownAnnotation"  # the Event reasons, CamelCase as Kubernetes writes them
NEVER_MATCHES = "NeverMatches"


@dataclass(frozen=True)
class ConfigWarning:
    """One warning: ``reason`` is the Event's, ``message`` names the value, why, and the fix."""

    reason: str
    message: str


def unknown_annotation(key: str) -> str | None:
    """Why ``key`` on a pod does nothing (an unread ``nodemesh.io/`` key), or None.

    The near miss is named first: a typo is far likelier than a key from the future."""
    if not key.startswith(ANNOTATION_PREFIX) or key in POD_ANNOTATIONS:
        return None
    names = {known.removeprefix(ANNOTATION_PREFIX): known for known in POD_ANNOTATIONS}
    # Compared without the shared prefix, which would make every pair look alike.
    close = difflib.get_close_matches(key.removeprefix(ANNOTATION_PREFIX).lower(), names, n=1)
    hint = f" (did you mean {names[close[0]]}?)" if close else ""
    return f"unknown nodemesh annotation{hint}; a pod's are {', '.join(POD_ANNOTATIONS)}"


def pod_warnings(annotations: Mapping[str, str]) -> list[ConfigWarning]:
    """The warnings of a pod's annotations, in key order (so equal pods warn equally)."""
    return [
        ConfigWarning(UNKNOWN_ANNOTATION, f"annotation {key}: {why}; this agent ignores it")
        for key in sorted(annotations)
        if (why := unknown_annotation(key)) is not None
    ]


def policy_warnings(kind: str, spec: Mapping[str, Any]) -> list[ConfigWarning]:
    """The warnings of a policy's (validated) ``spec``: values of an AuthorizationPolicy that
    can never match; other kinds have none."""
    if kind != "AuthorizationPolicy":
        return []
    return [ConfigWarning(NEVER_MATCHES, why) for why in never_matching(spec)]
