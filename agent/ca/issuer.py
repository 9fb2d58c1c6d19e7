"""The CA's decision logic, sans-IO: one request in, a signed chain or a precise rejection out.

The gRPC layer (``agent.ca.server``) authenticates the caller and hands the request here; this
module decides what identity is being asked for, whether the caller may have it, and signs. The
checks follow the order in which a careless or hostile caller would be caught cheapest first:
metadata shape, identity syntax, trust domain, validity, CSR syntax and signature, CSR SAN, and
last the authorization against the cluster state (which may cost an API call in Kubernetes mode).

Status codes: ``INVALID_ARGUMENT`` for a request that is wrong in itself (malformed CSR or
metadata, a CSR whose SAN differs from the requested identity, validity out of range),
``PERMISSION_DENIED`` for a well-formed request this caller may not have (wrong trust domain,
identity without a pod on the caller's node), ``UNAUTHENTICATED`` (raised by ``agent.ca.auth``).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtensionOID

from agent.base.caproto import IMPERSONATED_IDENTITY_KEY
from agent.ca.authority import Authority
from agent.identity.keysmith import uri_sans
from agent.identity.spiffe import SpiffeId, SpiffeIdError

log = logging.getLogger(__name__)

MAX_CSR_BYTES = 16 * 1024


class Rejected(Exception):
    """A request the CA refuses; ``code`` is the gRPC status the caller receives."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Caller:
    """Who is asking, as established by authentication.

    ``node`` is the node the caller runs on (node agents); ``identity`` is the caller's own
    SPIFFE ID when it has one (Kubernetes service-account tokens) and may always be issued to it.
    """

    name: str
    node: str | None = None
    identity: str | None = None


class NodeAuthorizer(Protocol):
    def has_workload_on(self, node: str, identity: SpiffeId) -> bool:
        """Whether a pod running ``identity``'s service account is scheduled on ``node``."""


@dataclass(frozen=True)
class Issued:
    identity: str
    cert_chain: list[str]
    root_certs: list[str]
    serial: int
    not_after: dt.datetime


def _public_key_ok(key: object) -> bool:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1)
    if isinstance(key, rsa.RSAPublicKey):
        return key.key_size >= 2048
    return isinstance(key, ed25519.Ed25519PublicKey)


def parse_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    """Parse and check a PEM CSR: size, syntax, self-signature and key type."""
    if not csr_pem:
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "the request has no CSR (field csr)")
    # Measured in bytes as encoded, as the limit says: a count of characters let a CSR of
    # non-ASCII text reach the parser at up to four times the limit.
    encoded = csr_pem.encode("utf-8", "surrogateescape")
    if len(encoded) > MAX_CSR_BYTES:
        raise Rejected(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the CSR is larger than {MAX_CSR_BYTES} bytes ({len(encoded)}): a PEM "
            "certificate signing request for one workload identity needs about 1 KiB",
        )
    try:
        csr = x509.load_pem_x509_csr(encoded)
        signature_ok = csr.is_signature_valid
        key = csr.public_key()
        # Parse every extension now so a malformed one is a CSR error, not a later crash.
        list(csr.extensions)
    except (ValueError, UnicodeError, TypeError) as e:
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"malformed CSR: {e}") from e
    except UnsupportedAlgorithm as e:  # e.g. a garbled curve OID in the key
        raise Rejected(
            grpc.StatusCode.INVALID_ARGUMENT, f"the CSR uses an unsupported algorithm: {e}"
        ) from e
    if not signature_ok:
        raise Rejected(
            grpc.StatusCode.INVALID_ARGUMENT, "malformed CSR: its signature does not verify"
        )
    if not _public_key_ok(key):
        raise Rejected(
            grpc.StatusCode.INVALID_ARGUMENT,
            "the CSR's key type is not accepted; use ECDSA P-256/P-384, RSA >= 2048 or Ed25519",
        )
    return csr


def _csr_sans(csr: x509.CertificateSigningRequest) -> tuple[list[str], bool]:
    """URI SANs, and whether the CSR asks for any other kind of SAN."""
    try:
        ext = csr.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        return [], False
    san = ext.value
    assert isinstance(san, x509.SubjectAlternativeName)
    uris = uri_sans(csr)
    return uris, len(list(san)) != len(uris)


class Issuer:
    def __init__(
        self,
        *,
        authority: Callable[[], Authority],
        trust_domain: str,
        authorizer: NodeAuthorizer,
        max_ttl: dt.timedelta = dt.timedelta(hours=24),
        min_ttl: dt.timedelta = dt.timedelta(seconds=60),
    ) -> None:
        if min_ttl > max_ttl:
            raise ValueError(f"min TTL {min_ttl} is above max TTL {max_ttl}")
        self._authority = authority
        self.trust_domain = trust_domain
        self._authorizer = authorizer
        self.max_ttl = max_ttl
        self.min_ttl = min_ttl

    def issue(
        self,
        *,
        caller: Caller,
        csr_pem: str,
        validity_seconds: int,
        metadata: Mapping[str, object],
    ) -> Issued:
        try:
            issued = self._issue(caller, csr_pem, validity_seconds, metadata)
        except Rejected as e:
            log.warning("refused %s: %s: %s", caller.name, e.code.name, e.message)
            raise
        log.info(
            "issued %s to %s: serial %x, valid until %s",
            issued.identity,
            caller.name,
            issued.serial,
            issued.not_after.isoformat(),
        )
        return issued

    def _requested_identity(self, caller: Caller, metadata: Mapping[str, object]) -> SpiffeId:
        wanted = metadata.get(IMPERSONATED_IDENTITY_KEY)
        if wanted is None:
            if caller.identity is None:
                raise Rejected(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{caller.name} has no identity of its own; put the workload identity to "
                    f"issue in the request metadata under {IMPERSONATED_IDENTITY_KEY!r}",
                )
            wanted = caller.identity
        if not isinstance(wanted, str):
            raise Rejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"metadata {IMPERSONATED_IDENTITY_KEY!r} must be a string SPIFFE ID",
            )
        try:
            identity = SpiffeId.parse(wanted)
        except SpiffeIdError as e:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        if identity.trust_domain != self.trust_domain:
            raise Rejected(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity} is in trust domain {identity.trust_domain!r}; this CA issues only "
                f"for {self.trust_domain!r}",
            )
        return identity

    def _ttl(self, validity_seconds: int) -> dt.timedelta:
        if validity_seconds == 0:
            return self.max_ttl
        if validity_seconds < 0 or validity_seconds < self.min_ttl.total_seconds():
            raise Rejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"requested validity {validity_seconds}s is out of range: ask for 0 (the "
                f"default) or {int(self.min_ttl.total_seconds())}s to "
                f"{int(self.max_ttl.total_seconds())}s",
            )
        # Above the maximum is capped rather than refused, as Istio's CA does.
        return dt.timedelta(seconds=min(validity_seconds, self.max_ttl.total_seconds()))

    def _authorize(self, caller: Caller, identity: SpiffeId) -> None:
        if str(identity) == caller.identity:
            return
        if caller.node is None:
            raise Rejected(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller.name} may obtain only its own identity {caller.identity}, not "
                f"{identity}: it is not a trusted node agent",
            )
        if not self._authorizer.has_workload_on(caller.node, identity):
            raise Rejected(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity} has no pod on node {caller.node!r}, so {caller.name} may not "
                "obtain it",
            )

    def _issue(
        self, caller: Caller, csr_pem: str, validity_seconds: int, metadata: Mapping[str, object]
    ) -> Issued:
        identity = self._requested_identity(caller, metadata)
        ttl = self._ttl(validity_seconds)
        csr = parse_csr(csr_pem)
        uris, other_sans = _csr_sans(csr)
        if uris != [str(identity)] or other_sans:
            raise Rejected(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the CSR's SAN {uris or 'none'}{' plus non-URI names' if other_sans else ''} "
                f"differs from the requested identity {identity}; the CSR must carry exactly "
                "that SPIFFE URI",
            )
        self._authorize(caller, identity)
        authority = self._authority()
        leaf = authority.sign_workload(csr.public_key(), str(identity), ttl)
        return Issued(
            identity=str(identity),
            cert_chain=authority.chain_for(leaf),
            root_certs=authority.roots_pem(),
            serial=leaf.serial_number,
            not_after=leaf.not_valid_after_utc,
        )
