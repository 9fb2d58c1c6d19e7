"""TLS 1.3 contexts for mesh mTLS, verifying peers against the trust bundle and their SPIFFE ID.

Why an anonymous memory file: Python's ``ssl`` loads a certificate and key only from a path.
Writing the key to disk (even tmpfs) would break the promise that workload keys exist only in
memory, so the PEM goes into a ``memfd`` (anonymous memory, no filesystem entry) that OpenSSL
reads through ``/proc/self/fd/N`` and that is closed right after.

Why ``sslobject_class``: the peer's SPIFFE ID is not a host name, so OpenSSL's host-name check
cannot express "the server must be spiffe://.../sa/server". The contexts built here use an
``SSLObject``/``SSLSocket`` subclass whose ``do_handshake`` checks the peer's URI SAN right after
the handshake; a mismatch fails the handshake like any other verification error, so asyncio
streams and plain sockets both refuse the connection before a byte of data flows. The same
``SSLObject`` subclass hands out the C object's ``read``, ``write`` and ``pending``, called for
every TLS record, without ``ssl.py``'s Python frames around them (``_CheckedObject``).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from agent.identity.certs import WorkloadCertificate, to_pem
from agent.identity.der import Certificate
from agent.identity.spiffe import SpiffeId, SpiffeIdError


class PeerIdentityError(ssl.SSLCertVerificationError):
    """The peer's certificate chains to the bundle but names the wrong (or no) SPIFFE ID."""


def peer_spiffe_id(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str:
    """The peer's SPIFFE ID: the only URI SAN of its verified certificate.

    An X.509-SVID carries exactly one URI SAN (SPIFFE X.509-SVID spec, and the nodemesh CA never
    issues another), so a certificate with a second URI of any scheme is refused rather than
    read for its ``spiffe://`` entry: whatever else consumed that certificate could read the
    other URI as the identity, and two readers must never disagree about who the peer is.
    """
    cert = ssl_object.getpeercert()
    if not cert:
        raise PeerIdentityError("the peer presented no certificate")
    sans: Any = cert.get("subjectAltName", ())
    uris = [str(v) for k, v in sans if k == "URI"]
    if len(uris) != 1:
        raise PeerIdentityError(
            f"the peer certificate has {len(uris)} URI SANs {uris}; an X.509-SVID has exactly "
            "one, its spiffe:// ID"
        )
    try:
        return str(SpiffeId.parse(uris[0]))
    except SpiffeIdError as e:
        raise PeerIdentityError(str(e)) from e


def _check_peer(obj: Any) -> None:
    expected: str | None = getattr(obj.context, "expected_peer_id", None)
    trust_domains: frozenset[str] = getattr(obj.context, "trust_domains", frozenset())
    peer = peer_spiffe_id(obj)
    if expected is not None and peer != expected:
        raise PeerIdentityError(f"the peer is {peer}, expected {expected}")
    if trust_domains and SpiffeId.parse(peer).trust_domain not in trust_domains:
        raise PeerIdentityError(f"the peer {peer} is outside the trust domains {trust_domains}")


class _CheckedObject(ssl.SSLObject):
    """``ssl.SSLObject`` with the peer check, and its record calls without Python frames.

    Every TLS record an HBONE connection seals or opens goes through ``read``, ``write`` and
    ``pending`` (uvloop's ``SSLProtocol`` binds them once, right after ``wrap_bio``, and calls
    them per record). ``ssl.py``'s versions only pass their arguments on to the C object
    (``_ssl._SSLSocket``, ``self._sslobj``), but each is a Python function: a frame per call, a
    few per record, about 4 % of the instructions of a 1 KB round trip through both proxies
    (docs/performance/round-trip.md, "A round trip in instructions"). Here they are the C object's
    own methods, bound when asked for: the same arguments, results and exceptions
    (``SSLWantReadError``, zero bytes at close_notify), which is all ``ssl.py`` passes on
    (``read``'s ``len`` is required here, and every caller gives it: uvloop, asyncio's
    ``SSLProtocol``)."""

    _sslobj: Any  # ``ssl.py``'s C object, set by ``SSLObject._create``

    @property
    def read(self) -> Any:
        return self._sslobj.read

    @property
    def write(self) -> Any:
        return self._sslobj.write

    @property
    def pending(self) -> Any:
        return self._sslobj.pending

    def do_handshake(self) -> None:
        super().do_handshake()
        _check_peer(self)


class _CheckedSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        _check_peer(self)


class MeshContext(ssl.SSLContext):
    """An ``SSLContext`` that knows which peer identity it accepts."""

    expected_peer_id: str | None = None
    trust_domains: frozenset[str] = frozenset()


@contextmanager
def _memfd(data: bytes) -> Iterator[str]:
    fd = os.memfd_create("nodemesh-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _load_identity(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> None:
    with _memfd(cert.chain_pem().encode() + cert.key.pem()) as path:
        ctx.load_cert_chain(path)


def _base(
    purpose: int, cert: WorkloadCertificate, roots: Sequence[Certificate] | None
) -> MeshContext:
    ctx = MeshContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=to_pem(roots or list(cert.roots)))
    _load_identity(ctx, cert)
    ctx.sslobject_class = _CheckedObject
    ctx.sslsocket_class = _CheckedSocket
    ctx.trust_domains = frozenset({cert.identity.trust_domain})
    return ctx


def client_context(
    cert: WorkloadCertificate,
    expected_peer_id: str | None,
    *,
    roots: Sequence[Certificate] | None = None,
) -> MeshContext:
    """Client side: present ``cert``, require a server chaining to the bundle whose SPIFFE ID is
    ``expected_peer_id`` (``None``: any identity of the trust domain)."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, cert, roots)
    ctx.expected_peer_id = expected_peer_id
    return ctx


def server_context(
    cert: WorkloadCertificate, *, roots: Sequence[Certificate] | None = None
) -> MeshContext:
    """Server side: present ``cert``, require a client certificate chaining to the bundle with a
    SPIFFE ID of the trust domain (read it with ``peer_spiffe_id`` to authorize)."""
    return _base(ssl.PROTOCOL_TLS_SERVER, cert, roots)
