"""``nodemesh ca``: run the mesh CA, standalone (files) or against a Kubernetes API server.

Standalone (the lab, a VM install): ``--cluster-file`` is the cluster document (read and
reloaded through the local-file source, for the node check), ``--root-dir`` holds the root
(created on first start), ``--node-tokens`` maps tokens to nodes. Kubernetes: ``--kubeconfig`` or
``--in-cluster``; the root lives in a Secret, callers are checked with TokenReview.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import re
import signal
import threading
from pathlib import Path
from typing import Any

from agent.ca.auth import (
    Authenticator,
    KubeNodeAuthorizer,
    NodeTokenAuthenticator,
    StoreNodeAuthorizer,
    TokenReviewAuthenticator,
)
from agent.ca.authority import Authority
from agent.ca.issuer import Issuer, NodeAuthorizer
from agent.ca.server import CertificateService, start_server
from agent.ca.storage import (
    load_or_create_dir,
    load_or_create_secret,
    publish_bundle_configmap,
)
from agent.state import StateStore
from agent.state.model import DEFAULT_TRUST_DOMAIN

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^(\d+)(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> dt.timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 30m, 24h or 7d")
    return dt.timedelta(seconds=int(match[1]) * _UNITS[match[2]])


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
    p.add_argument("--listen", default="0.0.0.0:15012", help="address:port (default %(default)s)")
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
        default="nodemesh-system/nodemesh-ca",
        metavar="NS/NAME",
        help="Kubernetes mode: Secret holding the root (default %(default)s)",
    )
    p.add_argument(
        "--root-configmap",
        default="nodemesh-system/nodemesh-ca-root",
        metavar="NS/NAME",
        help="Kubernetes mode: ConfigMap where the trust bundle (root.pem) is published for "
        "agents (default %(default)s)",
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
        help="Kubernetes mode: audiences TokenReview must accept",
    )
    p.set_defaults(func=run)


def _standalone(args: argparse.Namespace) -> tuple[Authority, Authenticator, NodeAuthorizer, str]:
    from agent.sources.localfile import LocalFileSource

    if args.root_dir is None or args.node_tokens is None:
        raise SystemExit("nodemesh ca: standalone mode needs --root-dir and --node-tokens")
    store = StateStore()
    source = LocalFileSource(args.cluster_file, store)
    source.start()
    trust_domain = args.trust_domain or store.snapshot().trust_domain
    authority = load_or_create_dir(args.root_dir, trust_domain)
    return (
        authority,
        NodeTokenAuthenticator.from_file(args.node_tokens),
        StoreNodeAuthorizer(store),
        trust_domain,
    )


def _kubernetes(args: argparse.Namespace) -> tuple[Authority, Authenticator, NodeAuthorizer, str]:
    from kubernetes import client, config

    from agent.ca.kube import ApiServerCluster

    if args.in_cluster:
        config.load_incluster_config()
    else:
        config.load_kube_config(config_file=str(args.kubeconfig))
    cluster = ApiServerCluster(client.ApiClient(), audiences=args.token_audience)
    trust_domain = args.trust_domain or DEFAULT_TRUST_DOMAIN
    namespace, _, name = args.root_secret.partition("/")
    authority = load_or_create_secret(cluster.core, namespace, name, trust_domain)
    cm_namespace, _, cm_name = args.root_configmap.partition("/")
    publish_bundle_configmap(cluster.core, cm_namespace, cm_name, authority)
    agents = frozenset(args.trusted_agent or ["nodemesh-system/nodemesh-agent"])
    return (
        authority,
        TokenReviewAuthenticator(cluster, agents, trust_domain),
        KubeNodeAuthorizer(cluster),
        trust_domain,
    )


def run(args: argparse.Namespace) -> int:
    setup = _standalone if args.cluster_file else _kubernetes
    authority, authenticator, authorizer, trust_domain = setup(args)
    issuer = Issuer(
        authority=lambda: authority,
        trust_domain=trust_domain,
        authorizer=authorizer,
        max_ttl=args.max_ttl,
        min_ttl=args.min_ttl,
    )
    server, _ = start_server(
        CertificateService(issuer, authenticator), authority, listen=args.listen, sans=args.san
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("mesh CA stopping")
    server.stop(grace=5).wait()
    return 0
