"""A real in-process CA on loopback and the state it checks nodes against."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.ca.inprocess import InProcessCA
from agent.state import StateStore
from tests.unit.identity.identity_helpers import meshed


@pytest.fixture
def store() -> StateStore:
    s = StateStore()
    with s.update() as txn:
        txn.put_workload(meshed("client", "client", "node1", "10.244.1.2"))
        txn.put_workload(meshed("server", "server", "node1", "10.244.1.3"))
    return s


@pytest.fixture
def ca(tmp_path: Path, store: StateStore) -> Iterator[InProcessCA]:
    tokens = {"node1": InProcessCA.new_token()}
    with InProcessCA(tmp_path / "ca", store, node_tokens=tokens) as authority:
        yield authority
