"""The signing side of the CA: the root (or intermediate) that signs, the trust bundle, leaves.

Why a separate "signing" certificate and "trust bundle": root rotation. During a rotation the CA
signs with the new root while agents must still trust leaves from the old one, so the bundle it
hands out (``roots``) lists every trusted root and the signing chain says which one signed. A
user-provided intermediate works the same way: ``signing_chain`` holds it and its parents up to
(but not including) a root of the bundle.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity.keysmith import to_pem

ROOT_VALIDITY = dt.timedelta(days=3650)
# Clock skew tolerance: leaves are valid from a minute ago so a peer whose clock is slightly
# behind does not reject a brand-new certificate.
BACKDATE = dt.timedelta(minutes=1)


class AuthorityError(ValueError):
    """The CA's signing material is missing, inconsistent or unusable."""


def random_serial() -> int:
    """A positive 159-bit random serial (RFC 5280 allows at most 20 octets)."""
    return secrets.randbits(159) | 1


def new_root(
    trust_domain: str, *, now: dt.datetime | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed ECDSA P-256 root for ``trust_domain``."""
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"nodemesh root {secrets.token_hex(4)}"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ROOT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=True,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True, eq=False)
class Authority:
    """Signing certificate + key, its chain up to a root, and the trust bundle."""

    signing_cert: x509.Certificate
    signing_key: CertificateIssuerPrivateKeyTypes
    signing_chain: tuple[x509.Certificate, ...]  # intermediates above signing_cert, no roots
    roots: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        if self.signing_cert.public_key() != self.signing_key.public_key():
            raise AuthorityError("the CA key does not belong to the CA certificate; fix ca-key.pem")
        top = self.signing_chain[-1] if self.signing_chain else self.signing_cert
        if top.issuer not in {r.subject for r in self.roots}:
            raise AuthorityError(
                "the CA certificate does not chain to any root in the trust bundle (root.pem); "
                "add its root to root.pem"
            )

    @property
    def signing_root(self) -> x509.Certificate:
        top = self.signing_chain[-1] if self.signing_chain else self.signing_cert
        return next(r for r in self.roots if r.subject == top.issuer)

    def chain_for(self, leaf: x509.Certificate) -> list[str]:
        """Istio's ``cert_chain``: leaf first, then intermediates, the signing root last."""
        certs = [leaf]
        if self.signing_cert not in self.roots:
            certs.append(self.signing_cert)
        certs.extend(self.signing_chain)
        certs.append(self.signing_root)
        return [to_pem([c]) for c in certs]

    def roots_pem(self) -> list[str]:
        return [to_pem([r]) for r in self.roots]

    def _builder(
        self, public_key: CertificatePublicKeyTypes, ttl: dt.timedelta, now: dt.datetime
    ) -> x509.CertificateBuilder:
        not_after = min(now + ttl, self.signing_cert.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.signing_cert.subject)
            .public_key(public_key)
            .serial_number(random_serial())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.signing_cert.public_key()  # type: ignore[arg-type]
                ),
                critical=False,
            )
        )

    def sign_workload(
        self,
        public_key: CertificatePublicKeyTypes,
        spiffe_id: str,
        ttl: dt.timedelta,
        *,
        now: dt.datetime | None = None,
    ) -> x509.Certificate:
        """A leaf whose only SAN is the SPIFFE URI (an empty subject, as SPIFFE X.509-SVIDs
        allow), usable for TLS client and server."""
        now = now or dt.datetime.now(dt.UTC)
        builder = self._builder(public_key, ttl, now).add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
        return builder.sign(self.signing_key, hashes.SHA256())

    def sign_server(
        self, public_key: CertificatePublicKeyTypes, names: Sequence[str], ttl: dt.timedelta
    ) -> x509.Certificate:
        """The CA's own gRPC serving certificate, with DNS and IP SANs for ``names``."""
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        now = dt.datetime.now(dt.UTC)
        builder = self._builder(public_key, ttl, now).add_extension(
            x509.SubjectAlternativeName(sans), critical=False
        )
        return builder.sign(self.signing_key, hashes.SHA256())


def key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    """PKCS#8 PEM of a CA key: only for the CA's own storage (file 0600 or Secret)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
