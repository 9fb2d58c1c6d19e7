"""Where the CA keeps its root: files (standalone) or a Kubernetes Secret, same four entries.

Layout (file names in ``--root-dir``, keys in the Secret):

- ``root.pem``: the trust bundle, one or more root certificates. Agents use it as ``--ca-root``.
  To rotate the root: append the new root, restart, switch ``ca.pem``/``ca-key.pem`` to it,
  restart, and once every old leaf has expired drop the old root.
- ``ca.pem`` / ``ca-key.pem`` (0600): the signing certificate and its key, a root from
  ``root.pem`` or an intermediate below one.
- ``chain.pem`` (optional): intermediates between ``ca.pem`` and its root.

On first start nothing exists, so a self-signed root is created. Creation is race-safe: files are
written to temporary names and published with ``os.link`` (which fails if the target exists), and
the Secret is created with a plain ``create`` (a second replica gets 409 Conflict and reads the
winner's). Either way every replica ends up signing with the same root.
"""

from __future__ import annotations

import base64
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.ca.authority import Authority, AuthorityError, key_pem, new_root
from agent.identity.certs import to_pem

log = logging.getLogger(__name__)

ROOT_FILE = "root.pem"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
CHAIN_FILE = "chain.pem"


def new_material(trust_domain: str) -> dict[str, bytes]:
    cert, key = new_root(trust_domain)
    pem = to_pem([cert]).encode()
    return {ROOT_FILE: pem, CA_CERT_FILE: pem, CA_KEY_FILE: key_pem(key)}


def authority_from(material: Mapping[str, bytes], *, where: str) -> Authority:
    """Parse the four entries; errors name ``where`` (a directory or a Secret) and the entry."""

    def certs(name: str, required: bool = True) -> list[x509.Certificate]:
        if name not in material:
            if required:
                raise AuthorityError(f"{where}: {name} is missing")
            return []
        try:
            return x509.load_pem_x509_certificates(material[name])
        except ValueError as e:
            raise AuthorityError(f"{where}: {name} holds no valid PEM certificate: {e}") from e

    if CA_KEY_FILE not in material:
        raise AuthorityError(f"{where}: {CA_KEY_FILE} is missing")
    try:
        key = serialization.load_pem_private_key(material[CA_KEY_FILE], password=None)
    except (ValueError, TypeError) as e:
        raise AuthorityError(f"{where}: {CA_KEY_FILE} is not an unencrypted PEM key") from e
    signing = certs(CA_CERT_FILE)
    try:
        return Authority(
            signing_cert=signing[0],
            signing_key=key,  # type: ignore[arg-type]
            signing_chain=tuple(certs(CHAIN_FILE, required=False)),
            roots=tuple(certs(ROOT_FILE)),
        )
    except AuthorityError as e:
        raise AuthorityError(f"{where}: {e}") from e


def _publish(directory: Path, name: str, data: bytes, mode: int) -> None:
    """Write ``name`` only if it does not exist yet (link is atomic and refuses to overwrite)."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.link(tmp, directory / name)
    finally:
        os.unlink(tmp)


def _wait_for(path: Path, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AuthorityError(
                f"{path} is missing next to {CA_CERT_FILE} (a partly written root?); "
                "restore the key, or remove the directory's files to create a new root"
            )
        time.sleep(0.05)


def load_or_create_dir(directory: Path, trust_domain: str) -> Authority:
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / CA_CERT_FILE).exists():
        material = new_material(trust_domain)
        try:
            # The key last: its presence is what marks the directory as complete.
            for name, mode in ((CA_CERT_FILE, 0o644), (ROOT_FILE, 0o644), (CA_KEY_FILE, 0o600)):
                _publish(directory, name, material[name], mode)
            log.info("created a new self-signed root in %s", directory)
        except FileExistsError:
            log.info("another CA is initialising %s; using its root", directory)
    _wait_for(directory / CA_KEY_FILE)
    key_mode = (directory / CA_KEY_FILE).stat().st_mode & 0o777
    if key_mode & 0o077:
        raise AuthorityError(
            f"{directory / CA_KEY_FILE} is readable by others (mode {key_mode:o}); "
            f"run chmod 600 on it"
        )
    material = {}
    for name in (ROOT_FILE, CA_CERT_FILE, CA_KEY_FILE, CHAIN_FILE):
        path = directory / name
        if path.exists():
            material[name] = path.read_bytes()
    return authority_from(material, where=str(directory))


def _read_or_create(read: Callable[[], Any], create: Callable[[], Any], where: str) -> Any:
    """The object ``read`` returns, created with ``create`` first if absent. A 409 on create
    means another replica created it in between: read theirs, so all replicas agree."""
    from kubernetes.client.exceptions import ApiException

    try:
        return read()
    except ApiException as e:
        if e.status != 404:
            raise AuthorityError(f"cannot read {where}: {e.status} {e.reason}") from e
    try:
        created = create()
        log.info("created %s", where)
        return created
    except ApiException as e:
        if e.status != 409:
            raise AuthorityError(f"cannot create {where}: {e.status} {e.reason}") from e
    log.info("another CA replica created %s first; using it", where)
    return read()


def load_or_create_secret(core_v1: Any, namespace: str, name: str, trust_domain: str) -> Authority:
    """Read the root Secret, creating it with a new self-signed root if absent."""
    from kubernetes.client import V1ObjectMeta, V1Secret

    def create() -> Any:
        body = V1Secret(
            metadata=V1ObjectMeta(name=name, namespace=namespace),
            type="Opaque",
            data={k: base64.b64encode(v).decode() for k, v in new_material(trust_domain).items()},
        )
        return core_v1.create_namespaced_secret(namespace, body)

    where = f"Secret {namespace}/{name}"
    secret = _read_or_create(lambda: core_v1.read_namespaced_secret(name, namespace), create, where)
    data = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
    return authority_from(data, where=where)


def publish_bundle_configmap(core_v1: Any, namespace: str, name: str, authority: Authority) -> None:
    """Keep ConfigMap ``namespace/name`` key ``root.pem`` equal to the trust bundle.

    Agents mount it as ``--ca-root``: it anchors both their TLS to the CA and, during a root
    rotation, the roots they must already trust before the CA switches signers.
    """
    from kubernetes.client import V1ConfigMap, V1ObjectMeta
    from kubernetes.client.exceptions import ApiException

    bundle = to_pem(list(authority.roots))
    where = f"ConfigMap {namespace}/{name}"
    current = _read_or_create(
        lambda: core_v1.read_namespaced_config_map(name, namespace),
        lambda: core_v1.create_namespaced_config_map(
            namespace,
            V1ConfigMap(
                metadata=V1ObjectMeta(name=name, namespace=namespace), data={ROOT_FILE: bundle}
            ),
        ),
        where,
    )
    if (current.data or {}).get(ROOT_FILE) == bundle:
        return
    current.data = {**(current.data or {}), ROOT_FILE: bundle}
    try:
        core_v1.replace_namespaced_config_map(name, namespace, current)
    except ApiException as e:
        raise AuthorityError(
            f"cannot update {where}: {e.status} {e.reason} (another CA replica may be publishing "
            "a different root; check that all replicas read the same root Secret)"
        ) from e
    log.info("updated the trust bundle in %s", where)
