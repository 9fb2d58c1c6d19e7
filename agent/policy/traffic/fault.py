"""Fault injection: delay or abort a share of new connections, for chaos testing.

Each new connection to the Service rolls the dice independently for the delay (wait
``delay`` seconds before connecting) and for the abort (never connect; close the client). With a
``source_labels`` selector only connections from meshed pods carrying those labels are touched,
so one client can be tested against a faulty service while every other keeps working.

Abort modes: ``RESET`` closes the client with a TCP RST (it sees "connection reset"); ``REFUSE``
closes it cleanly without a byte (it sees end of stream, as from a server that accepts and hangs
up). A true "connection refused" cannot be produced at L4 here: capture hands the SYN to the
proxy's listening socket, whose kernel completes the handshake before the proxy sees it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from agent.policy.traffic.config import Fault


@dataclass(frozen=True, slots=True)
class FaultDecision:
    delay: float = 0.0
    abort: str | None = None  # RESET, REFUSE or None

    @property
    def any(self) -> bool:
        return self.delay > 0 or self.abort is not None


NO_FAULT = FaultDecision()


def decide(
    fault: Fault | None, source_labels: Mapping[str, str] | None, rng: random.Random
) -> FaultDecision:
    """The faults for one new connection from a client with ``source_labels`` (None: not meshed)."""
    if fault is None:
        return NO_FAULT
    if fault.source_labels is not None:
        labels = source_labels or {}
        if any(labels.get(k) != v for k, v in fault.source_labels.items()):
            return NO_FAULT
    delay = fault.delay if rng.random() * 100.0 < fault.delay_percent else 0.0
    abort = fault.abort_mode if rng.random() * 100.0 < fault.abort_percent else None
    return FaultDecision(delay, abort)
