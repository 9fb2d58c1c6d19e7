"""Assembling and running the CA for ``nodemesh ca`` (flags in ``agent.ca.cli``).

Standalone: the cluster document through the local-file source (node check), the root from
``--root-dir``, node tokens from ``--node-tokens``. Kubernetes: the official client, the root
Secret (created on first start), the trust bundle published in a ConfigMap for agents, TokenReview.
Either way the same ``Issuer`` and gRPC server; SIGTERM stops it after in-flight calls (5 s).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from contextlib import ExitStack

from agent.base.constants import DEFAULT_TOKEN_AUDIENCE
from agent.ca.auth import (
    AuthConfigError,
    Authenticator,
    KubeNodeAuthorizer,
    NodeTokenAuthenticator,
    StoreNodeAuthorizer,
    TokenReviewAuthenticator,
)
from agent.ca.authority import Authority, AuthorityError
from agent.ca.issuer import Issuer, NodeAuthorizer
from agent.ca.kube import KubeApiError, load_or_create_secret, publish_bundle_configmap
from agent.ca.metrics import CaMetrics, serve
from agent.ca.server import CertificateService, start_server
from agent.ca.storage import load_or_create_dir
from agent.sources.localfile import LocalFileError, LocalFileSource
from agent.state import StateStore
from agent.state.model import DEFAULT_TRUST_DOMAIN

log = logging.getLogger(__name__)


class SetupError(RuntimeError):
    """The flags do not describe a CA that can run; the message says what to change."""


def _standalone(
    args: argparse.Namespace, cleanup: ExitStack
) -> tuple[Authority, Authenticator, NodeAuthorizer, str]:
    if args.root_dir is None or args.node_tokens is None:
        raise SetupError("standalone mode (--cluster-file) needs --root-dir and --node-tokens")
    store = StateStore()
    source = LocalFileSource(args.cluster_file, store)
    source.start()  # loads the document synchronously, then follows its edits
    cleanup.callback(source.stop)
    trust_domain = args.trust_domain or store.snapshot().trust_domain
    authority = load_or_create_dir(args.root_dir, trust_domain)
    return (
        authority,
        NodeTokenAuthenticator.from_file(args.node_tokens),
        StoreNodeAuthorizer(store),
        trust_domain,
    )


def token_audiences(args: argparse.Namespace) -> list[str]:
    """The audiences TokenReview checks callers' tokens against: those given, else the one the
    shipped agent DaemonSet projects its token for. Never none: TokenReview then takes the API
    server's own audience, so any token the API server accepts for the agents' service account
    (a token mounted for talking to Kubernetes, not to the CA) would be taken here too."""
    return list(args.token_audience) or [DEFAULT_TOKEN_AUDIENCE]


def _kubernetes(
    args: argparse.Namespace, cleanup: ExitStack
) -> tuple[Authority, Authenticator, NodeAuthorizer, str]:
    from agent.ca.kube import ApiServerCluster
    from agent.sources.kube import api_client

    kubeconfig = str(args.kubeconfig) if args.kubeconfig else None
    try:
        api = api_client(kubeconfig=kubeconfig, in_cluster=args.in_cluster)
    except RuntimeError as e:
        raise SetupError(str(e)) from e
    cleanup.callback(api.close)
    cluster = ApiServerCluster(api, audiences=token_audiences(args))
    trust_domain = args.trust_domain or DEFAULT_TRUST_DOMAIN
    secret_ns, secret_name = args.root_secret
    authority = load_or_create_secret(cluster.core, secret_ns, secret_name, trust_domain)
    if args.root_configmap is not None:
        cm_ns, cm_name = args.root_configmap
        publish_bundle_configmap(cluster.core, cm_ns, cm_name, authority)
    agents = frozenset(args.trusted_agent or ["nodemesh-system/nodemesh-agent"])
    return (
        authority,
        TokenReviewAuthenticator(cluster, agents, trust_domain),
        KubeNodeAuthorizer(cluster),
        trust_domain,
    )


def run_ca(args: argparse.Namespace) -> int:
    with ExitStack() as cleanup:
        try:
            return _serve(args, cleanup)
        except (SetupError, AuthorityError, AuthConfigError, LocalFileError, KubeApiError) as e:
            log.error("nodemesh ca cannot start: %s", e)
            return 1


def _serve(args: argparse.Namespace, cleanup: ExitStack) -> int:
    setup = _standalone if args.cluster_file else _kubernetes
    authority, authenticator, authorizer, trust_domain = setup(args, cleanup)
    issuer = Issuer(
        authority=lambda: authority,
        trust_domain=trust_domain,
        authorizer=authorizer,
        max_ttl=args.max_ttl,
        min_ttl=args.min_ttl,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    metrics = CaMetrics(lambda: authority, trust_domain)
    if args.metrics_listen:
        try:
            endpoint, port = serve(metrics, args.metrics_listen)
        except (OSError, ValueError) as e:
            raise SetupError(
                f"cannot serve metrics on {args.metrics_listen}: {e}; choose another "
                "--metrics-listen or '' to turn the endpoint off"
            ) from e
        cleanup.callback(endpoint.server_close)
        cleanup.callback(endpoint.shutdown)
        log.info("mesh CA metrics on %s (port %d)", args.metrics_listen, port)
    try:
        server, _ = start_server(
            CertificateService(issuer, authenticator, metrics),
            authority,
            listen=args.listen,
            sans=args.san,
        )
    except (OSError, RuntimeError) as e:
        raise SetupError(f"cannot serve on {args.listen}: {e}") from e
    stop.wait()
    log.info("mesh CA stopping")
    server.stop(grace=5).wait()
    return 0
