"""stunnel4's side of the comparison must be mutual TLS 1.3 with verified chains, like the mesh."""

import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from bench import stunnel

TUNNEL = stunnel.Tunnel("echo", "10.100.0.1:27000", "10.100.0.2:37000", "10.244.2.3:7000")


def options(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(" = ")
        if sep:
            found.setdefault(key, []).append(value)
    return found


def test_client_side_forwards_to_the_server_node_and_checks_its_name(tmp_path: Path) -> None:
    conf = options(stunnel.config(tmp_path, [TUNNEL], client=True))
    assert conf["client"] == ["yes"]
    assert conf["accept"] == ["10.100.0.1:27000"]
    assert conf["connect"] == ["10.100.0.2:37000"]
    assert conf["checkHost"] == [stunnel.SERVER_NAME]
    assert conf["cert"] == [str(tmp_path / "client.pem")]
    assert conf["verifyChain"] == ["yes"]
    assert conf["sslVersionMin"] == ["TLSv1.3"]
    assert conf["socket"] == ["l:TCP_NODELAY=1", "r:TCP_NODELAY=1"]


def test_server_side_requires_a_client_certificate_and_forwards_to_the_pod(tmp_path: Path) -> None:
    conf = options(stunnel.config(tmp_path, [TUNNEL], client=False))
    assert conf["client"] == ["no"]
    assert conf["accept"] == ["10.100.0.2:37000"]
    assert conf["connect"] == ["10.244.2.3:7000"]
    assert conf["verifyChain"] == ["yes"]  # stunnel then demands the peer's certificate
    assert "checkHost" not in conf


def test_credentials_chain_to_the_ca_and_keys_are_private(tmp_path: Path) -> None:
    directory = tmp_path / "creds"
    stunnel.write_credentials(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    for role, name, usage in (
        ("server", stunnel.SERVER_NAME, ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", stunnel.CLIENT_NAME, ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        cert = x509.load_pem_x509_certificate((directory / f"{role}.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [name]
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
        assert stat.S_IMODE((directory / f"{role}.key").stat().st_mode) == 0o600
