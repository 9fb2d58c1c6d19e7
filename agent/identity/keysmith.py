"""The key child: ``python -m agent.identity.keysmith``, where workload keys are made.

This is the one module of the agent's identity code that imports ``cryptography``. The
long-running agent never does (ARCHITECTURE.md, "A small agent"): it asks this child, through
``agent.identity.keys``, for a fresh key and its CSR, and gets the key back as PKCS#8 bytes
over the socketpair that is the child's stdin and stdout. The key exists in the child's memory,
on the socketpair and in the agent's memory, never in a file, and neither side logs it.

The protocol is one JSON object per line each way: ``{"identity": "spiffe://..."}`` in,
``{"key": <base64 PKCS#8 DER>, "csr": <PEM>}`` or ``{"error": <message>}`` out; the child exits
when its stdin closes. SIGINT is ignored, as in the netlink helper: a Ctrl-C at the agent's
terminal reaches the whole process group, and the agent decides when the child ends.

The CA (a separate process that uses ``cryptography`` anyway) and the tests share the helpers:
``generate_key``, ``build_csr``, ``uri_sans``, ``to_pem``, and the conversions to the agent's
own ``PrivateKey`` and ``Certificate``.
"""

from __future__ import annotations

import base64
import json
import signal
import sys
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID

from agent.identity.certs import PrivateKey
from agent.identity.der import Certificate
from agent.identity.spiffe import SpiffeId, SpiffeIdError


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


def pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def private_key(key: ec.EllipticCurvePrivateKey) -> PrivateKey:
    return PrivateKey(pkcs8(key))


def certificate(cert: x509.Certificate) -> Certificate:
    return Certificate.from_der(cert.public_bytes(serialization.Encoding.DER))


def uri_sans(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        return []
    san = ext.value
    assert isinstance(san, x509.SubjectAlternativeName)
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def to_pem(certs: Sequence[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def answer(request: Any) -> dict[str, str]:
    """The reply to one request: a new key and its CSR, or why not."""
    if not isinstance(request, dict) or not isinstance(request.get("identity"), str):
        return {"error": 'a request is {"identity": "spiffe://..."}'}
    try:
        identity = SpiffeId.parse(request["identity"])
    except SpiffeIdError as e:
        return {"error": str(e)}
    key = generate_key()
    return {"key": base64.b64encode(pkcs8(key)).decode("ascii"), "csr": build_csr(identity, key)}


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for line in sys.stdin.buffer:
        try:
            reply = answer(json.loads(line))
        except ValueError:
            reply = {"error": "a request is one JSON object per line"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
