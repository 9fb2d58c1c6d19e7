"""Certificates in a worker: copies of the main process's, pushed to it as they change.

The main process's ``IdentityManager`` owns keys, renewal and the rule that a node agent holds
only identities of pods on its node. A worker holds copies, and a copy must never outlive the
original: a worker still presenting an identity the main process dropped would be a node agent
serving mTLS as a pod that is not on its node. So the main process pushes every change
(``certificate`` notes, built by ``CertificateFeed`` from the manager's observer calls): a new
certificate (first issue, renewal, new trust bundle) replaces the copy, ``None`` drops it, and
a (re)started worker gets every certificate held right after its ``setup``. The worker
(``RemoteCertificates``) replaces or forgets its copy and tells its TLS context cache to forget a
dropped identity (``agent.proxy.contexts``), so new connections use the renewed certificate and
new connections as a dropped identity fail as in an agent that never had it.

A worker asks (``certificate`` call) only for an identity it holds no valid copy of (a pod that
just arrived, before its first certificate was pushed); the main process answers from the
manager, waiting for the CA if needed. A push and an answer may cross: the answer leaves
directly while notes wait in the worker's outbox. Every message therefore carries the feed's
sequence number at the moment it was made (each change increments it), and the worker ignores
news about an identity older than what it already applied: an answer computed before a drop can
never bring the dropped certificate back. Private keys cross only the socketpair
(``agent.workers.wire``): never logged, never in a view (``describe`` shows public facts).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from agent.identity.certs import WorkloadCertificate
from agent.identity.manager import IdentityUnavailable
from agent.workers.channel import ChannelClosed, RemoteError
from agent.workers.wire import Note, WireError, decode_certificate, encode_certificate

NOTE = "certificate"  # args: (sequence, SPIFFE ID, encoded certificate or None: dropped)

Ask = Callable[[str], Awaitable[object]]


class Identities(Protocol):
    """What the feed needs of ``agent.identity.manager.IdentityManager``."""

    async def certificate(self, spiffe_id: str) -> WorkloadCertificate: ...

    def held(self, spiffe_id: str) -> WorkloadCertificate | None: ...

    def held_all(self) -> list[WorkloadCertificate]: ...


class CertificateFeed:
    """The main process's side: the manager's changes as notes, and answers consistent with them.

    Sans-IO: ``changed`` (the manager's observer) returns the note to send to every worker;
    ``current`` the notes a new worker starts from; ``answer`` a worker's call's reply.
    """

    def __init__(self, identities: Identities) -> None:
        self._identities = identities
        self.seq = 0

    def changed(self, spiffe_id: str, cert: WorkloadCertificate | None) -> Note:
        self.seq += 1
        return Note(NOTE, (self.seq, spiffe_id, _encode(cert)))

    def current(self) -> list[Note]:
        return [
            Note(NOTE, (self.seq, str(c.identity), encode_certificate(c)))
            for c in self._identities.held_all()
        ]

    async def answer(self, spiffe_id: object) -> tuple[int, object]:
        if not isinstance(spiffe_id, str):
            raise TypeError(f"a certificate call names a SPIFFE ID, not {type(spiffe_id).__name__}")
        await self._identities.certificate(spiffe_id)
        # Read again after the wait, together with the sequence number: what the workers were
        # told last (a renewal or drop may have happened while the answer was on its way here).
        cert = self._identities.held(spiffe_id)
        if cert is None:
            raise IdentityUnavailable(f"{spiffe_id} is no longer on this node")
        return self.seq, encode_certificate(cert)


def _encode(cert: WorkloadCertificate | None) -> object:
    return None if cert is None else encode_certificate(cert)


class RemoteCertificates:
    """The worker's side: a ``CertificateSource`` (``agent.proxy.contexts``) of pushed copies."""

    def __init__(self, ask: Ask, clock: Callable[[], float] = time.time) -> None:
        self._ask = ask
        self._clock = clock
        self._held: dict[str, WorkloadCertificate] = {}
        self._seen: dict[str, int] = {}  # per identity: the sequence number of the news applied
        self.forgotten: list[Callable[[str], None]] = []  # called with each dropped identity

    async def certificate(self, spiffe_id: str) -> WorkloadCertificate:
        held = self._held.get(spiffe_id)
        if held is not None and held.not_after.timestamp() > self._clock():
            return held
        try:
            answer = await self._ask(spiffe_id)
        except (ChannelClosed, RemoteError) as e:
            raise IdentityUnavailable(f"the agent's main process has none: {e}") from e
        if not isinstance(answer, tuple) or len(answer) != 2 or not isinstance(answer[0], int):
            raise WireError("a certificate answer travels as (sequence, certificate)")
        cert = self._take(answer[0], spiffe_id, answer[1])
        if cert is None:
            raise IdentityUnavailable(f"{spiffe_id} is no longer on this node")
        return cert

    def apply(self, args: object) -> None:
        """A ``certificate`` note from the main process."""
        if (
            not isinstance(args, tuple)
            or len(args) != 3
            or not isinstance(args[0], int)
            or not isinstance(args[1], str)
        ):
            raise WireError("a certificate note travels as (sequence, identity, certificate)")
        self._take(*args)

    def describe(self) -> list[dict[str, object]]:
        """Public facts of each copy held (``/workers``): identity, serial, expiry; no key."""
        return [
            {
                "identity": name,
                "serial": format(cert.leaf.serial_number, "x"),
                "not_after": cert.not_after.isoformat(),
            }
            for name, cert in sorted(self._held.items())
        ]

    def _take(self, seq: int, spiffe_id: str, encoded: object) -> WorkloadCertificate | None:
        if seq <= self._seen.get(spiffe_id, -1):  # already knows this or newer
            return self._held.get(spiffe_id)
        self._seen[spiffe_id] = seq
        if encoded is None:
            if self._held.pop(spiffe_id, None) is not None:
                for forget in self.forgotten:
                    forget(spiffe_id)
            return None
        cert = decode_certificate(encoded)
        if str(cert.identity) != spiffe_id:
            raise WireError(f"a certificate of {cert.identity} sent as {spiffe_id}")
        self._held[spiffe_id] = cert
        return cert
