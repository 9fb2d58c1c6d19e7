"""When to renew and when to retry: pure functions of time, lifetimes and a random draw.

Renewal happens at about half of the validity left when the certificate arrived (not of
``not_after - not_before``: the CA backdates ``not_before`` for clock skew, which would make short
certificates renew too early). The jitter spreads the renewals of many identities and many nodes
that started together, so a CA restart does not see them all return at once. Failures back off
exponentially from ``initial`` to ``cap``, also jittered, and a retry is never scheduled after the
current certificate expires when an earlier attempt is still possible (``retry_delay``): a CA
that returns a few seconds before expiry must find the agent asking, not asleep until after it.
"""

from __future__ import annotations

from dataclasses import dataclass

RENEW_FRACTION = 0.5
RENEW_JITTER = 0.1  # renew between 45 % and 50 % of the remaining validity


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.5
    cap: float = 30.0
    jitter: float = 0.2

    def delay(self, failures: int, draw: float) -> float:
        """Seconds to wait after the ``failures``-th consecutive failure (``draw`` in [0, 1))."""
        if failures < 1:
            raise ValueError("failures counts from 1")
        base = min(self.initial * 2 ** min(failures - 1, 62), self.cap)
        return base * (1 - self.jitter * draw)


def renewal_delay(received: float, not_after: float, draw: float) -> float:
    """Seconds after ``received`` at which to renew a certificate valid until ``not_after``."""
    remaining = max(not_after - received, 0.0)
    return remaining * RENEW_FRACTION * (1 - RENEW_JITTER * draw)


def retry_delay(backoff: Backoff, failures: int, draw: float, left: float | None) -> float:
    """Seconds to wait after the ``failures``-th failure while the held certificate is valid for
    ``left`` more seconds (``None``: no valid certificate): the backoff, but at most half the time
    left, and never below ``backoff.initial``, so retries grow denser as expiry approaches."""
    delay = backoff.delay(failures, draw)
    if left is None or left <= 0:
        return delay
    return min(delay, max(left / 2, backoff.initial))
