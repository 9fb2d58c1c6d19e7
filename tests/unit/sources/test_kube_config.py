"""``api_client`` works from a kubeconfig file and from the in-cluster service account."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubernetes import client
from kubernetes.config import incluster_config

from agent.sources.kube import api_client
from tests.fakeapi import FakeApiServer


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-apiserver")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "ca.crt", tmp_path / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_kubeconfig_with_token(tmp_path: Path) -> None:
    with FakeApiServer(require_token="s3cret") as api:
        api.create("Namespace", {"metadata": {"name": "default"}})
        kubeconfig = tmp_path / "config"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "fake",
                    "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
                    "users": [{"name": "agent", "user": {"token": "s3cret"}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "agent"}}],
                }
            )
        )
        with api_client(kubeconfig=str(kubeconfig)) as c:
            names = [n.metadata.name for n in client.CoreV1Api(c).list_namespace().items]
    assert names == ["default"]


def test_in_cluster_service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = _self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    token = tmp_path / "token"
    token.write_text("in-cluster-token")
    with FakeApiServer(require_token="in-cluster-token", tls=tls) as api:
        api.create("Namespace", {"metadata": {"name": "kube-system"}})
        port = api.url.rsplit(":", 1)[1]
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
        monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
        monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(cert))
        with api_client(in_cluster=True) as c:
            names = [n.metadata.name for n in client.CoreV1Api(c).list_namespace().items]
    assert names == ["kube-system"]


def test_missing_configuration_names_the_cause(tmp_path: Path) -> None:
    with pytest.raises(
        RuntimeError, match="cannot configure the Kubernetes client from kubeconfig"
    ):
        api_client(kubeconfig=str(tmp_path / "absent"))
