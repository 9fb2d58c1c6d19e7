"""The CA's root: created once, key 0600, shared by racing starters, refused when unsafe."""

from __future__ import annotations

import base64
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from kubernetes.client.exceptions import ApiException

from agent.ca.authority import AuthorityError
from agent.ca.kube import load_or_create_secret, publish_bundle_configmap
from agent.ca.storage import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    ROOT_FILE,
    load_or_create_dir,
    new_material,
)


def fingerprint(authority: Any) -> bytes:
    return authority.signing_cert.fingerprint(hashes.SHA256())  # type: ignore[no-any-return]


def test_first_start_creates_a_root_with_a_private_key_file(tmp_path: Path) -> None:
    first = load_or_create_dir(tmp_path, "cluster.local")
    assert stat.S_IMODE((tmp_path / CA_KEY_FILE).stat().st_mode) == 0o600
    assert first.signing_cert in first.roots
    again = load_or_create_dir(tmp_path, "cluster.local")
    assert fingerprint(again) == fingerprint(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [CA_CERT_FILE, CA_KEY_FILE, ROOT_FILE]
    )


def test_concurrent_first_starts_agree_on_one_root(tmp_path: Path) -> None:
    results: list[bytes] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            results.append(fingerprint(load_or_create_dir(tmp_path, "cluster.local")))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    load_or_create_dir(tmp_path, "cluster.local")
    (tmp_path / CA_KEY_FILE).chmod(0o644)
    with pytest.raises(AuthorityError, match="chmod 600"):
        load_or_create_dir(tmp_path, "cluster.local")


def test_a_signing_cert_outside_the_bundle_is_refused(tmp_path: Path) -> None:
    load_or_create_dir(tmp_path, "cluster.local")
    (tmp_path / ROOT_FILE).write_bytes(new_material("cluster.local")[ROOT_FILE])
    with pytest.raises(AuthorityError, match=r"root\.pem"):
        load_or_create_dir(tmp_path, "cluster.local")


def test_bundle_with_two_roots_signs_with_the_configured_one(tmp_path: Path) -> None:
    old = new_material("cluster.local")
    new = new_material("cluster.local")
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / ROOT_FILE).write_bytes(old[ROOT_FILE] + new[ROOT_FILE])
    (tmp_path / CA_CERT_FILE).write_bytes(new[CA_CERT_FILE])
    (tmp_path / CA_KEY_FILE).write_bytes(new[CA_KEY_FILE])
    (tmp_path / CA_KEY_FILE).chmod(0o600)
    authority = load_or_create_dir(tmp_path, "cluster.local")
    assert len(authority.roots) == 2
    assert authority.signing_root == authority.roots[1]


@dataclass
class FakeCore:
    """CoreV1Api's secret calls; ``lose_race`` makes create fail as if a peer created it first."""

    secrets: dict[tuple[str, str], Any] = field(default_factory=dict)
    lose_race: bool = False
    creates: int = 0

    def read_namespaced_secret(self, name: str, namespace: str) -> Any:
        if (namespace, name) not in self.secrets:
            raise ApiException(status=404, reason="Not Found")
        return self.secrets[(namespace, name)]

    def create_namespaced_secret(self, namespace: str, body: Any) -> Any:
        self.creates += 1
        if self.lose_race:
            winner = new_material("cluster.local")
            body.data = {k: base64.b64encode(v).decode() for k, v in winner.items()}
            self.secrets[(namespace, body.metadata.name)] = body
            raise ApiException(status=409, reason="AlreadyExists")
        self.secrets[(namespace, body.metadata.name)] = body
        return body


def test_secret_is_created_once_and_then_reused() -> None:
    core = FakeCore()
    first = load_or_create_secret(core, "nodemesh-system", "nodemesh-ca", "cluster.local")
    second = load_or_create_secret(core, "nodemesh-system", "nodemesh-ca", "cluster.local")
    assert core.creates == 1
    assert fingerprint(first) == fingerprint(second)


def test_losing_the_creation_race_adopts_the_winners_root() -> None:
    core = FakeCore(lose_race=True)
    mine = load_or_create_secret(core, "nodemesh-system", "nodemesh-ca", "cluster.local")
    stored = core.secrets[("nodemesh-system", "nodemesh-ca")]
    winner_cert = base64.b64decode(stored.data[CA_CERT_FILE])
    assert mine.signing_cert.public_bytes(serialization.Encoding.PEM) == winner_cert


@dataclass
class FakeConfigMaps:
    maps: dict[tuple[str, str], Any] = field(default_factory=dict)
    writes: int = 0

    def read_namespaced_config_map(self, name: str, namespace: str) -> Any:
        if (namespace, name) not in self.maps:
            raise ApiException(status=404, reason="Not Found")
        return self.maps[(namespace, name)]

    def create_namespaced_config_map(self, namespace: str, body: Any) -> Any:
        self.writes += 1
        self.maps[(namespace, body.metadata.name)] = body
        return body

    def replace_namespaced_config_map(self, name: str, namespace: str, body: Any) -> Any:
        self.writes += 1
        self.maps[(namespace, name)] = body
        return body


def test_trust_bundle_configmap_follows_the_roots(tmp_path: Path) -> None:
    core = FakeConfigMaps()
    authority = load_or_create_dir(tmp_path / "a", "cluster.local")
    publish_bundle_configmap(core, "nodemesh-system", "nodemesh-ca-root", authority)
    publish_bundle_configmap(core, "nodemesh-system", "nodemesh-ca-root", authority)
    stored = core.maps[("nodemesh-system", "nodemesh-ca-root")].data[ROOT_FILE]
    assert stored == (tmp_path / "a" / ROOT_FILE).read_text()
    assert core.writes == 1  # unchanged bundle: no write
    rotated = load_or_create_dir(tmp_path / "b", "cluster.local")
    publish_bundle_configmap(core, "nodemesh-system", "nodemesh-ca-root", rotated)
    assert core.maps[("nodemesh-system", "nodemesh-ca-root")].data[ROOT_FILE] != stored
    assert core.writes == 2
