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
winner's). Either way every replica ends up signing with the same root. The Secret's and the
bundle ConfigMap's API calls are in ``agent.ca.kube``, with the CA's other Kubernetes calls.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.ca.authority import Authority, AuthorityError, key_pem, new_root
from agent.identity.keysmith import to_pem

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
