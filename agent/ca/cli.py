"""``nodemesh ca``: run the mesh CA, standalone (files) or against a Kubernetes API server.

Standalone (the lab, a VM install): ``--cluster-file`` is the cluster document (read and
reloaded through the local-file source, for the node check), ``--root-dir`` holds the root
(created on first start), ``--node-tokens`` maps tokens to nodes. Kubernetes: ``--kubeconfig`` or
``--in-cluster``; the root lives in a Secret, callers are checked with TokenReview.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

from agent.base.constants import CA_METRICS_PORT, CA_PORT, DEFAULT_TOKEN_AUDIENCE
from agent.base.durations import parse_duration


def namespaced_name(text: str) -> tuple[str, str]:
    namespace, _, name = text.partition("/")
    if not namespace or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAMESPACE/NAME")
    return namespace, name


def optional_namespaced_name(text: str) -> tuple[str, str] | None:
    return namespaced_name(text) if text else None


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ca",
        help="run the mesh CA (gRPC, Istio's IstioCertificateService wire contract)",
        description=(
            "Run the mesh certificate authority on --listen (gRPC over TLS). "
            "Standalone mode: --cluster-file, --root-dir and --node-tokens (root in files, "
            "per-node tokens, node check against the cluster document). "
            "Kubernetes mode: --kubeconfig or --in-cluster (root in a Secret, TokenReview, "
            "node check against the pods on the caller's node)."
        ),
    )
    p.add_argument(
        "--listen", default=f"0.0.0.0:{CA_PORT}", help="address:port (default %(default)s)"
    )
    p.add_argument(
        "--metrics-listen",
        default=f"0.0.0.0:{CA_METRICS_PORT}",
        metavar="ADDR:PORT",
        help="where Prometheus scrapes the CA's /metrics (default %(default)s; '' turns it off)",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cluster-file", type=Path, help="standalone: the cluster document")
    mode.add_argument("--kubeconfig", type=Path, help="Kubernetes mode with this kubeconfig")
    mode.add_argument("--in-cluster", action="store_true", help="Kubernetes mode, in a pod")
    p.add_argument("--root-dir", type=Path, help="standalone: root files (created if absent)")
    p.add_argument("--node-tokens", type=Path, help="standalone: YAML {tokens: [{node, token}]}")
    p.add_argument(
        "--max-ttl",
        type=parse_duration,
        default=dt.timedelta(hours=24),
        help="longest certificate lifetime; longer requests are capped (default 24h)",
    )
    p.add_argument(
        "--min-ttl",
        type=parse_duration,
        default=dt.timedelta(seconds=60),
        help="shortest lifetime a caller may request (default 60s)",
    )
    p.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="extra DNS name or IP for the CA's serving certificate (repeatable); "
        "'nodemesh-ca' is always included",
    )
    p.add_argument(
        "--trust-domain", help="trust domain (default: the cluster document's, or cluster.local)"
    )
    p.add_argument(
        "--root-secret",
        type=namespaced_name,
        default=("nodemesh-system", "nodemesh-ca"),
        metavar="NS/NAME",
        help="Kubernetes mode: Secret holding the root (default nodemesh-system/nodemesh-ca)",
    )
    p.add_argument(
        "--root-configmap",
        type=optional_namespaced_name,
        default=("nodemesh-system", "nodemesh-ca-root"),
        metavar="NS/NAME",
        help="Kubernetes mode: ConfigMap where the trust bundle (root.pem) is published for "
        "agents (default nodemesh-system/nodemesh-ca-root; '' to not publish it)",
    )
    p.add_argument(
        "--trusted-agent",
        action="append",
        default=[],
        metavar="NS/SA",
        help="Kubernetes mode: node-agent service account allowed to impersonate "
        "(repeatable; default nodemesh-system/nodemesh-agent)",
    )
    p.add_argument(
        "--token-audience",
        action="append",
        default=[],
        metavar="AUD",
        help="Kubernetes mode: audiences a caller's token must be bound to (repeatable; default "
        f"{DEFAULT_TOKEN_AUDIENCE}, the agents' projected token; without one, a token meant for "
        "the API server would do)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that every other ``nodemesh`` command does not pay for gRPC and crypto.
    from agent.ca.service import run_ca

    return run_ca(args)
