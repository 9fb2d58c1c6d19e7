"""CA request outcomes: a counting wrapper around the identity manager's certificate fetcher.

It lives with identity and declares its counter in ``agent.base.metrics`` (a leaf module),
so identity depends on no other part of telemetry.

Wrapping the fetcher (rather than counting inside the CA client) counts exactly what the
manager asked for, including renewals and on-demand fetches, with the outcome it saw: ``ok``,
the gRPC status name of a refusal (``PERMISSION_DENIED``, ``UNAVAILABLE``...), or ``error``
for anything else (an unusable answer, an unreadable token file).
"""

from __future__ import annotations

import asyncio

from agent.base.metrics import counter
from agent.identity.caclient import CaError
from agent.identity.certs import WorkloadCertificate
from agent.identity.manager import Fetcher
from agent.identity.spiffe import SpiffeId

CA_REQUESTS = counter(
    "nodemesh_ca_requests_total", "Certificate requests to the mesh CA, by outcome", ["outcome"]
)


def outcome_of(error: BaseException | None) -> str:
    if error is None:
        return "ok"
    if isinstance(error, CaError) and error.code is not None:
        return str(error.code.name)
    return "error"


class CountingFetcher:
    """A ``Fetcher`` that counts every request's outcome in ``nodemesh_ca_requests_total``."""

    def __init__(self, inner: Fetcher) -> None:
        self._inner = inner

    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        try:
            cert = await self._inner.fetch(identity)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            CA_REQUESTS.labels(outcome=outcome_of(e)).inc()
            raise
        CA_REQUESTS.labels(outcome="ok").inc()
        return cert
