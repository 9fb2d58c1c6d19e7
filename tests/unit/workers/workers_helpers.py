"""A self-signed workload certificate for the worker channel's tests (no CA needed)."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from agent.identity.certs import WorkloadCertificate
from agent.identity.keysmith import certificate as facts
from agent.identity.keysmith import generate_key, private_key
from agent.identity.spiffe import SpiffeId

ID = "spiffe://cluster.local/ns/default/sa/client"


def certificate(hours: float = 1.0, identity: str = ID) -> WorkloadCertificate:
    key = generate_key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=hours))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return WorkloadCertificate(
        SpiffeId.parse(identity), private_key(key), (facts(cert),), (facts(cert),)
    )
