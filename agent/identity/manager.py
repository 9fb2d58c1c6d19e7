"""The identity manager: one certificate per local meshed identity, kept fresh.

Theory of operation. The desired set of identities comes from the state store (every service
account with a meshed pod on this node). Each identity gets a named worker task that fetches a
certificate, sleeps until renewal time (about half the lifetime, jittered), and renews. A failed
fetch backs off exponentially while the current certificate keeps being served until it expires;
only then does the identity become Unavailable. Workers for identities that left the node are
cancelled and their certificates dropped.

Whoever holds copies of the certificates (the worker processes of ``--workers N``,
``agent.workers.certs``) follows ``observers``: each is called, synchronously and in order, with
``(spiffe_id, certificate)`` whenever an identity gets a certificate (issued, renewed, or given
a new trust bundle) and with ``(spiffe_id, None)`` when it is dropped because no meshed pod of
the node uses it any more, so that a copy never outlives the manager's own.

A CA outage is not a reason to stop serving: while an identity still holds a valid certificate
the agent stays ready and the trouble is reported as a *degraded* condition (``troubles()``:
the cause and since when, the expiry), in /status and in
``nodemesh_certificate_renewal_failing_seconds``. Only an identity with no valid certificate
makes the agent not ready, and its readiness reason names the same cause.

Priorities: a connection that needs a certificate that is not there yet (``certificate()``) must
not queue behind a background prefetch of fifty other identities, so CSR slots are handed out by
a small priority gate: on-demand requests first, then background fetches, and never more than
``concurrency`` requests to the CA at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from agent.identity.caclient import CaError
from agent.identity.certs import WorkloadCertificate
from agent.identity.gate import HIGH, LOW, PriorityGate
from agent.identity.rotation import Backoff, renewal_delay, retry_delay
from agent.identity.spiffe import SpiffeId
from agent.state import Snapshot, StateStore

log = logging.getLogger(__name__)


class Fetcher(Protocol):
    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate: ...


class State(enum.Enum):
    INITIALIZING = "Initializing"
    AVAILABLE = "Available"
    UNAVAILABLE = "Unavailable"


# (spiffe_id, its new certificate) or (spiffe_id, None): dropped from this node
CertificateObserver = Callable[[str, WorkloadCertificate | None], None]


class IdentityUnavailable(Exception):
    """No valid certificate for an identity; the message carries the CA's last answer."""


@dataclass(frozen=True)
class Trouble:
    """Why a local identity is not simply Available (``IdentityManager.troubles``)."""

    identity: str
    valid: bool  # a valid certificate is still served
    cause: str | None  # "CA unreachable", "CA refused (PERMISSION_DENIED)"...; None: no failure
    since: float | None  # wall clock of the first failure of the current streak
    not_after: float | None  # expiry of the certificate held (past when it expired)

    def describe(self) -> str:
        """One line for readiness or /status, e.g. ``CA unreachable since <t>, certificate for
        <id> expires at <t>``."""
        if self.not_after is None:
            held = f"no certificate yet for {self.identity}"
        else:
            verb = "expires" if self.valid else "expired"
            held = f"certificate for {self.identity} {verb} at {_iso(self.not_after)}"
        if self.cause is None or self.since is None:
            return held
        return f"{self.cause} since {_iso(self.since)}, {held}"


def _iso(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.UTC).isoformat(timespec="seconds")


@dataclass(eq=False)
class _Entry:
    identity: SpiffeId
    cert: WorkloadCertificate | None = None
    last_error: str | None = None
    failures: int = 0
    failing_since: float | None = None  # wall clock of the current streak's first failure
    cause: str | None = None  # of the last failure (CaError.cause)
    next_attempt: float = 0.0  # wall clock
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    waiters: list[asyncio.Future[WorkloadCertificate]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def valid_cert(self, now: float) -> WorkloadCertificate | None:
        if self.cert is not None and self.cert.not_after.timestamp() > now:
            return self.cert
        return None

    def state(self, now: float) -> State:
        if self.valid_cert(now) is not None:
            return State.AVAILABLE
        return State.INITIALIZING if self.failures == 0 else State.UNAVAILABLE


class IdentityManager:
    def __init__(
        self,
        fetcher: Fetcher,
        *,
        concurrency: int = 8,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self._fetcher = fetcher
        self._gate = PriorityGate(concurrency)
        self._backoff = backoff or Backoff()
        self._clock = clock
        self._draw = draw
        self._entries: dict[str, _Entry] = {}
        self._desired: frozenset[str] = frozenset()
        self.observers: list[CertificateObserver] = []

    # --- what the proxy and the admin API call -------------------------------------------------

    async def certificate(self, spiffe_id: str) -> WorkloadCertificate:
        """The current certificate for ``spiffe_id``, fetching it now (high priority) if needed."""
        entry = self._ensure(SpiffeId.parse(spiffe_id))
        cert = entry.valid_cert(self._clock())
        if cert is not None:
            return cert
        fut: asyncio.Future[WorkloadCertificate] = asyncio.get_running_loop().create_future()
        entry.waiters.append(fut)
        entry.wake.set()
        return await fut

    def held(self, spiffe_id: str) -> WorkloadCertificate | None:
        """The valid certificate held now for ``spiffe_id`` (None: none, or not managed)."""
        entry = self._entries.get(spiffe_id)
        return None if entry is None else entry.valid_cert(self._clock())

    def held_all(self) -> list[WorkloadCertificate]:
        """Every valid certificate held now (what a new copy starts from)."""
        now = self._clock()
        return [c for e in self._entries.values() if (c := e.valid_cert(now)) is not None]

    def states(self) -> list[dict[str, object]]:
        """Per identity: state, public certificate facts, last error. No key material."""
        now = self._clock()
        out: list[dict[str, object]] = []
        for name, entry in sorted(self._entries.items()):
            cert = entry.valid_cert(now)
            out.append(
                {
                    "identity": name,
                    "state": entry.state(now).value,
                    "certificate": cert.describe() if cert else None,
                    "last_error": entry.last_error,
                    "failures": entry.failures,
                    "failing_since": None
                    if entry.failing_since is None
                    else _iso(entry.failing_since),
                    "next_attempt": dt.datetime.fromtimestamp(
                        entry.next_attempt, dt.UTC
                    ).isoformat(),
                }
            )
        return out

    def troubles(self) -> list[Trouble]:
        """Desired identities without a valid certificate or whose renewal is failing."""
        now = self._clock()
        out = []
        for name in sorted(self._desired):
            entry = self._entries[name]
            valid = entry.valid_cert(now) is not None
            if valid and entry.failing_since is None:
                continue
            out.append(
                Trouble(
                    identity=name,
                    valid=valid,
                    cause=entry.cause,
                    since=entry.failing_since,
                    not_after=None if entry.cert is None else entry.cert.not_after.timestamp(),
                )
            )
        return out

    # --- what the state subscription calls --------------------------------------------------------

    def set_identities(self, identities: Iterable[str]) -> None:
        """Make the desired set exactly ``identities``: start workers, drop the rest."""
        desired = frozenset(str(SpiffeId.parse(i)) for i in identities)
        for name in desired - self._desired:
            self._ensure(SpiffeId.parse(name))
        for name in set(self._entries) - desired:
            self._drop(name)
            self._tell(name, None)
        self._desired = desired

    async def close(self) -> None:
        for name in list(self._entries):
            self._drop(name)
        await asyncio.sleep(0)

    # --- workers ------------------------------------------------------------------------------

    def _ensure(self, identity: SpiffeId) -> _Entry:
        name = str(identity)
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = _Entry(identity, next_attempt=self._clock())
            entry.task = asyncio.get_running_loop().create_task(
                self._worker(entry), name=f"identity {name}"
            )
            log.info("managing a certificate for %s", name)
        return entry

    def _drop(self, name: str) -> None:
        entry = self._entries.pop(name)
        if entry.task is not None:
            entry.task.cancel()
        for fut in entry.waiters:
            if not fut.done():
                fut.set_exception(IdentityUnavailable(f"{name} is no longer on this node"))
        log.info("dropped the certificate of %s: no meshed pod uses it any more", name)

    async def _sleep_until_due(self, entry: _Entry) -> None:
        delay = entry.next_attempt - self._clock()
        if delay <= 0 or entry.waiters:
            return
        entry.wake.clear()
        try:
            await asyncio.wait_for(entry.wake.wait(), timeout=delay)
        except TimeoutError:
            return

    async def _worker(self, entry: _Entry) -> None:
        while True:
            await self._sleep_until_due(entry)
            if entry.valid_cert(self._clock()) and entry.next_attempt > self._clock():
                self._settle(entry, None)  # woken for a certificate that is already there
                continue
            async with self._gate.slot(HIGH if entry.waiters else LOW):
                try:
                    cert: WorkloadCertificate | None = await self._fetcher.fetch(entry.identity)
                    error: Exception | None = None
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # any failure is reported and retried, never fatal
                    cert, error = None, e
            self._record(entry, cert, error)

    def _record(
        self, entry: _Entry, cert: WorkloadCertificate | None, error: Exception | None
    ) -> None:
        now = self._clock()
        if cert is not None:
            if entry.failing_since is not None:
                log.info(
                    "certificate renewal for %s recovered after %d failed attempt(s) over %.1fs "
                    "(%s)",
                    entry.identity,
                    entry.failures,
                    now - entry.failing_since,
                    entry.cause,
                )
            entry.cert, entry.failures, entry.last_error = cert, 0, None
            entry.failing_since = entry.cause = None
            self._adopt_bundle(cert)
            self._tell(str(entry.identity), cert)
            entry.next_attempt = now + renewal_delay(now, cert.not_after.timestamp(), self._draw())
            log.info(
                "certificate for %s valid until %s; renewing in %.1fs",
                entry.identity,
                cert.not_after.isoformat(),
                entry.next_attempt - now,
            )
        else:
            entry.failures += 1
            entry.last_error = str(error)
            entry.cause = (
                error.cause if isinstance(error, CaError) else "certificate request failed"
            )
            if entry.failing_since is None:
                entry.failing_since = now
            held = entry.valid_cert(now)
            left = None if held is None else held.not_after.timestamp() - now
            entry.next_attempt = now + retry_delay(
                self._backoff, entry.failures, self._draw(), left
            )
            serving = (
                f"keeps serving the current one until {held.not_after.isoformat()}"
                if held
                else "has none"
            )
            log.warning(
                "fetching a certificate for %s failed (attempt %d, %s since %s, %s; "
                "retry in %.1fs): %s",
                entry.identity,
                entry.failures,
                entry.cause,
                _iso(entry.failing_since),
                serving,
                entry.next_attempt - now,
                error,
            )
        self._settle(entry, error)

    def _adopt_bundle(self, fresh: WorkloadCertificate) -> None:
        """Give every held certificate the trust bundle of the newest CA answer.

        During a root rotation the CA starts listing the new root before it signs with it;
        peers renewed later present leaves of the new root, and identities renewed earlier must
        already trust it. The bundle is public data, so sharing it across identities is safe.
        """
        bundle = {r.fingerprint for r in fresh.roots}
        for other in self._entries.values():
            held = other.cert
            if held is not None and {r.fingerprint for r in held.roots} != bundle:
                other.cert = dataclasses.replace(held, roots=fresh.roots)
                log.info("trust bundle of %s updated from the CA's latest answer", other.identity)
                self._tell(str(other.identity), other.cert)

    def _tell(self, name: str, cert: WorkloadCertificate | None) -> None:
        for observer in self.observers:
            try:
                observer(name, cert)
            except Exception:  # an observer's bug must not stop renewals or drops
                log.exception("a certificate observer failed on %s", name)

    def _settle(self, entry: _Entry, error: Exception | None) -> None:
        cert = entry.valid_cert(self._clock())
        waiters, entry.waiters = entry.waiters, []
        for fut in waiters:
            if fut.done():
                continue
            if cert is not None:
                fut.set_result(cert)
            else:
                fut.set_exception(
                    IdentityUnavailable(f"no certificate for {entry.identity}: {error}")
                )


def local_identities(snapshot: Snapshot, node: str) -> set[str]:
    """SPIFFE IDs of the service accounts with a meshed pod on ``node``."""
    return {w.identity(snapshot.trust_domain) for w in snapshot.meshed_workloads_on(node)}


def follow_store(manager: IdentityManager, store: StateStore, node: str) -> Callable[[], None]:
    """Keep ``manager``'s identities equal to the local meshed ones; returns an unsubscribe.

    Must be called on the manager's event loop; store updates may come from any thread (sources
    run their own), so they are handed to the loop rather than applied in place.
    """
    loop = asyncio.get_running_loop()

    def on_change(snapshot: Snapshot, kinds: frozenset[str]) -> None:
        if kinds & {"workloads", "namespaces"}:
            loop.call_soon_threadsafe(manager.set_identities, local_identities(snapshot, node))

    unsubscribe = store.subscribe(on_change)
    manager.set_identities(local_identities(store.snapshot(), node))
    return unsubscribe
