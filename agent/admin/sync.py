"""``nodemesh proxy-status``: has every agent applied the newest state? (``istioctl
proxy-status`` for nodemesh.)

Istio compares each proxy with the one control plane that pushes to it. nodemesh has no such
pusher: every agent reads the state itself, so the agents are compared with each other. Each
agent's ``/status`` says what it has applied (``state.applied``, ``agent.sources``):

- Kubernetes source: per resource watched, the ``resourceVersion`` of the last list, event or
  bookmark taken in, and a digest of the objects applied (``agent.sources.contents``). The
  revisions are etcd's, one counter for the whole cluster, so the agent with the highest holds
  the newest objects any agent has. An agent holding the same objects (the same digest) is
  ``SYNCED`` whatever its revision: a revision only moves when the API server sends something,
  so one that has watched an unchanged resource for a while trails one that just listed it
  until its next bookmark, although nothing it applies changed. An agent holding other objects
  at a lower revision missed a change or has not applied it yet: ``STALE`` by the difference
  (an agent too old to report a digest is compared by revision alone).
- Cluster-file source (the lab, standalone): the content hash of the document applied and the
  file's modification time then. The newest document is the one with the newest time; an agent
  that applied another is ``STALE`` by how much older its document is.

``NOT READY``: the resource was never listed (or the document never loaded); ``ABSENT``: an
optional resource (Gateway API routes) the API server does not serve.

Revisions and documents only compare within one cluster, so agents are grouped by the cluster
their ``/status`` names (``cluster_key``: the trust domain and ``state.cluster_id``, the
``kube-system`` namespace's uid; a cluster-file agent has none, and the document it follows,
``state.path``, tells: the agents of one lab read one file, two labs two, even of one trust
domain, whose documents are unrelated) and compared within their group; with more than one, the
table says which cluster each row is of.
A Kubernetes agent that names no uid (older than the field, during a rolling upgrade) joins
the one cluster the others of its trust domain name.
The comparison (``compare``) is pure: statuses in, verdicts out; reading the agents is
``read_all``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.admin.client import DEFAULT_ADMIN, AdminError, admin_address, request
from agent.admin.tables import render

SYNCED, STALE, NOT_READY, ABSENT, UNREACHABLE = (
    "SYNCED",
    "STALE",
    "NOT READY",
    "ABSENT",
    "UNREACHABLE",
)
FILE_RESOURCE = "cluster-file"
# Table columns and the resources each stands for (the worst verdict among them is shown). A
# column appears when some agent reports one of its resources: DOCUMENT for the cluster-file
# source (one document holds every kind), the others for the Kubernetes source.
COLUMNS: dict[str, tuple[str, ...]] = {
    "DOCUMENT": (FILE_RESOURCE,),
    "PODS": ("pods", "namespaces"),
    "SERVICES": ("services",),
    "ENDPOINTS": ("endpointslices",),
    "POLICIES": (
        "authorizationpolicies",
        "peerauthentications",
        "trafficpolicies",
        "ratelimitpolicies",
        "httpfaults",
    ),
    "ROUTES": ("httproutes", "grpcroutes"),
}
_RANK = {SYNCED: 0, ABSENT: 0, STALE: 1, NOT_READY: 2, UNREACHABLE: 3}


@dataclass(frozen=True)
class Answer:
    """One agent's ``/status`` (``status``), or why it could not be read (``error``)."""

    node: str
    address: str
    status: Mapping[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True)
class Verdict:
    """One resource of one agent: ``state`` is SYNCED, STALE, NOT READY or ABSENT; for STALE,
    ``behind`` is how far (revisions, or seconds for a document; None: unknown)."""

    state: str
    behind: float | None = None
    unit: str = "revisions"

    def text(self) -> str:
        if self.state != STALE:
            return self.state
        if self.behind is None:
            return f"{STALE} (relisting)"
        if self.unit == "seconds":
            return f"{STALE} -{self.behind:.3g}s"  # the document applied is that much older
        return f"{STALE} -{self.behind:.0f}"  # revisions behind the newest

    def json(self) -> dict[str, object]:
        return {"state": self.state, "behind": self.behind, "unit": self.unit}


def applied(status: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
    """The per-resource ``state.applied`` of a ``/status`` answer (empty for an old agent)."""
    found = (status.get("state") or {}).get("applied") or {}
    return found if isinstance(found, Mapping) else {}


def _revision(entry: Mapping[str, Any]) -> int | None:
    rv = entry.get("resource_version")
    try:
        return int(rv) if rv is not None else None
    except (TypeError, ValueError):
        return None  # not an etcd revision: cannot be ordered, shown as relisting/unknown


def _modified(entry: Mapping[str, Any]) -> dt.datetime | None:
    when = entry.get("modified")
    try:
        return dt.datetime.fromisoformat(str(when).replace("Z", "+00:00")) if when else None
    except ValueError:
        return None


def newest(statuses: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Per resource, the entry of the agent that has the newest: the highest revision, or
    for the cluster document the newest modification time."""
    best: dict[str, tuple[Any, Mapping[str, Any]]] = {}
    for status in statuses:
        for resource, entry in applied(status).items():
            key: Any = _modified(entry) if resource == FILE_RESOURCE else _revision(entry)
            if key is None:
                continue
            if resource not in best or key > best[resource][0]:
                best[resource] = (key, entry)
    return {resource: entry for resource, (_key, entry) in best.items()}


def verdict(resource: str, entry: Mapping[str, Any], best: Mapping[str, Any] | None) -> Verdict:
    """How ``entry`` (one agent's applied ``resource``) compares with the newest, ``best``."""
    if not entry.get("synced"):
        return Verdict(NOT_READY)
    if entry.get("absent"):
        return Verdict(ABSENT)
    if resource == FILE_RESOURCE:
        mine = _modified(entry)
        if best is None or entry.get("sha256") == best.get("sha256"):
            return Verdict(SYNCED)
        newest_time = _modified(best)
        seconds = (newest_time - mine).total_seconds() if mine and newest_time else None
        return Verdict(STALE, seconds, "seconds")
    revision = _revision(entry)
    if revision is None:
        return Verdict(STALE)  # between a 410 Gone and the relist: unknown how far
    top = _revision(best) if best is not None else None
    if top is None or revision >= top:
        return Verdict(SYNCED)
    if best is not None and entry.get("digest") and entry.get("digest") == best.get("digest"):
        return Verdict(SYNCED)  # the newest objects, at an older revision: nothing changed since
    return Verdict(STALE, top - revision)


def _worst(verdicts: Sequence[Verdict]) -> Verdict | None:
    """A column's verdict: the worst of its resources' (STALE: the farthest behind)."""
    if not verdicts:
        return None
    if all(v.state == ABSENT for v in verdicts):
        return Verdict(ABSENT)
    rank = max(_RANK[v.state] for v in verdicts)
    if rank == _RANK[SYNCED]:
        return Verdict(SYNCED)
    if rank == _RANK[STALE]:
        stale = [v for v in verdicts if v.state == STALE]
        known = [v.behind for v in stale if v.behind is not None]
        return Verdict(STALE, max(known) if known else None, stale[0].unit)
    return Verdict(NOT_READY)


def _certificates(status: Mapping[str, Any]) -> dict[str, object]:
    certs = status.get("certificates")
    if isinstance(certs, Mapping):
        return dict(certs)
    counts = status.get("counts") or {}  # an agent from before this summary existed
    return {
        "identities": counts.get("certificates"),
        "available": counts.get("certificates_available"),
        "soonest_expiry": None,
    }


ClusterKey = tuple[str, str]
# A cluster-file agent's cluster: this and the path of the document it follows.
FILE_CLUSTER = "file:"


def cluster_key(status: Mapping[str, Any]) -> ClusterKey:
    """Which cluster an agent follows: its trust domain and its source's ``cluster_id`` (""
    when the agent does not say: one from before the field, or not listed yet), or for the
    cluster-file source ``FILE_CLUSTER`` and the document's path (the trust domain alone took
    two labs' agents for one cluster, and the older document's agents for STALE)."""
    state = status.get("state") or {}
    cluster_id = state.get("cluster_id")
    if not cluster_id and state.get("source") == "file" and state.get("path"):
        cluster_id = f"{FILE_CLUSTER}{state['path']}"
    return str(state.get("trust_domain") or ""), str(cluster_id or "")


def _cluster_keys(answers: Sequence[Answer]) -> list[ClusterKey]:
    """Each answer's cluster (("", "") for one that could not be read). A Kubernetes-source
    agent that names no ``cluster_id`` (one from before the field, as in a rolling upgrade, or
    one that has not listed namespaces yet) joins the one cluster the other Kubernetes agents
    of its trust domain name; with none or several it cannot be placed and stays apart."""
    keys = [("", "") if a.status is None else cluster_key(a.status) for a in answers]
    ids: dict[str, set[str]] = {}
    for a, (domain, cid) in zip(answers, keys, strict=True):
        if a.status is not None and cid and _source(a.status) == "kubernetes":
            ids.setdefault(domain, set()).add(cid)
    for i, (a, (domain, cid)) in enumerate(zip(answers, keys, strict=True)):
        known = ids.get(domain, set())
        if (
            a.status is not None
            and not cid
            and _source(a.status) == "kubernetes"
            and len(known) == 1
        ):
            keys[i] = (domain, next(iter(known)))
    return keys


def _source(status: Mapping[str, Any]) -> object:
    return (status.get("state") or {}).get("source")


def _newest_per_cluster(
    answers: Sequence[Answer], keys: Sequence[ClusterKey]
) -> dict[ClusterKey, dict[str, Any]]:
    groups: dict[ClusterKey, list[Mapping[str, Any]]] = {}
    for a, key in zip(answers, keys, strict=True):
        if a.status is not None:
            groups.setdefault(key, []).append(a.status)
    return {key: newest(statuses) for key, statuses in groups.items()}


def compare(answers: Sequence[Answer]) -> list[dict[str, Any]]:
    """One row per agent (the ``-o json`` output): its cluster, its verdict per resource and
    per column (against the agents of its cluster only), its certificates and version; an agent
    that could not be read is a row saying why."""
    keys = _cluster_keys(answers)
    best_of = _newest_per_cluster(answers, keys)
    rows: list[dict[str, Any]] = []
    for a, key in zip(answers, keys, strict=True):
        if a.status is None:
            rows.append(
                {
                    "node": a.node,
                    "address": a.address,
                    "reachable": False,
                    "error": a.error,
                    "columns": {},
                }
            )
            continue
        st = a.status
        best = best_of[key]
        verdicts = {
            resource: verdict(resource, entry, best.get(resource))
            for resource, entry in applied(st).items()
        }
        columns: dict[str, str] = {}
        for column, resources in COLUMNS.items():
            worst = _worst([verdicts[r] for r in resources if r in verdicts])
            if worst is not None:
                columns[column] = worst.text()
        state = st.get("state") or {}
        rows.append(
            {
                "node": st.get("node") or a.node,
                "address": a.address,
                "reachable": True,
                "cluster": {"trust_domain": key[0] or None, "id": key[1] or None},
                "source": state.get("source"),
                "source_error": state.get("last_error") or None,
                "ready": st.get("ready"),
                "version": st.get("version"),
                "state_version": state.get("version"),
                "applied_at": state.get("applied_at"),
                "resources": {
                    r: {**dict(applied(st)[r]), "verdict": v.json()} for r, v in verdicts.items()
                },
                "columns": columns,
                "certificates": _certificates(st),
            }
        )
    return rows


def _until(when: object, now: dt.datetime) -> str:
    if not when:
        return "-"
    try:
        left = dt.datetime.fromisoformat(str(when).replace("Z", "+00:00")) - now
    except ValueError:
        return str(when)
    seconds = int(left.total_seconds())
    if seconds <= 0:
        return "expired"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def format_rows(rows: Sequence[Mapping[str, Any]], now: dt.datetime) -> str:
    """The table: one line per agent, then why each unreachable agent could not be read.
    CERTS: how many identities, and in how long the soonest of their certificates expires."""
    shown = [c for c in COLUMNS if any(c in row["columns"] for row in rows)]
    clusters = _cluster_numbers(rows)
    headers = ["NODE", *(["CLUSTER"] if clusters else []), "SOURCE", *shown, "CERTS", "VERSION"]
    lines = []
    notes = []
    for row in rows:
        cells = [row["columns"].get(c, "-") for c in shown]
        number = [clusters.get(_row_cluster(row), "-")] if clusters else []
        if not row["reachable"]:
            lines.append([row["node"], *number, UNREACHABLE, *cells, "-", "-"])
            notes.append(f"{row['node']}: {row['error']}")
            continue
        certs = row["certificates"]
        count = certs.get("identities")
        cert_text = "-" if count is None else str(count)
        if count:
            cert_text += f" ({_until(certs.get('soonest_expiry'), now)})"
        lines.append(
            [row["node"], *number, row["source"] or "-", *cells, cert_text, row["version"]]
        )
        if row.get("source_error"):  # every agent may refuse the newest input alike: SYNCED
            notes.append(
                f"{row['node']}: its state source refused the newest input and keeps the state "
                f"it had: {row['source_error']}"
            )
    legend = [
        f"cluster {n}: trust domain {td or '(not said)'}, {_cluster_text(cid)}"
        for (td, cid), n in clusters.items()
    ]
    if legend:
        legend.append(
            f"agents of {len(clusters)} clusters: each is compared only with the agents of its "
            "own cluster"
        )
    return "\n".join([render(headers, lines), *legend, *notes])


def _row_cluster(row: Mapping[str, Any]) -> ClusterKey:
    cluster = row.get("cluster") or {}
    return str(cluster.get("trust_domain") or ""), str(cluster.get("id") or "")


def _cluster_numbers(rows: Sequence[Mapping[str, Any]]) -> dict[ClusterKey, str]:
    """The clusters the reachable agents follow, numbered in order of first row; empty when
    there is one (the table then needs no CLUSTER column)."""
    numbers: dict[ClusterKey, str] = {}
    for row in rows:
        if row["reachable"]:
            numbers.setdefault(_row_cluster(row), str(len(numbers) + 1))
    return numbers if len(numbers) > 1 else {}


def _cluster_text(cluster_id: str) -> str:
    if not cluster_id:
        return "no cluster identity (an older agent, or not listed yet)"
    if cluster_id.startswith(FILE_CLUSTER):
        return f"cluster file {cluster_id.removeprefix(FILE_CLUSTER)}"
    return f"API server's kube-system namespace uid {cluster_id}"


# -- reading the agents ---------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """An admin API to read; ``enter`` runs first in the reading thread (a lab node's
    network namespace, where the admin API is loopback)."""

    node: str
    address: str
    enter: Callable[[], None] | None = None


def read_all(targets: Sequence[Target], timeout: float) -> list[Answer]:
    """Every target's ``/status``, read at once, each from its own fresh thread (a thread
    that entered a namespace is not reused)."""
    answers: list[Answer | None] = [None] * len(targets)

    def read(i: int, t: Target) -> None:
        try:
            if t.enter is not None:
                t.enter()
            status = request(t.address, "/status", timeout=timeout)
        except (AdminError, OSError) as e:
            answers[i] = Answer(t.node, t.address, error=str(e))
            return
        if not isinstance(status, Mapping) or not isinstance(status.get("state"), Mapping):
            why = (
                f"{t.address}/status is not a nodemesh agent's status: is it an agent's admin API?"
            )
            answers[i] = Answer(t.node, t.address, error=why)
            return
        answers[i] = Answer(t.node, t.address, status=status)

    threads = [
        threading.Thread(target=read, args=(i, t), daemon=True) for i, t in enumerate(targets)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [
        a if a is not None else Answer(t.node, t.address, error="not read")
        for a, t in zip(answers, targets, strict=True)
    ]


LabTargets = Callable[[str], "list[Target] | None"]


def _no_lab(_lab: str) -> list[Target] | None:
    return None


def targets_of(args: argparse.Namespace, lab_targets: LabTargets = _no_lab) -> list[Target]:
    """``--admin`` as given; else every node's agent of the lab (``lab_targets``: None when
    that lab is not up); else this node's agent."""
    if args.admin:
        return [Target(address, address) for address in args.admin]
    lab = args.lab or os.environ.get("NODEMESH_LAB") or "nm"
    found = lab_targets(lab)
    if found is None and args.lab is not None:
        raise AdminError(f"no lab {args.lab!r} is up (nodemesh lab up), or pass --admin HOST:PORT")
    return found or [Target(DEFAULT_ADMIN, DEFAULT_ADMIN)]


def run(args: argparse.Namespace, lab_targets: LabTargets = _no_lab) -> int:
    """Exit 0 when every agent answered (whatever their verdicts), 1 when one could not be read."""
    try:
        targets = targets_of(args, lab_targets)
    except AdminError as e:
        print(f"nodemesh proxy-status: {e}", file=sys.stderr)
        return 2
    rows = compare(read_all(targets, args.timeout))
    if args.output == "json":
        print(json.dumps({"agents": rows}, indent=2))
    else:
        print(format_rows(rows, dt.datetime.now(dt.UTC)))
    return 0 if all(r["reachable"] for r in rows) else 1


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    lab_targets: LabTargets = _no_lab,
) -> None:
    """Add ``proxy-status``; ``lab_targets`` finds a lab's agents (``agent.view.proxystatus``
    passes it: the admin layer may not import the lab)."""
    help_text = "has every agent applied the newest state? (like istioctl proxy-status)"
    p = subparsers.add_parser(
        "proxy-status",
        help=help_text,
        description=f"{help_text} One row per agent: per resource SYNCED (holds the objects "
        "of the agent with the newest revision), STALE (holds others, at a lower revision: by "
        "how much) or NOT READY; certificates; version. Agents of different clusters (trust "
        "domain, kube-system namespace uid or cluster file) are compared only within their "
        "cluster. "
        "Asks every node's agent of the lab (--lab, $NODEMESH_LAB, else nm when up), or the "
        f"agents named by --admin, else {DEFAULT_ADMIN}.",
    )
    p.add_argument(
        "--admin",
        type=admin_address,
        action="append",
        metavar="HOST:PORT",
        help="an agent's admin API; repeat for each agent",
    )
    p.add_argument("--lab", help="the lab whose nodes' agents to ask (default: nm when up)")
    p.add_argument(
        "-o",
        "--output",
        choices=["table", "json"],
        default="table",
        help="table (default) or json: one object per agent, stable field names",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per agent (default 5)")
    p.set_defaults(func=functools.partial(run, lab_targets=lab_targets))
