"""An admin API over a real identity manager holding a real certificate (imported as
``tests.unit.admin.admin_helpers``)."""

from __future__ import annotations

import asyncio
import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

from agent.admin.api import AdminApi, AdminSources
from agent.identity.certs import WorkloadCertificate
from agent.identity.keysmith import certificate, private_key
from agent.identity.manager import IdentityManager
from agent.identity.spiffe import SpiffeId
from tests.unit.telemetry.telemetry_helpers import CLIENT_ID, make_store


def workload_certificate(identity: str) -> WorkloadCertificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "test")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return WorkloadCertificate(
        SpiffeId.parse(identity), private_key(key), (certificate(cert),), (certificate(cert),)
    )


def private_key_texts(cert: WorkloadCertificate) -> list[str]:
    """Every form in which the key could leak into JSON."""
    key = serialization.load_der_private_key(cert.key.der, password=None)
    assert isinstance(key, EllipticCurvePrivateKey)
    pem = cert.key.pem().decode()
    body = "".join(pem.splitlines()[1:-1])
    return ["PRIVATE KEY", body[:40], format(key.private_numbers().private_value, "x")]


class StaticFetcher:
    def __init__(self, cert: WorkloadCertificate) -> None:
        self.cert = cert

    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        return self.cert


class Drain:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


async def admin_with_certificate() -> tuple[AdminApi, WorkloadCertificate, Drain]:
    """Call inside a running loop: the manager's worker fetches the certificate at once."""
    cert = workload_certificate(CLIENT_ID)
    manager = IdentityManager(StaticFetcher(cert))
    manager.set_identities([CLIENT_ID])
    for _ in range(200):
        if not manager.troubles():
            break
        await asyncio.sleep(0.01)

    async def datapath() -> dict[str, object]:
        return {
            "failure_mode": "fail-closed",
            "generation": "v1-test",
            "pods": 1,
            "listeners": {"outbound": 15001},
            "counters": {"pod_ingress": {"captured": 3}},
            "attachments": {"pv0": "nm_pod_ingress"},
        }

    drain = Drain()
    api = AdminApi(
        AdminSources(
            node="node1",
            store=make_store(),
            config={"node": "node1", "admin_address": "127.0.0.1:15000"},
            not_ready=lambda: [],
            drain=drain,
            connections=lambda: [],
            certificates=manager.states,
            datapath=datapath,
            state_source=lambda: {"source": "file", "path": "/x.yaml", "loads": 1},
        )
    )
    return api, cert, drain
