"""Workload private keys and the certificates the CA returns for them, without ``cryptography``.

The agent and its workers only hold, compare and hand to OpenSSL what the CA issued; they never
generate or sign (``agent.identity.keys`` does, in a child process), so certificates are read by
the small DER reader of ``agent.identity.der`` and keys are kept as their PKCS#8 bytes. This is
what keeps ``cryptography`` (about 12 MiB of RSS) out of every long-running agent process
(ARCHITECTURE.md, "A small agent").

``PrivateKey`` deliberately has no ``repr`` or ``str`` that shows its bytes, and
``WorkloadCertificate``'s ``repr`` and ``describe()`` (what the admin API shows) carry only public
facts. The key is encoded for two readers only: OpenSSL, through an anonymous memory file
(``agent.identity.tls``), and the worker channel (``agent.workers.wire``).
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.identity.der import Certificate, DerError, pkcs8_public_key
from agent.identity.spiffe import SpiffeId

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.DOTALL
)


class CertificateError(ValueError):
    """Certificate material is malformed or does not match what was asked for."""


def pem(label: str, der: bytes) -> str:
    body = base64.b64encode(der).decode("ascii")
    lines = "".join(body[i : i + 64] + "\n" for i in range(0, len(body), 64))
    return f"-----BEGIN {label}-----\n{lines}-----END {label}-----\n"


class PrivateKey:
    """A private key as PKCS#8 DER; its ``repr`` and ``str`` never show the bytes."""

    __slots__ = ("der", "public_key_der")

    def __init__(self, der: bytes) -> None:
        try:
            public = pkcs8_public_key(der)
        except DerError as e:
            raise CertificateError(f"not a PKCS#8 EC private key: {e}") from e
        self.der = der
        self.public_key_der = public  # its SubjectPublicKeyInfo, to match certificates against

    def pem(self) -> bytes:
        return pem("PRIVATE KEY", self.der).encode("ascii")

    def __repr__(self) -> str:
        return "PrivateKey(<hidden>)"

    __str__ = __repr__


def load_pem_chain(pems: Sequence[str]) -> list[Certificate]:
    """Parse PEM strings, each of which may hold several certificates (Istio concatenates)."""
    certs: list[Certificate] = []
    for text in pems:
        blocks = _PEM_CERTIFICATE.findall(text.encode("utf-8", "replace"))
        if not blocks:
            raise CertificateError("the CA returned a certificate that is not PEM: no CERTIFICATE")
        for block in blocks:
            try:
                certs.append(Certificate.from_der(base64.b64decode(block, validate=False)))
            except (ValueError, DerError) as e:
                raise CertificateError(f"the CA returned a malformed certificate: {e}") from e
    return certs


def to_pem(certs: Sequence[Certificate]) -> str:
    return "".join(pem("CERTIFICATE", c.der) for c in certs)


@dataclass(frozen=True, eq=False)
class WorkloadCertificate:
    """A leaf certificate for one identity, its chain, the trust bundle, and the private key.

    ``chain`` is leaf first, then intermediates (without roots); ``roots`` is the trust bundle:
    every root currently trusted, which during a root rotation holds both the old and new roots.
    """

    identity: SpiffeId
    key: PrivateKey = field(repr=False)
    chain: tuple[Certificate, ...]
    roots: tuple[Certificate, ...]

    @classmethod
    def from_response(
        cls,
        identity: SpiffeId,
        key: PrivateKey,
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
            bundle = [c for c in certs[1:] if c.self_issued]
        if not bundle:
            raise CertificateError(f"the CA returned no root certificate for {identity}")
        leaf = certs[0]
        if list(leaf.uri_sans) != [str(identity)]:
            raise CertificateError(
                f"the CA returned a certificate for {list(leaf.uri_sans)} instead of {identity}"
            )
        if leaf.public_key_der != key.public_key_der:
            raise CertificateError(f"the CA returned a certificate for another key ({identity})")
        roots = {c.fingerprint for c in bundle}
        chain = tuple(c for c in certs if c.fingerprint not in roots)
        return cls(identity, key, chain, tuple(bundle))

    @property
    def leaf(self) -> Certificate:
        return self.chain[0]

    @property
    def not_before(self) -> dt.datetime:
        return self.leaf.not_before

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_after

    def chain_pem(self) -> str:
        return to_pem(self.chain)

    def describe(self) -> dict[str, object]:
        """Public facts for the admin API; never key material."""
        return {
            "identity": str(self.identity),
            "serial": format(self.leaf.serial_number, "x"),
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "issuer": self.leaf.issuer,
            "roots": [format(r.serial_number, "x") for r in self.roots],
            "chain": self.chain_pem(),
        }
