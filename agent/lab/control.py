"""What ``nodemesh lab`` does: up, down, status and the edits of a running lab.

``up`` is all-or-nothing: it validates and plans, records the plan, builds, starts the available
components and waits for them; any failure (including Ctrl-C) runs ``down`` before the error is
raised, so a failed ``up`` leaves nothing behind. ``down`` needs nothing but the lab's name: it
uses the recorded plan and PIDs when they exist and otherwise finds namespaces and pin
directories by the lab's prefix. Edits (``annotate``, ``apply``, ``delete``) rewrite
``cluster.yaml``, the file the agents and the CA watch, exactly as a user's ``kubectl`` edit would
reach them through the API server in a cluster.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import logging
import os
import re
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from agent.lab import build, components, prometheus
from agent.lab.record import LabDir
from agent.lab.topology import (
    PIN_ROOT,
    LabError,
    LabPlan,
    assign_cluster_ips,
    check_lab_name,
    plan_lab,
)
from agent.policy.routes import ROUTE_KINDS
from agent.policy.schema import POLICY_KINDS
from agent.policy.warnings import unknown_annotation
from agent.sources.document import ClusterDocument, parse_document
from agent.sources.fields import DocumentError
from agent.state import StateStore

log = logging.getLogger(__name__)


def up(
    lab: str,
    topology: str,
    *,
    source: str,
    with_components: bool = True,
    timeout: float = 60.0,
    drain_seconds: float | None = None,
    state_root: str | None = None,
) -> LabPlan:
    """Build lab ``lab`` from the cluster document ``topology`` (text; ``source`` names it)."""
    labdir = labdir_of(lab, state_root)
    if labdir.exists() or build.lab_netns(lab):
        raise LabError(
            f"lab {lab!r} already exists; run `nodemesh lab down --name {lab}` first "
            "or choose another --name"
        )
    doc, plan = plan_lab(parse_document(topology, source=source), lab, source=source)
    labdir.create()
    try:
        labdir.write_plan(plan)
        labdir.write_cluster(doc)
        build.build(plan)
        if with_components:
            components.start_all(plan, labdir, timeout=timeout, drain_seconds=drain_seconds)
            prometheus.start(plan, labdir, timeout=timeout)
    except BaseException as e:
        log.info("lab %s: up failed, removing what was built", lab)
        down(lab, state_root=state_root)
        if isinstance(e, components.ComponentFailed):
            raise e.log_removed() from e
        raise
    return plan


def down(lab: str, *, state_root: str | None = None) -> bool:
    """Remove lab ``lab`` entirely; does nothing for a lab that does not exist. Whether there
    was anything to remove: ``lab down --name walkk`` must not say it removed lab walkk while
    the lab walk the user meant is still up."""
    labdir = labdir_of(lab, state_root)
    plan = labdir.read_plan()
    pin_dirs = set(glob.glob(f"{PIN_ROOT}/{lab}-*"))
    if plan is not None:
        pin_dirs |= {n.pin_dir for n in plan.nodes}
    found = labdir.exists() or bool(build.lab_netns(lab)) or any(map(os.path.exists, pin_dirs))
    build.teardown(
        lab,
        pids=list(labdir.pids().values()),
        pin_dirs=sorted(pin_dirs),
        state_dir=str(labdir.path),
    )
    return found


@dataclass(frozen=True)
class Upgrade:
    node: str
    old_pid: int
    new_pid: int


def upgrade(
    lab: str,
    node_name: str,
    *,
    timeout: float = 60.0,
    drain_seconds: float | None = None,
    wait: bool = False,
    state_root: str | None = None,
) -> Upgrade:
    """Replace ``node_name``'s agent without dropping a connection (see ``agent.handover``).

    Starts a new agent beside the running one with the same command line (``drain_seconds``
    replaces its ``--drain-seconds``), waits until it has taken the node over (it holds the
    handover name and answers readiness), then SIGTERMs the old one, which drains its
    established connections for the ``--drain-seconds`` it was started with. ``wait`` also waits
    for the old agent to exit.
    """
    labdir, plan = load(lab, state_root=state_root)
    node = next((n for n in plan.nodes if n.name == node_name), None)
    if node is None:
        known = ", ".join(n.name for n in plan.nodes)
        raise LabError(f"no node {node_name!r} in lab {lab}; known: {known}")
    component = components.agent_component(plan, labdir, node)
    old_pid = labdir.pids().get(component.name)
    if old_pid is None or components.process_state(labdir, component.name) != "running":
        raise LabError(
            f"{component.name} is not running, so there is nothing to upgrade; "
            f"see {labdir.log_file(component.name)}"
        )
    argv = component.argv
    if drain_seconds is not None:
        argv = _with_option(argv, "--drain-seconds", f"{drain_seconds:g}")
    new = components.start(dataclasses.replace(component, argv=argv), labdir)
    try:
        components.wait_taken_over(component, new, labdir, node, timeout=timeout)
    except BaseException:
        new.terminate()
        new.wait()
        labdir.record_pid(component.name, old_pid)
        labdir.record_command(component.name, component.argv)
        raise
    os.kill(old_pid, signal.SIGTERM)
    log.info("lab %s: %s handed over from pid %d to %d", lab, component.name, old_pid, new.pid)
    if wait:
        components.wait_exit(old_pid)
    return Upgrade(node_name, old_pid, new.pid)


def _with_option(argv: tuple[str, ...], option: str, value: str) -> tuple[str, ...]:
    if option in argv:
        i = argv.index(option)
        return (*argv[: i + 1], value, *argv[i + 2 :])
    return (*argv, option, value)


def labs_up(state_root: str | None = None) -> list[str]:
    """The labs recorded under the state root (those ``lab down`` would remove)."""
    root = labdir_of("x", state_root).root
    try:
        return sorted(n for n in os.listdir(root) if LabDir(n, root).read_plan() is not None)
    except FileNotFoundError:
        return []


def labdir_of(lab: str, state_root: str | None = None) -> LabDir:
    check_lab_name(lab)
    return LabDir(lab) if state_root is None else LabDir(lab, state_root)


def load(lab: str, *, state_root: str | None = None) -> tuple[LabDir, LabPlan]:
    labdir = labdir_of(lab, state_root)
    plan = labdir.read_plan()
    if plan is None:
        raise LabError(f"lab {lab!r} is not up; start it with `nodemesh lab up --name {lab}`")
    return labdir, plan


def _agent_state(labdir: LabDir, plan: LabPlan, node_name: str) -> str:
    state = components.process_state(labdir, f"agent-{node_name}")
    if state != "running":
        return state
    node = next(n for n in plan.nodes if n.name == node_name)
    return "ready" if components.agent_ready(node) else "not ready"


def status(lab: str, *, state_root: str | None = None) -> dict[str, Any]:
    """The documented ``lab status --json`` shape (keys may be added, never changed)."""
    labdir, plan = load(lab, state_root=state_root)
    doc = labdir.read_cluster()
    store = StateStore(doc.trust_domain)
    state = doc.to_state()
    with store.update() as txn:
        for ns in state.namespaces:
            txn.put_namespace(ns)
        for w in state.workloads:
            txn.put_workload(w)
    snap = store.snapshot()
    specs = {pod.uid: pod for _, pod in doc.pods()}
    return {
        "lab": lab,
        "stateDir": str(labdir.path),
        "clusterFile": str(labdir.cluster_file),
        "ca": {
            "netns": plan.ca_netns,
            "ip": plan.ca_ip,
            "state": components.process_state(labdir, "ca"),
        },
        "prometheus": prometheus.status(plan, labdir),
        "nodes": [
            {
                "name": n.name,
                "netns": n.netns,
                "ip": n.ip,
                "uplink": n.uplink,
                "podCIDR": n.pod_cidr,
                "agent": _agent_state(labdir, plan, n.name),
                "pinDir": n.pin_dir,
            }
            for n in plan.nodes
        ],
        "pods": [
            {
                "name": p.name,
                "namespace": p.namespace,
                "netns": p.netns,
                "ip": p.ip,
                "node": p.node,
                "serviceAccount": specs[f"{p.namespace}/{p.name}"].service_account,
                "meshed": snap.is_meshed(snap.workloads[f"{p.namespace}/{p.name}"]),
                "hostVeth": p.host_veth,
                "identity": snap.workloads[f"{p.namespace}/{p.name}"].identity(doc.trust_domain),
            }
            for p in plan.pods
        ],
        "services": [
            {"name": s.name, "namespace": s.namespace, "clusterIP": s.cluster_ip}
            for s in doc.services
        ],
    }


def resolve_target(plan: LabPlan, target: str) -> str:
    """The namespace of a pod (``name`` or ``namespace/name``), a node, ``ca`` or ``switch``."""
    namespace, _, name = target.rpartition("/")
    pods = [p for p in plan.pods if p.name == name and (not namespace or p.namespace == namespace)]
    if len(pods) == 1:
        return pods[0].netns
    if len(pods) > 1:
        choices = ", ".join(f"{p.namespace}/{p.name}" for p in pods)
        raise LabError(f"{target!r} is ambiguous; use one of {choices}")
    nodes = {n.name: n.netns for n in plan.nodes}
    nodes |= {"ca": plan.ca_netns, "switch": plan.switch_netns}
    if not namespace and target in nodes:
        return nodes[target]
    known = [f"{p.namespace}/{p.name}" for p in plan.pods] + sorted(nodes)
    raise LabError(f"no pod or node {target!r} in lab {plan.lab}; known: {', '.join(known)}")


def _edit(
    lab: str, change: Callable[[dict[str, Any]], None], state_root: str | None
) -> ClusterDocument:
    """Apply ``change`` to the document's plain data under the lab lock; validate; write."""
    labdir, _ = load(lab, state_root=state_root)
    with labdir.locked():
        data = labdir.read_cluster().to_mapping()
        change(data)
        doc = parse_document(yaml.safe_dump(data, sort_keys=False), source=str(labdir.cluster_file))
        labdir.write_cluster(doc)
    return doc


def annotate(lab: str, pod: str, changes: Iterable[str], *, state_root: str | None = None) -> str:
    """``KEY=VALUE`` sets, ``KEY-`` removes an annotation of pod ``name`` or ``ns/name``.
    Returns what to tell the user, as ``kubectl annotate`` does, with the pod's annotations
    as they now are (a removal of a key that was not set is no error, and shows so)."""
    now: dict[str, str] = {}
    parsed: list[tuple[str, str | None]] = []
    for item in changes:
        if item.endswith("-") and "=" not in item:
            parsed.append((item[:-1], None))
        elif "=" in item:
            key, _, value = item.partition("=")
            parsed.append((key, value))
        else:
            raise LabError(f"{item!r}: write KEY=VALUE to set or KEY- to remove an annotation")
    namespace, _, name = pod.rpartition("/")
    namespace = namespace or "default"
    for wanted, setting in parsed:  # removing one is always allowed (a file written before)
        if setting is not None and (problem := unknown_annotation(wanted)) is not None:
            raise LabError(
                f"pod {namespace}/{name}: annotation {wanted}: {problem}; nothing was changed"
            )

    def change(data: dict[str, Any]) -> None:
        for node in data["nodes"]:
            for p in node["pods"]:
                if (p["name"], p["namespace"]) == (name, namespace):
                    for key, value in parsed:
                        if value is None:
                            p["annotations"].pop(key, None)
                        else:
                            p["annotations"][key] = value
                    now.update(p["annotations"])
                    return
        known = ", ".join(f"{p['namespace']}/{p['name']}" for n in data["nodes"] for p in n["pods"])
        raise LabError(f"no pod {namespace}/{name} in lab {lab}; known: {known}")

    try:
        _edit(lab, change, state_root)
        listed = ", ".join(f"{k}={v}" for k, v in sorted(now.items())) or "none"
        return f"pod {namespace}/{name} annotated; its annotations now: {listed}"
    except DocumentError as e:
        annotation = e.path.partition(".annotations.")[2]
        if not annotation:
            raise
        # Named as the user wrote it, not by its place in the lab's cluster file.
        raise LabError(
            f"pod {namespace}/{name}: annotation {annotation}: {e.problem}; nothing was changed"
        ) from e


def _policy_key(manifest: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = manifest.get("metadata") or {}
    return (str(manifest.get("kind")), meta.get("namespace") or "default", str(meta.get("name")))


def _section(manifest: Mapping[str, Any]) -> str:
    """Where a manifest lives in the cluster document: Gateway API routes under ``routes``,
    Services under ``services``."""
    if manifest.get("kind") == "Service":
        return "services"
    return "routes" if manifest.get("kind") in ROUTE_KINDS else "policies"


def _service_entry(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A ``v1`` Service manifest as the cluster document writes it (the document's parser then
    checks it and names any bad field)."""
    meta, spec = manifest.get("metadata") or {}, manifest.get("spec") or {}
    entry: dict[str, Any] = {
        "name": meta.get("name"),
        "namespace": meta.get("namespace") or "default",
        "selector": dict(spec.get("selector") or {}),
        "ports": [dict(p) for p in spec.get("ports") or []],
    }
    if spec.get("clusterIP"):
        entry["clusterIP"] = spec["clusterIP"]
    return entry


def apply(
    lab: str,
    manifests: list[Mapping[str, Any]],
    *,
    state_root: str | None = None,
    source: str = "the manifests",
) -> list[str]:
    """Create or replace policies, routes and Services (matched by kind, namespace and name;
    a ``v1`` Service manifest becomes the cluster document's ``services`` entry). Returns a
    line per object, as ``kubectl apply`` prints: ``created``, ``configured`` or
    ``unchanged``, and a Service's VIP (assigned here: its clients need to know it).

    All or nothing: an invalid object leaves the cluster file as it was. The error names the
    object as the user wrote it (``source``, the document number, kind and name, the field in
    the manifest), not its place in the lab's merged cluster file, which the user never saw."""
    _check_kinds(lab, source, manifests)
    keys = {_policy_key(m) for m in manifests}
    before: dict[tuple[str, str, str], Any] = {}
    placed: dict[str, int] = {}  # "policies[3]" in the merged document -> index in manifests

    def place(section: str, first: int) -> None:
        """The added manifests of ``section`` follow its ``first`` kept entries."""
        at = first
        for i, m in enumerate(manifests):
            if _section(m) == section:
                placed[f"{section}[{at}]"] = i
                at += 1

    def change(data: dict[str, Any]) -> None:
        before.update(_objects(data))
        for section in ("policies", "routes"):
            kept = [p for p in data.get(section, []) if _policy_key(p) not in keys]
            added = [dict(m) for m in manifests if _section(m) == section]
            place(section, len(kept))
            if kept or added:
                data[section] = kept + added
        services = [_service_entry(m) for m in manifests if _section(m) == "services"]
        if services:
            names = {(s["namespace"], s["name"]) for s in services}
            current = {
                (s.get("namespace", "default"), s["name"]): s for s in data.get("services", [])
            }
            for s in services:  # a replaced Service keeps its VIP (immutable, as in Kubernetes)
                vip = current.get((s["namespace"], s["name"]), {}).get("clusterIP")
                if vip and "clusterIP" not in s:
                    s["clusterIP"] = vip
            kept = [s for key, s in current.items() if key not in names]
            place("services", len(kept))
            data["services"] = kept + services
            assign_cluster_ips(data)  # a new one gets a VIP its clients can dial

    try:
        doc = _edit(lab, change, state_root)
    except DocumentError as e:
        raise _in_manifests(e, lab, source, manifests, placed) from e
    after = _objects(doc.to_mapping())
    lines = []
    for key in dict.fromkeys(_policy_key(m) for m in manifests):
        old, new = before.get(key), after[key]
        outcome = "created" if old is None else "unchanged" if old == new else "configured"
        vip = f" (clusterIP {new['clusterIP']})" if key[0] == "Service" else ""
        lines.append(f"{key[0]} {key[1]}/{key[2]} {outcome}{vip}")
    return lines


# What ``lab apply`` takes, by API group, as its error lists them.
APPLY_KINDS = {
    **dict.fromkeys(POLICY_KINDS, "nodemesh.io/v1alpha1"),
    **dict.fromkeys(ROUTE_KINDS, "gateway.networking.k8s.io/v1"),
    "Service": "v1",
}


def _check_kinds(lab: str, source: str, manifests: list[Mapping[str, Any]]) -> None:
    """Refuse a mistyped kind as such. Otherwise an ``HTTPRoue`` or a ``Servce`` is taken for a
    nodemesh policy, and its error blames the apiVersion, which was right. A kind far from
    every known one (Istio's ``VirtualService``) is left to the schema, whose error says what
    replaces it."""
    for i, m in enumerate(manifests, 1):
        kind = str(m.get("kind"))
        if kind in APPLY_KINDS:
            continue
        close = difflib.get_close_matches(kind, APPLY_KINDS, n=1, cutoff=0.75)
        version = str(m.get("apiVersion"))
        misread = version == "v1" or version.startswith("gateway.networking.k8s.io/")
        given = "kind" in m
        if given and not close and not misread:
            continue
        meta = m.get("metadata") or {}
        named = f"{kind} " if given else ""
        where = f"document {i} ({named}{meta.get('namespace') or 'default'}/{meta.get('name')})"
        hint = f"did you mean {close[0]}? " if close else ""
        why = f"{kind!r} is not a kind lab apply takes; {hint}" if given else "is required; "
        kinds = ", ".join(f"{k} ({group})" for k, group in APPLY_KINDS.items())
        raise DocumentError(
            source,
            f"{where}: kind",
            f"{why}use one of {kinds}; nothing was applied; lab {lab} keeps its previous objects",
        )


def _objects(data: Mapping[str, Any]) -> dict[tuple[str, str, str], Any]:
    """The cluster document's objects a manifest can name, by (kind, namespace, name)."""
    objects = {_policy_key(p): p for s in ("policies", "routes") for p in data.get(s) or ()}
    for s in data.get("services") or ():
        objects[("Service", s.get("namespace") or "default", str(s["name"]))] = s
    return objects


_MERGED_PATH = re.compile(r"((?:policies|routes|services)\[\d+\])\.?(.*)")


def _in_manifests(
    error: DocumentError,
    lab: str,
    source: str,
    manifests: list[Mapping[str, Any]],
    placed: Mapping[str, int],
) -> DocumentError:
    """``error`` about the merged cluster file, told about the manifest that caused it."""
    kept = f"nothing was applied; lab {lab} keeps its previous objects"
    match = _MERGED_PATH.fullmatch(error.path)
    if match is None or match[1] not in placed:
        return DocumentError(error.source, error.path, f"{error.problem}; {kept}")
    index = placed[match[1]]
    kind, namespace, _ = _policy_key(manifests[index])
    name = (manifests[index].get("metadata") or {}).get("name") or "(no name)"
    field = match[2]
    if kind == "Service" and field:  # the entry has the manifest's spec fields at its top
        field = (
            f"metadata.{field}" if field.split(".")[0] in ("name", "namespace") else f"spec.{field}"
        )
    where = f"document {index + 1} ({kind} {namespace}/{name})" + (f": {field}" if field else "")
    return DocumentError(source, where, f"{error.problem}; {kept}")


def delete(
    lab: str, manifests: list[Mapping[str, Any]], *, state_root: str | None = None
) -> list[str]:
    """Remove policies, routes and Services (matched by kind, namespace and name); every one
    must exist. Returns a line per object, as ``kubectl delete`` prints them."""
    keys = [_policy_key(m) for m in manifests]

    def change(data: dict[str, Any]) -> None:
        services = {
            ("Service", s.get("namespace", "default"), s["name"]) for s in data.get("services", [])
        }
        data["services"] = [
            s
            for s in data.get("services", [])
            if ("Service", s.get("namespace", "default"), s["name"]) not in set(keys)
        ]
        sections = ("policies", "routes")
        present = {_policy_key(p) for section in sections for p in data.get(section, [])}
        present |= services
        missing = [k for k in keys if k not in present]
        if missing:
            kind, ns, name = missing[0]
            raise LabError(f"{kind} {ns}/{name} not found in lab {lab}; nothing was deleted")
        for section in sections:
            if section in data:
                data[section] = [p for p in data[section] if _policy_key(p) not in set(keys)]

    _edit(lab, change, state_root)
    return [f"{kind} {ns}/{name} deleted" for kind, ns, name in dict.fromkeys(keys)]
