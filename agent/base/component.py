"""What ``nodemesh agent`` asks of its parts: the component life cycle and the state source.

The agent drives every component the same way: ``start`` once the event loop runs,
``not_ready`` at each readiness probe (reasons, empty when ready), ``degraded`` for ``/status``
(trouble it works around, such as a CA outage while certificates are still valid: reported,
never a readiness failure), ``begin_drain`` when it stops accepting (SIGTERM: say goodbye to
peers, keep serving what is open), ``stop`` after the drain deadline (cut what is left, release
everything). Declaring this once, with defaults for the steps most components do not need, is
what lets the agent call each step on every component without asking which one it is.

The state source (local file or Kubernetes) is not a component: it starts before the loop (the
datapath's first reconcile needs the whole state) and runs in its own threads. ``StateSource``
is what the agent, the metrics and the admin API read from it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Protocol


class Component(ABC):
    """A part of the agent with a life cycle on the agent's event loop."""

    name: str  # the prefix of its readiness reasons and log lines

    @abstractmethod
    async def start(self) -> None:
        """Begin serving (called once, on the agent's event loop)."""

    def not_ready(self) -> list[str]:
        """Why the agent must not report ready because of this part (empty: ready)."""
        return []

    def degraded(self) -> list[str]:
        """Trouble this part works around (shown in ``/status``; empty: none)."""
        return []

    def begin_drain(self) -> None:  # noqa: B027 (optional step: most components have none)
        """The agent stopped accepting connections; open ones get the drain period."""

    @abstractmethod
    async def stop(self) -> None:
        """Release everything; what is still open is cut."""


class StateSource(Protocol):
    """The writer of the agent's state: ``start`` loads it (synchronously) and follows it in its
    own thread; ``stop`` on drain."""

    @property
    def ready(self) -> bool: ...

    @property
    def last_error(self) -> str | None:
        """Why the last load or sync failed (``None``: it did not); the state is kept."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def describe(self) -> dict[str, object]:
        """What the admin API's ``/status`` shows about the source."""
        ...

    def stats(self) -> Mapping[str, Mapping[str, int]]:
        """Activity counters by resource and event (``nodemesh_state_sync_events_total``)."""
        ...
