"""``h2``'s state machine inputs hashed in C (imported by ``agent.proxy.h2wire``, before any
connection is made).

Why: every transition of an ``h2`` stream looks ``(state, input)`` up in a table. The state is
an ``IntEnum`` (hashed as its int, in C), the input a plain ``Enum``, whose ``__hash__`` is a
Python function (``hash(self._name_)``): one Python call per transition, 14 per gRPC call at
the source's ``H2Proxy`` alone, and more on every HBONE stream. An ``Enum`` member is a
singleton compared by identity (``Enum`` defines no ``__eq__``), so hashing it by identity
(``object.__hash__``, in C) keeps every comparison and look-up answering as before; the tables
``h2`` built at import with the old hashes are rebuilt in place (the same dict objects, the
same entries). ``ConnectionState`` and ``ConnectionInputs`` (the connection's table, hashed
twice per transition) get the same.

Only ``h2``'s own tables are keyed by these enums (checked at import: every entry is found
again after the rebuild); nothing of ours keeps a set or dict of them.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import h2.stream as _h2_stream
from h2.connection import ConnectionInputs, ConnectionState, H2ConnectionStateMachine
from h2.stream import StreamInputs

HASHED_BY_IDENTITY: tuple[type[Enum], ...] = (StreamInputs, ConnectionInputs, ConnectionState)


def _tables() -> list[dict[Any, Any]]:
    return [_h2_stream._transitions, H2ConnectionStateMachine._transitions]


def hash_by_identity() -> None:
    """Hash ``HASHED_BY_IDENTITY``'s members by identity and rebuild ``h2``'s transition
    tables under the new hashes (idempotent); ImportError, naming the table, if an entry is
    then not found (a different ``h2``)."""
    for kind in HASHED_BY_IDENTITY:
        if kind.__dict__.get("__hash__") is not object.__hash__:
            kind.__hash__ = object.__hash__  # type: ignore[method-assign]
    for table in _tables():
        entries = list(table.items())
        table.clear()
        table.update(entries)
        if any(table.get(key) is not value for key, value in entries):
            raise ImportError(
                "h2's state machine table no longer finds its entries by identity-hashed "
                "inputs: agent.proxy.h2enums needs updating for this h2 version"
            )


hash_by_identity()
