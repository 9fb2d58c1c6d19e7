"""What the mesh accepts but would silently ignore or never match: warnings, never refusals.

Two kinds of input are well formed yet almost certainly not what their author meant:

* a pod annotation under ``nodemesh.io/`` that no agent reads (``nodemesh.io/http-port`` for
  ``nodemesh.io/http-ports``): the pod is meshed as if it were absent;
* an AuthorizationPolicy value that can never match (``methods: ["get"]``, a path ``/a/*/b``,
  a principal ``default/client``; ``agent.policy.authz.never_matching``), which Istio accepts too;
* a principal of another trust domain than the mesh's (``cluster.local/ns/x/sa/y`` in a mesh of
  ``example.org``: ``foreign_principals``), which no peer ever has;
* a policy whose ``selector`` selects no pod, or whose ``targetRef`` names no Service, where it
  is applied (``app: srever``; Istio's analyzer reports the first as IST0127): in a cluster the
  pod or Service may come later, so only the lab, which knows every pod, warns of it;
* a namespace label ``nodemesh.io/mesh`` with another value than ``enabled``/``disabled``
  (``true``, as ``istio-injection=enabled`` habits suggest): the namespace's pods are not
  meshed by it, as if it were absent;
* a Service port's ``appProtocol`` one letter from a protocol the mesh reads (``http3``,
  ``htttp``, ``grpcs``): Kubernetes allows any value and the mesh carries such a port as opaque
  TCP (``agent.state.protocols``), so an L7 policy, a route or request metrics meant for it
  would silently not apply.

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
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.policy.authz import (
    DEFAULT_ROOT_NAMESPACE,
    PRINCIPAL_FORM,
    matched_strings,
    never_matching,
    selects_pod,
)
from agent.state.model import (
    EXCLUDE_INBOUND_ANNOTATION,
    EXCLUDE_OUTBOUND_ANNOTATION,
    HTTP_PORTS_ANNOTATION,
    MESH_ANNOTATION,
    MESH_NAMESPACE_LABEL,
    MESH_VALUES,
)
from agent.state.protocols import APP_PROTOCOLS

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
UNREAD_APP_PROTOCOL = "UnreadAppProtocol"
NOTHING_SELECTED = "NothingSelected"
INVALID_LABEL = "InvalidLabel"
FOREIGN_TRUST_DOMAIN = "ForeignTrustDomain"
# Protocols Kubernetes or Istio name that are rightly opaque TCP here, yet look like one the mesh
# reads ("https" is one letter from "http"): no warning for them.
OPAQUE_APP_PROTOCOLS = frozenset(
    {"https", "tls", "tcp", "udp", "kubernetes.io/ws", "kubernetes.io/wss"}
)


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


def namespace_warnings(labels: Mapping[str, str]) -> list[ConfigWarning]:
    """The warning of a namespace whose mesh label has a value no agent reads."""
    value = labels.get(MESH_NAMESPACE_LABEL)
    if value is None or value in MESH_VALUES:
        return []
    return [
        ConfigWarning(
            INVALID_LABEL,
            f"label {MESH_NAMESPACE_LABEL}: {value!r} is not a value nodemesh reads, so it meshes "
            f"none of the namespace's pods: use enabled (or disabled)",
        )
    ]


def policy_warnings(
    kind: str, spec: Mapping[str, Any], *, trust_domain: str | None
) -> list[ConfigWarning]:
    """The warnings of a policy's (validated) ``spec``: values of an AuthorizationPolicy that
    can never match, among them principals of another trust domain than the mesh's
    ``trust_domain`` (None: not known to the caller, not checked); other kinds have none."""
    if kind != "AuthorizationPolicy":
        return []
    found = [ConfigWarning(NEVER_MATCHES, why) for why in never_matching(spec)]
    if trust_domain is not None:
        found += [
            ConfigWarning(FOREIGN_TRUST_DOMAIN, why)
            for why in foreign_principals(spec, trust_domain)
        ]
    return found


def foreign_principals(spec: Mapping[str, Any], trust_domain: str) -> list[str]:
    """Why each ``principals``/``notPrincipals`` value of ``spec`` that names another trust
    domain than ``trust_domain`` never matches, with the fix.

    The mTLS handshake admits only peers of the mesh's own trust domain, so a principal of
    another (``cluster.local/ns/x/sa/y`` in a mesh of ``example.org``) is never a peer's: an
    ALLOW that looks right admits no one, a DENY that looks right denies no one. ztunnel
    behaves the same; Istio's ``trustDomainAliases``, which would rewrite it, nodemesh does not
    have. Matching is kept as it is (Istio accepts the policy); this only says so."""
    out = []
    for path, field, value in matched_strings(spec):
        written = value.removeprefix("spiffe://")
        named = _foreign_trust_domain(field, written, trust_domain)
        if named is None:
            continue
        rest = written.partition("/")[2]
        fix = f"write {trust_domain}/{rest}" + ("" if "*" in rest else f" (or */{rest} for any)")
        effect = (
            "so it excludes no peer (the rule is as if it were absent)"
            if field == "notPrincipals"
            else "so it never matches (an ALLOW rule that needs it admits no one, a DENY rule "
            "denies no one)"
        )
        out.append(
            f"{path}: {value!r} is of trust domain {named}, but this mesh's is {trust_domain} and "
            f"no peer of another passes the mTLS handshake, {effect}; nodemesh has no "
            f"trustDomainAliases: {fix}"
        )
    return out


def _foreign_trust_domain(field: str, written: str, trust_domain: str) -> str | None:
    """The trust domain a principal or prefix pattern names when it is not ``trust_domain``,
    else None. Judged only where sure: an exact principal of the SPIFFE form, a prefix pattern
    with a trust domain (``other.td/ns/x*``). ``*`` and suffix patterns (``*/sa/y``) cover
    every trust domain, and a malformed value has its own warning (``never_matching``)."""
    if field not in ("principals", "notPrincipals") or written.startswith("*"):
        return None
    if "*" in written[:-1] or (not written.endswith("*") and not PRINCIPAL_FORM.fullmatch(written)):
        return None
    named, slash, _ = written.partition("/")
    return named if slash and named != trust_domain else None


def service_warnings(spec: Mapping[str, Any]) -> list[ConfigWarning]:
    """The warnings of a Service's ``spec``: ports whose ``appProtocol`` is near one the mesh
    reads but is not it. A value far from all of them (``mysql``) is opaque TCP, as meant."""
    found = []
    for i, port in enumerate(spec.get("ports") or ()):
        value = port.get("appProtocol") if isinstance(port, Mapping) else None
        if not isinstance(value, str) or value.lower() in APP_PROTOCOLS:
            continue
        close = difflib.get_close_matches(value.lower(), APP_PROTOCOLS, n=1, cutoff=0.6)
        if close and value.lower() not in OPAQUE_APP_PROTOCOLS:
            found.append(
                ConfigWarning(
                    UNREAD_APP_PROTOCOL,
                    f"spec.ports[{i}].appProtocol: {value!r} is not a protocol nodemesh reads "
                    f"({', '.join(APP_PROTOCOLS)}), so the port is opaque TCP: no L7 policy, "
                    f"route or request metrics apply on it (did you mean {close[0]}?)",
                )
            )
    return found


def reach_warnings(
    namespace: str,
    spec: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    services: Collection[tuple[str, str]],
) -> list[ConfigWarning]:
    """The warnings of a policy in ``namespace`` whose ``spec.selector`` selects none of
    ``pods`` (``{"namespace", "labels"}``) or whose ``spec.targetRef`` names none of
    ``services`` (``(namespace, name)``), each with the nearest label or Service there is."""
    found = []
    selector = spec.get("selector")
    wanted = selector.get("matchLabels") if isinstance(selector, Mapping) else None
    policy = {"namespace": namespace, "spec": spec}
    if isinstance(wanted, Mapping) and not any(selects_pod(policy, pod) for pod in pods):
        written = ", ".join(f"{k}={v}" for k, v in wanted.items())
        scope = [p for p in pods if namespace in (DEFAULT_ROOT_NAMESPACE, p.get("namespace"))]
        labels = {f"{k}={v}" for pod in scope for k, v in (pod.get("labels") or {}).items()}
        close = difflib.get_close_matches(written, labels, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        where = "the mesh" if namespace == DEFAULT_ROOT_NAMESPACE else f"namespace {namespace}"
        found.append(
            ConfigWarning(
                NOTHING_SELECTED,
                f"spec.selector.matchLabels: {written} selects no pod in {where}{hint}; "
                "the policy applies to none until one matches",
            )
        )
    target = spec.get("targetRef")
    name = target.get("name") if isinstance(target, Mapping) else None
    if isinstance(name, str) and (namespace, name) not in services:
        names = sorted(n for ns, n in services if ns == namespace)
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        found.append(
            ConfigWarning(
                NOTHING_SELECTED,
                f"spec.targetRef: no Service {namespace}/{name}; {hint}Services in {namespace}: "
                f"{', '.join(names) or 'none'}; the policy applies to none until it exists",
            )
        )
    return found
