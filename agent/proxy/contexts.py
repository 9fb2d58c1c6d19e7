"""TLS contexts for HBONE, built from the identity manager's certificates and cached.

Building an ``SSLContext`` loads a key and chain into OpenSSL, far too slow to do per connection,
so contexts are cached per (local identity, expected peer) and rebuilt only when the identity
manager hands out a different certificate (after a renewal). Both sides offer only ALPN ``h2``:
HBONE is HTTP/2, and a peer that negotiates anything else is refused.
"""

from __future__ import annotations

import ssl
from typing import Protocol

from agent.identity.certs import WorkloadCertificate
from agent.identity.manager import IdentityUnavailable
from agent.identity.tls import client_context, server_context

ALPN = "h2"


class NoCertificate(ConnectionError):
    """The identity manager has no certificate for a local identity (CA unreachable, identity
    gone); the connection that needed it is refused."""


class CertificateSource(Protocol):
    async def certificate(self, spiffe_id: str) -> WorkloadCertificate: ...


class Contexts:
    def __init__(self, identities: CertificateSource) -> None:
        self.identities = identities
        self._cache: dict[
            tuple[str, str | None, bool], tuple[WorkloadCertificate, ssl.SSLContext]
        ] = {}

    async def client(self, local_id: str, peer_id: str) -> ssl.SSLContext:
        """Present ``local_id``'s certificate; accept only a server that is ``peer_id``."""
        return await self._get(local_id, peer_id, server=False)

    async def server(self, local_id: str) -> ssl.SSLContext:
        """Present ``local_id``'s certificate; accept any client of the trust domain."""
        return await self._get(local_id, None, server=True)

    async def _get(self, local_id: str, peer_id: str | None, *, server: bool) -> ssl.SSLContext:
        try:
            cert = await self.identities.certificate(local_id)
        except IdentityUnavailable as e:
            raise NoCertificate(f"no certificate for {local_id}: {e}; is the CA reachable?") from e
        key = (local_id, peer_id, server)
        cached = self._cache.get(key)
        if cached is not None and cached[0] is cert:
            return cached[1]
        ctx = server_context(cert) if server else client_context(cert, peer_id)
        ctx.set_alpn_protocols([ALPN])
        self._cache[key] = (cert, ctx)
        return ctx

    def forget(self, local_id: str) -> None:
        """Drop every context presenting ``local_id`` (its identity left the node: the key
        must not stay loaded in OpenSSL)."""
        for key in [k for k in self._cache if k[0] == local_id]:
            del self._cache[key]
