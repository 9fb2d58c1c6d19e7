"""A complete mesh CA inside the calling process, for tests, benchmarks and the proxy's tests.

It is the real thing (same issuer, same authentication, same gRPC/TLS server) with the inputs
supplied in code: the state store the node check reads, the node tokens, and a root written to a
directory the caller owns. ``workload_certificate`` skips gRPC and signs directly, for tests that
need certificates but not the CA protocol (TLS and proxy tests).
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Mapping
from pathlib import Path

import grpc

from agent.ca.auth import Authenticator, NodeTokenAuthenticator, StoreNodeAuthorizer
from agent.ca.authority import Authority
from agent.ca.issuer import Issuer, NodeAuthorizer
from agent.ca.server import CertificateService, start_server
from agent.ca.storage import ROOT_FILE, load_or_create_dir
from agent.identity.certs import WorkloadCertificate
from agent.identity.keysmith import generate_key, private_key
from agent.identity.spiffe import SpiffeId
from agent.state import StateStore


class InProcessCA:
    """``with InProcessCA(...) as ca:`` (or ``start()``/``stop()``); ``address`` is
    ``127.0.0.1:<port>``."""

    def __init__(
        self,
        root_dir: Path,
        store: StateStore,
        *,
        node_tokens: Mapping[str, str] | None = None,
        authenticator: Authenticator | None = None,
        authorizer: NodeAuthorizer | None = None,
        max_ttl: dt.timedelta = dt.timedelta(hours=24),
        min_ttl: dt.timedelta = dt.timedelta(seconds=1),
    ) -> None:
        self.root_dir = root_dir
        self.store = store
        self.node_tokens = dict(node_tokens or {})
        self.authority: Authority = load_or_create_dir(root_dir, store.snapshot().trust_domain)
        self.issuer = Issuer(
            authority=lambda: self.authority,
            trust_domain=store.snapshot().trust_domain,
            authorizer=authorizer or StoreNodeAuthorizer(store),
            max_ttl=max_ttl,
            min_ttl=min_ttl,
        )
        self._authenticator = authenticator or NodeTokenAuthenticator(
            {token: node for node, token in self.node_tokens.items()}
        )
        self._server: grpc.Server | None = None
        self.port = 0

    @staticmethod
    def new_token() -> str:
        return secrets.token_urlsafe(24)

    @property
    def root_file(self) -> Path:
        return self.root_dir / ROOT_FILE

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> None:
        service = CertificateService(self.issuer, self._authenticator)
        self._server, self.port = start_server(service, self.authority, listen=f"127.0.0.1:{port}")

    def __enter__(self) -> InProcessCA:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def workload_certificate(
        self, spiffe_id: str, ttl: dt.timedelta = dt.timedelta(hours=1)
    ) -> WorkloadCertificate:
        """Sign a certificate for ``spiffe_id`` directly (no gRPC, no node check)."""
        identity = SpiffeId.parse(spiffe_id)
        key = generate_key()
        leaf = self.authority.sign_workload(key.public_key(), str(identity), ttl)
        return WorkloadCertificate.from_response(
            identity, private_key(key), self.authority.chain_for(leaf), self.authority.roots_pem()
        )
