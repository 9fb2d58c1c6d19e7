"""Certificates in a worker: the main process's identity manager, asked over the channel.

The proxy asks for a local identity's certificate per TLS context it builds
(``agent.proxy.contexts``), on demand. A worker asks the main process (``certificate`` call),
which answers from its ``IdentityManager`` (fetching from the CA first if it has none yet), and
keeps the answer. It asks again once ``REFRESH_SECONDS`` have passed (or half the remaining
validity, if less), so a renewal or a new trust bundle reaches every worker within that time
without the manager knowing about workers; an answer equal to what the worker holds keeps the
held object, so the proxy's cached TLS contexts stay valid. While the main process cannot answer,
a certificate that is still valid keeps being served.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.identity.certs import WorkloadCertificate
from agent.identity.manager import IdentityUnavailable
from agent.workers.channel import ChannelClosed, RemoteError
from agent.workers.wire import decode_certificate, encode_certificate

REFRESH_SECONDS = 30.0

Ask = Callable[[str], Awaitable[object]]


@dataclass
class _Held:
    cert: WorkloadCertificate
    encoded: object
    refresh_at: float


class RemoteCertificates:
    """A ``CertificateSource`` (``agent.proxy.contexts``) fed by the main process."""

    def __init__(self, ask: Ask, clock: Callable[[], float] = time.time) -> None:
        self._ask = ask
        self._clock = clock
        self._held: dict[str, _Held] = {}

    async def certificate(self, spiffe_id: str) -> WorkloadCertificate:
        now = self._clock()
        held = self._held.get(spiffe_id)
        if held is not None and now < held.refresh_at:
            return held.cert
        try:
            encoded = await self._ask(spiffe_id)
        except (ChannelClosed, RemoteError) as e:
            if held is not None and held.cert.not_after.timestamp() > now:
                return held.cert
            raise IdentityUnavailable(f"the agent's main process has none: {e}") from e
        if held is None or encoded != held.encoded:
            held = _Held(decode_certificate(encoded), encoded, 0.0)
        left = held.cert.not_after.timestamp() - now
        held.refresh_at = now + min(REFRESH_SECONDS, max(left / 2, 0.0))
        self._held[spiffe_id] = held
        return held.cert


async def answer(
    certificate: Callable[[str], Awaitable[WorkloadCertificate]], spiffe_id: object
) -> object:
    """The main process's side: the manager's current certificate for ``spiffe_id``, encoded."""
    if not isinstance(spiffe_id, str):
        raise TypeError(f"a certificate call names a SPIFFE ID, not {type(spiffe_id).__name__}")
    return encode_certificate(await certificate(spiffe_id))
