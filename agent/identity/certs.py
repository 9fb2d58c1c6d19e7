"""Workload key pairs, CSRs and the certificates the CA returns for them.

Keys are ECDSA P-256 generated in memory. ``WorkloadCertificate`` holds the private key as a
``cryptography`` object and deliberately has no method that serialises it: its ``repr`` and
``describe()`` (what the admin API shows) carry only public facts. The one place the key is
encoded is ``agent.identity.tls``, which hands it to OpenSSL through an anonymous memory file.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID

from agent.identity.spiffe import SpiffeId


class CertificateError(ValueError):
    """Certificate material is malformed or does not match what was asked for."""


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(identity: SpiffeId, key: ec.EllipticCurvePrivateKey) -> str:
    """A PEM CSR whose only subject alternative name is the identity's SPIFFE URI."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def uri_sans(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        return []
    san = ext.value
    assert isinstance(san, x509.SubjectAlternativeName)
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def load_pem_chain(pems: Sequence[str]) -> list[x509.Certificate]:
    """Parse PEM strings, each of which may hold several certificates (Istio concatenates)."""
    certs: list[x509.Certificate] = []
    for pem in pems:
        try:
            certs.extend(x509.load_pem_x509_certificates(pem.encode()))
        except ValueError as e:
            raise CertificateError(f"the CA returned a certificate that is not PEM: {e}") from e
    return certs


def to_pem(certs: Sequence[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


@dataclass(frozen=True, eq=False)
class WorkloadCertificate:
    """A leaf certificate for one identity, its chain, the trust bundle, and the private key.

    ``chain`` is leaf first, then intermediates (without roots); ``roots`` is the trust bundle:
    every root currently trusted, which during a root rotation holds both the old and new roots.
    """

    identity: SpiffeId
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]

    @classmethod
    def from_response(
        cls,
        identity: SpiffeId,
        key: ec.EllipticCurvePrivateKey,
        cert_chain: Sequence[str],
        root_certs: Sequence[str],
    ) -> WorkloadCertificate:
        """Check a CA response (Istio semantics) and build the certificate.

        ``cert_chain`` is leaf first, root last; when the response carries ``root_cert`` that is
        the full bundle. Refuses a leaf that is not for ``identity`` or not for ``key``: a CA
        that answers with someone else's certificate must not make us present it.
        """
        certs = load_pem_chain(cert_chain)
        if not certs:
            raise CertificateError(f"the CA returned an empty certificate chain for {identity}")
        bundle = load_pem_chain(root_certs) if root_certs else []
        if not bundle:
            bundle = [c for c in certs[1:] if c.issuer == c.subject]
        if not bundle:
            raise CertificateError(f"the CA returned no root certificate for {identity}")
        leaf = certs[0]
        if uri_sans(leaf) != [str(identity)]:
            raise CertificateError(
                f"the CA returned a certificate for {uri_sans(leaf)} instead of {identity}"
            )
        if leaf.public_key() != key.public_key():
            raise CertificateError(f"the CA returned a certificate for another key ({identity})")
        roots = {c.fingerprint(hashes.SHA256()) for c in bundle}
        chain = tuple(c for c in certs if c.fingerprint(hashes.SHA256()) not in roots)
        return cls(identity, key, chain, tuple(bundle))

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_before(self) -> dt.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    def chain_pem(self) -> str:
        return to_pem(self.chain)

    def describe(self) -> dict[str, object]:
        """Public facts for the admin API; never key material."""
        return {
            "identity": str(self.identity),
            "serial": format(self.leaf.serial_number, "x"),
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "issuer": self.leaf.issuer.rfc4514_string(),
            "roots": [format(r.serial_number, "x") for r in self.roots],
            "chain": self.chain_pem(),
        }
